"""``retinanet-xla bench``: the training step on synthetic batches, no dataset needed.

The first thing to run on a new TPU VM: it shows the compile time, the steady step time and
images/s, and whether anything recompiles, before any data is in place.
"""

import resource
import statistics
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from retinanet_xla.config import Config
from retinanet_xla.data.loader import usable_workers
from retinanet_xla.data.splits import dataset_split, resolve_max_boxes, split_files
from retinanet_xla.device.choice import plan_launch
from retinanet_xla.device.feed import InputWait, Stopwatch
from retinanet_xla.device.runtime import ReplicaGroup, Runtime
from retinanet_xla.distributed.launch import run_on_local_replicas
from retinanet_xla.errors import ConfigError
from retinanet_xla.training.batches import replica_batch_size, train_batches
from retinanet_xla.training.build import build_train_step
from retinanet_xla.training.flops import step_utilisation
from retinanet_xla.training.summary import timing_summary

DISTINCT_BATCHES = 4
SYNTHETIC_MAX_BOXES = 100  # data.max_boxes: auto, with no dataset to take it from


def synthetic_max_boxes(config: Config) -> int:
    return SYNTHETIC_MAX_BOXES if config.data.max_boxes == "auto" else config.data.max_boxes


def synthetic_batches(config: Config, batch_size: int, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    """A few host batches with random pixels and 0..max_boxes random boxes per image: varied
    box counts show that they do not change the graph."""
    generator = torch.Generator().manual_seed(seed)
    height, width = config.data.image_size
    max_boxes = synthetic_max_boxes(config)
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


def benchmark(config: Config, steps: int, input_pipeline: bool = False, trace_only: bool = False) -> Dict:
    """Run ``steps`` training steps on every local device (``runtime.num_devices``), as
    ``train`` would; step 1 includes compilation, the rest are timed together.

    ``input_pipeline``: batches come through the real data pipeline (the config's train split,
    or the synthetic dataset written to a scratch directory) with ``data.num_workers``, instead
    of a few random batches held in memory; ``device_wait_fraction`` then tells whether the
    pipeline keeps up.

    ``trace_only``: the step is traced ``steps`` times and never run (``trace_seconds`` only):
    the host's cost alone, without the device's work competing for the host's cores."""
    if steps < 2:
        raise ConfigError("bench needs at least 2 steps: one to compile, one to time")
    plan = plan_launch(config.runtime)
    plan.check_batch(config.train.batch_size, "train.batch_size")  # fail before starting anything
    with tempfile.TemporaryDirectory(prefix="retinanet-xla-bench-") as scratch:
        data_root = Path(scratch) if input_pipeline else None
        if data_root is not None:
            split_files(config, "train", data_root)  # written once, before any replica reads it
        if trace_only:
            return run_on_local_replicas(_trace_only, (config, steps), plan)
        return run_on_local_replicas(_benchmark, (config, steps, data_root), plan)


def _host_batches(
    config: Config, replicas: ReplicaGroup, steps: int, data_root: Optional[Path]
) -> Iterator[Dict[str, torch.Tensor]]:
    if data_root is not None:
        stream = train_batches(config, dataset_split(config, "train", data_root), replicas)
        return (batch for _, batch in zip(range(steps), stream))
    fixed = synthetic_batches(config, replica_batch_size(config, replicas), seed=replicas.rank)
    return (fixed[i % DISTINCT_BATCHES] for i in range(steps))


def _benchmark(runtime: Runtime, config: Config, steps: int, data_root: Optional[Path]) -> Dict:
    replicas = runtime.replicas
    max_boxes = synthetic_max_boxes(config)
    if data_root is not None:
        max_boxes = resolve_max_boxes(dataset_split(config, "train", data_root), config.data.max_boxes)
    step_fn = build_train_step(config, runtime, max_boxes)
    batches = runtime.device_batches(_host_batches(config, replicas, steps, data_root))

    clock = Stopwatch()
    outputs = step_fn(next(batches))
    runtime.end_step()
    runtime.wait()
    first_step = clock.seconds()
    compiled_at_warmup, input_wait = runtime.compilations(), InputWait(runtime.device_seconds, batches)
    warm, traces = Stopwatch(), []
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps - 1):
        batch = next(batches)
        # The host's time in the step call: on XLA, launching the replayed graph or tracing it
        # (runtime.step_graph), while the device runs the previous step; on an eager device, the
        # step itself.
        traced, waited = Stopwatch(), step_fn.seconds_waiting()
        outputs = step_fn(batch)
        traces.append(traced.seconds() - (step_fn.seconds_waiting() - waited))
        runtime.end_step()
    runtime.wait()
    warm_seconds = warm.seconds()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    waits = input_wait.fractions()
    compiled = runtime.compilations()  # before the gather below, which compiles a graph of its own
    final_loss = float(outputs["loss"].cpu())
    # Every replica's timings, on the master (replicas in lockstep through the all-reduce: the
    # slowest sets the pace).
    idle = waits["device_idle_fraction"]
    row = [
        first_step,
        warm_seconds / (steps - 1),
        waits["input_wait_fraction"],
        -1.0 if idle is None else idle,
        waits["device_wait_fraction"],
        statistics.mean(traces),
        statistics.pstdev(traces),
    ]
    times = replicas.gather(torch.tensor([row]))
    step_seconds = float(times[:, 1].max())
    slowest_waits = {
        "input_wait_fraction": round(float(times[:, 2].max()), 4),
        "device_idle_fraction": round(float(times[:, 3].max()), 4) if idle is not None else None,
        "device_wait_fraction": round(float(times[:, 4].max()), 4),  # runtime.InputWait; the worst replica
    }
    summary = timing_summary(
        runtime,
        compiled,
        first_step_seconds=float(times[:, 0].max()),
        images_per_second=config.train.batch_size / step_seconds,
        compilations_after_warmup=compiled["count"] - compiled_at_warmup["count"],
        waits=slowest_waits,
    )
    # After the timed steps, with the device idle: a CPU measures its own peak here.
    utilisation = step_utilisation(config, runtime).report(summary["images_per_second"]) if replicas.is_master else {}
    return {
        **summary,
        **utilisation,
        "input": f"data pipeline, {usable_workers(config.data.num_workers)} worker(s) per replica"
        if data_root is not None
        else "in-memory random batches",
        "steps": steps,
        "batch_size": config.train.batch_size,
        "image_size": list(config.data.image_size),
        "step_seconds": round(step_seconds, 4),
        "replica_step_seconds": [round(float(t), 4) for t in times[:, 1]],
        # The host's time per step call (the slowest replica); on XLA the step rate cannot
        # exceed 1 / this, whatever the device (docs/performance.md).
        "trace_seconds": round(float(times[:, 5].max()), 4),
        "trace_seconds_spread": round(float(times[times[:, 5].argmax(), 6]), 4),
        "final_loss": final_loss,
        # The process's (every replica's, where they are threads) minor page faults per warm
        # step: memory mapped afresh every step, which a steady step should not need.
        "page_faults_per_step": round(faults / (steps - 1)),
        "peak_memory_bytes": runtime.peak_memory_bytes(),  # this replica's device, where counted (CUDA)
    }


def _trace_only(runtime: Runtime, config: Config, steps: int) -> Dict:
    replicas = runtime.replicas
    step_fn = build_train_step(config, runtime, synthetic_max_boxes(config))
    runtime.wait()
    batches = runtime.device_batches(_host_batches(config, replicas, steps, None))
    traces = []
    try:
        for batch in batches:
            traced = Stopwatch()
            runtime.trace_only(step_fn, batch)
            traces.append(traced.seconds())
    finally:
        batches.close()
    times = replicas.gather(
        torch.tensor([[statistics.mean(traces[1:]), statistics.pstdev(traces[1:])]])
    )  # the first warms Python up
    slowest = int(times[:, 0].argmax())
    return {
        "device": str(runtime.device),
        "replicas": replicas.world,
        "steps": steps,
        "step_graph": "traced, never run",
        "batch_size": config.train.batch_size,
        "image_size": list(config.data.image_size),
        "trace_seconds": round(float(times[slowest, 0]), 4),
        "trace_seconds_spread": round(float(times[slowest, 1]), 4),
    }
