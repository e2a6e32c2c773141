"""``retinanet-xla train``: build everything from the config, then one loop over steps.

Periodic work (logging, checkpoints) happens at step boundaries through step closures, so the
host never waits for the device inside the loop.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch
from rich.console import Console

from retinanet_xla.config import Config, ConfigError, save_config
from retinanet_xla.data import DetectionDataset, TrainSampler, build_loader, load_coco
from retinanet_xla.data.coco import CocoDataset, DatasetError
from retinanet_xla.data.synthetic import write_synthetic_dataset
from retinanet_xla.engine.build import build_train_step
from retinanet_xla.engine.checkpoint import save_checkpoint
from retinanet_xla.engine.metrics_log import MetricsLog
from retinanet_xla.engine.runtime import Runtime, Stopwatch

logger = logging.getLogger(__name__)
DEVICE_KEYS = ("images", "boxes", "labels", "crowd")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def dataset_split(config: Config, split: str, output_dir: Path) -> CocoDataset:
    """The configured split, or the synthetic dataset (written under ``output_dir/synthetic``)
    when ``data.<split>.annotations`` is unset."""
    paths = getattr(config.data, split)
    if paths.annotations is None:
        root = output_dir / "synthetic"
        annotations = root / "annotations" / f"instances_{split}.json"
        if not annotations.is_file():
            s = config.data.synthetic
            write_synthetic_dataset(root, s.train_images, s.val_images, s.seed)
        images = root / split
    elif paths.images is None:
        raise ConfigError(f"data.{split}.images must be set when data.{split}.annotations is")
    else:
        annotations, images = Path(paths.annotations), Path(paths.images)
    coco = load_coco(annotations, images, config.data.label_mapping, config.data.augmentation.min_box_size)
    if not coco.records:
        raise DatasetError(f"{annotations}: no usable images (run 'retinanet-xla data check' for details)")
    if config.model.num_classes < coco.mapping.num_labels:
        raise ConfigError(
            f"model.num_classes is {config.model.num_classes} but {annotations} needs {coco.mapping.num_labels} "
            f"with data.label_mapping {config.data.label_mapping}"
        )
    return coco


class BatchCounters:
    """Counts what the loader reports (boxes truncated, unreadable images) on the host side,
    before the batch goes to the device, and forwards only what the step needs."""

    def __init__(self, loader):
        self.loader = loader
        self.truncated = 0
        self.unreadable = 0

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        for batch in self.loader:
            self.truncated += int(batch["truncated"].sum())
            self.unreadable += int(batch["unreadable"].sum())
            yield {key: batch[key] for key in DEVICE_KEYS}


@dataclass
class TrainResult:
    summary: Dict
    checkpoint: Optional[Path]


def replica_batch_size(config: Config, world_size: int) -> int:
    if config.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size {config.train.batch_size} is not divisible by the {world_size} replicas")
    return config.train.batch_size // world_size


def train(config: Config, output_dir: Path, console: Optional[Console] = None) -> TrainResult:
    output_dir = Path(output_dir)
    world_size = config.runtime.num_devices or 1
    batch_size = replica_batch_size(config, world_size)
    if world_size != 1:
        raise ConfigError(f"runtime.num_devices is {world_size}; this version trains on one device (set it to 1)")
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")
    torch.manual_seed(config.train.seed)
    coco = dataset_split(config, "train", output_dir)

    runtime = Runtime(config.runtime.device)
    step_fn = build_train_step(config, runtime)
    model, loss_fn, optimizer = step_fn.model, step_fn.loss_fn, step_fn.optimizer
    image_size = tuple(config.data.image_size)

    dataset = DetectionDataset(coco.records, coco.mapping, image_size, config.data.max_boxes, config.data.augmentation)
    sampler = TrainSampler(len(dataset), batch_size, world_size, 0, config.train.seed)
    counters = BatchCounters(build_loader(dataset, sampler, batch_size, config.data.num_workers))
    batches = runtime.device_batches(counters)

    evaluator = None
    if config.train.eval_every > 0:
        from retinanet_xla.evaluation.evaluator import Evaluator

        val = dataset_split(config, "val", output_dir)
        val.mapping = coco.mapping  # detections are written with the training set's ids
        evaluator = Evaluator(config, val, runtime, show_progress=False)
    best_ap = float("-inf")

    def payload(step: int) -> Dict:
        return {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "loss": loss_fn.state_dict(),
            "config": config.to_dict(),
            "category_mapping": coco.mapping.to_dict(),
        }

    log = MetricsLog(output_dir, config.train.steps, console=console)
    log.message(
        f"training {config.train.steps} steps, batch {config.train.batch_size}, {len(dataset)} images, "
        f"{config.data.image_size[0]}x{config.data.image_size[1]}, on {runtime.device} -> {output_dir}"
    )
    state = {"first_loss": None, "last_loss": None, "diverged": None, "window_start": None, "eval": None}
    clock = Stopwatch()
    warm_clock = None
    warmup_compilations = 0
    checkpoint_path = None
    compile_seconds_first_step = 0.0

    def on_log(step: int, values: Dict[str, float]) -> None:
        if not all(map(lambda v: v == v and abs(v) != float("inf"), values.values())):
            state["diverged"] = step
            return
        now = clock.seconds()
        if state["window_start"] is not None:
            window_step, window_time = state["window_start"]
            values["images_per_second"] = (step - window_step) * config.train.batch_size / max(now - window_time, 1e-9)
        state["window_start"] = (step, now)
        values["truncated_images"] = float(counters.truncated)
        values["unreadable_images"] = float(counters.unreadable)
        state["last_loss"] = values["loss"]
        if state["first_loss"] is None:
            state["first_loss"] = values["loss"]
        log.write(step, values)

    try:
        for step in range(1, config.train.steps + 1):
            outputs = step_fn(next(batches))
            is_last = step == config.train.steps
            if step == 1 or step % config.train.log_every == 0 or is_last:
                runtime.on_step_end(lambda values, s=step: on_log(s, values), outputs)
            runtime.sync()
            if step == 1:
                runtime.wait()
                warmup_compilations = runtime.compilations()["count"]
                compile_seconds_first_step = clock.seconds()
                warm_clock = Stopwatch()
                log.message(f"step 1 done in {compile_seconds_first_step:.1f} s ({warmup_compilations} graphs compiled)")
            elif step % config.train.log_every == 0 or is_last:
                new = runtime.compilations()["count"] - warmup_compilations
                if new:
                    logger.warning("%d new XLA compilation(s) after warm-up (by step %d): the step graph changed", new, step)
            if state["diverged"] is not None:
                raise TrainingDiverged(
                    f"the loss is not finite at step {state['diverged']}; stopping (last checkpoint: {checkpoint_path or 'none'})"
                )
            log.advance(step)
            if step % config.train.checkpoint_every == 0 or is_last:
                checkpoint_path = output_dir / "checkpoints" / f"step_{step:08d}.pt"
                save_checkpoint(checkpoint_path, payload(step))
            if evaluator is not None and (step % config.train.eval_every == 0 or is_last):
                before = runtime.compilations()["count"]
                metrics = evaluator.evaluate(model)["metrics"]
                if state["eval"] is None:  # the first evaluation compiles the eval graph: warm-up too
                    warmup_compilations += runtime.compilations()["count"] - before
                log.write_eval(step, metrics)
                state["eval"] = {k: v for k, v in metrics.items() if isinstance(v, float)}
                if metrics["AP"] > best_ap:
                    best_ap = metrics["AP"]
                    save_checkpoint(output_dir / "checkpoints" / "best.pt", payload(step))
        runtime.wait()
    finally:
        log.close()

    compiled = runtime.compilations()
    warm_seconds = warm_clock.seconds() if warm_clock else 0.0
    warm_steps = config.train.steps - 1
    summary = {
        "steps": config.train.steps,
        "images": config.train.steps * config.train.batch_size,
        "wall_seconds": round(clock.seconds(), 3),
        "first_step_seconds": round(compile_seconds_first_step, 3),
        "images_per_second": round(warm_steps * config.train.batch_size / warm_seconds, 3) if warm_steps and warm_seconds else None,
        "compilations_total": compiled["count"],
        "compilations_after_warmup": compiled["count"] - warmup_compilations,
        "compile_seconds": round(compiled["seconds"], 3),
        "first_loss": state["first_loss"],
        "final_loss": state["last_loss"],
        "truncated_images": counters.truncated,
        "unreadable_images": counters.unreadable,
        "device": str(runtime.device),
        "checkpoint": str(checkpoint_path) if checkpoint_path else None,
        "eval": state["eval"],
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if summary["compilations_after_warmup"]:
        logger.warning("%d XLA compilation(s) happened after warm-up", summary["compilations_after_warmup"])
    return TrainResult(summary, checkpoint_path)
