"""``retinanet-xla bench``: the training step on synthetic batches, no dataset needed.

The first thing to run on a new TPU VM: it shows the compile time, the steady step time and
images/s, and whether anything recompiles, before any data is in place.
"""

from typing import Dict, List

import torch

from retinanet_xla.config import Config
from retinanet_xla.engine.build import build_train_step
from retinanet_xla.engine.runtime import Runtime, Stopwatch

DISTINCT_BATCHES = 4


def synthetic_batches(config: Config, batch_size: int, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    """A few host batches with random pixels and 0..max_boxes random boxes per image: varied
    box counts show that they do not change the graph."""
    generator = torch.Generator().manual_seed(seed)
    height, width = config.data.image_size
    max_boxes = config.data.max_boxes
    batches = []
    for _ in range(DISTINCT_BATCHES):
        boxes = torch.zeros(batch_size, max_boxes, 4)
        labels = torch.full((batch_size, max_boxes), -1, dtype=torch.int64)
        for image in range(batch_size):
            count = int(torch.randint(0, max_boxes + 1, (), generator=generator))
            xy = torch.rand(count, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
            wh = (torch.rand(count, 2, generator=generator) * 0.3 + 0.05) * torch.tensor([width, height])
            boxes[image, :count] = torch.cat([xy, xy + wh], dim=1)
            labels[image, :count] = torch.randint(0, config.model.num_classes, (count,), generator=generator)
        batches.append(
            {
                "images": torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8, generator=generator),
                "boxes": boxes,
                "labels": labels,
                "crowd": torch.zeros(batch_size, max_boxes, dtype=torch.bool),
            }
        )
    return batches


def benchmark(config: Config, steps: int) -> Dict[str, float]:
    """Run ``steps`` training steps; step 1 includes compilation, the rest are timed together."""
    if steps < 2:
        raise ValueError("bench needs at least 2 steps: one to compile, one to time")
    runtime = Runtime(config.runtime.device, config.runtime.compile_cache)
    step_fn = build_train_step(config, runtime)
    batch_size = config.train.batch_size
    host_batches = synthetic_batches(config, batch_size)
    batches = runtime.device_batches(host_batches[i % DISTINCT_BATCHES] for i in range(steps))

    clock = Stopwatch()
    outputs = step_fn(next(batches))
    runtime.sync()
    runtime.wait()
    first_step = clock.seconds()
    compiled_at_warmup = runtime.compilations()
    warm = Stopwatch()
    for _ in range(steps - 1):
        outputs = step_fn(next(batches))
        runtime.sync()
    runtime.wait()
    warm_seconds = warm.seconds()
    compiled = runtime.compilations()
    step_seconds = warm_seconds / (steps - 1)
    return {
        "device": str(runtime.device),
        "steps": steps,
        "batch_size": batch_size,
        "image_size": list(config.data.image_size),
        "first_step_seconds": round(first_step, 3),
        "compile_seconds": round(compiled["seconds"], 3),
        "step_seconds": round(step_seconds, 4),
        "images_per_second": round(batch_size / step_seconds, 2),
        "compilations_total": compiled["count"],
        "compilations_after_warmup": compiled["count"] - compiled_at_warmup["count"],
        "compile_cache": str(runtime.compile_cache) if runtime.compile_cache else None,
        **{key: compiled[key] for key in ("cache_hits", "cache_misses", "cache_load_failures") if key in compiled},
        "final_loss": float(outputs["loss"].cpu()),
    }
