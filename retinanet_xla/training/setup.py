"""A training run set up, before its loop, in the order it happens: the run's files, the
checkpoint it resumes from (or ``model.init_from`` for a fresh run), the step, its input and
its evaluator. ``set_up_run`` reads top to bottom; each function does one of those."""

import logging
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from rich.console import Console

from retinanet_xla import storage
from retinanet_xla.config import Config, save_config
from retinanet_xla.data.coco import CocoDataset
from retinanet_xla.data.splits import check_box_budget, dataset_split, resolve_max_boxes
from retinanet_xla.device.runtime import ReplicaGroup, Runtime
from retinanet_xla.errors import CheckpointError, ConfigError
from retinanet_xla.inference.evaluator import Evaluator
from retinanet_xla.rundir.checkpoint import load_checkpoint
from retinanet_xla.rundir.directory import CheckpointDirectory
from retinanet_xla.storage import Location, StagedDirectory
from retinanet_xla.training.batches import BatchCounters, train_batches
from retinanet_xla.training.build import build_train_step
from retinanet_xla.training.init_from import initialize_from
from retinanet_xla.training.metrics_log import MetricsLog, SilentLog
from retinanet_xla.training.state import RESUME_KEYS
from retinanet_xla.training.step import TrainStep

logger = logging.getLogger(__name__)
# The run's files that are not checkpoints. In a bucket they are written locally and uploaded
# after each checkpoint and at the end (``storage.StagedDirectory``): object stores cannot append.
STAGED_LOGS = ("metrics.jsonl", "tensorboard", "config.yaml", "summary.json")
Found = Tuple[Location, Dict]  # a checkpoint's location and its payload


@dataclass
class TrainingRun:
    """What one replica's loop starts from, and what its periodic work keeps up to date."""

    config: Config
    runtime: Runtime
    output_dir: Location
    files: StagedDirectory  # logs, config, summary; local when the output is
    coco: CocoDataset  # the training split
    checkpoints: CheckpointDirectory
    step_fn: TrainStep
    batches: Optional[BatchCounters] = None  # from the step it resumes at
    evaluator: Optional[Evaluator] = None
    start_step: int = 0
    best_ap: float = float("-inf")
    last_checkpoint: Optional[Location] = None
    init_report: Optional[str] = None  # what model.init_from did, for the start of the log
    losses: Dict[str, float] = field(default_factory=dict)  # "first" and "final", as logged
    last_eval: Optional[Dict[str, float]] = None

    @property
    def replicas(self) -> ReplicaGroup:
        return self.runtime.replicas

    def payload(self, step: int) -> Dict:
        """A checkpoint of this run at ``step``: the training state and what resuming needs."""
        return {
            **self.step_fn.state.payload(step),
            "best_ap": self.best_ap,
            "torch_rng_state": torch.get_rng_state(),
            "config": self.config.to_dict(),
            "category_mapping": self.coco.mapping.to_dict(),
        }


def set_up_run(config: Config, runtime: Runtime, output_dir: Location, resume: bool) -> TrainingRun:
    output_dir = storage.location(output_dir)
    files, coco = run_files(config, runtime.replicas, output_dir)
    checkpoints = CheckpointDirectory(output_dir, config.train.keep_checkpoints)
    found = resume_point(checkpoints, runtime.replicas) if resume else None
    init_from = InitFrom(config, coco) if config.model.init_from is not None and found is None else None
    step_fn = build_train_step(config, runtime, resolve_max_boxes(coco, config.data.max_boxes), init_from)
    run = TrainingRun(config, runtime, output_dir, files, coco, checkpoints, step_fn)
    if init_from is not None:
        run.init_report = init_from.report
    elif config.model.init_from is not None:
        run.init_report = f"model.init_from {config.model.init_from} ignored: resuming from {found[0]}"
    if found is not None:
        restore(run, *found)
    run.batches = train_batches(config, coco, runtime.replicas, start_batch=run.start_step)
    run.evaluator = evaluator(config, coco, runtime, files)
    return run


def open_log(run: TrainingRun, console: Optional[Console] = None):
    """The master's metrics log (``metrics.jsonl``, TensorBoard, the console), opened with what
    the run is about to do; a silent one on the other replicas."""
    c, local = run.config.train, run.files.local
    log = MetricsLog(local, c.steps, run.start_step, console) if run.replicas.is_master else SilentLog()
    log.message(
        f"training steps {run.start_step + 1}-{c.steps}, batch {c.batch_size} on {run.replicas.world} replica(s), "
        f"{len(run.coco.records)} images, {run.config.data.image_size[0]}x{run.config.data.image_size[1]}, "
        f"on {run.runtime.device} -> {run.output_dir}"
    )
    uploaded = f" (uploaded to {storage.join(run.output_dir, 'tensorboard')} at each checkpoint)" if run.files.remote else ""
    log.message(f"TensorBoard: tensorboard --logdir {local / 'tensorboard'}{uploaded}")
    if run.init_report:
        log.message(run.init_report)
    return log


def run_files(config: Config, replicas: ReplicaGroup, output_dir: Location) -> Tuple[StagedDirectory, CocoDataset]:
    """The run's local files and its training split, checked before anything is written; the
    master writes ``config.yaml``."""
    files = StagedDirectory(output_dir)
    files.local.mkdir(parents=True, exist_ok=True)
    coco = dataset_split(config, "train", files.local)
    _, truncated = check_box_budget(coco, config.data.max_boxes)
    if replicas.is_master:
        save_config(config, files.local / "config.yaml")
        if truncated:
            logger.warning(truncated)
    return files, coco


def resume_point(checkpoints: CheckpointDirectory, replicas: ReplicaGroup) -> Optional[Found]:
    """The newest valid checkpoint, as replica 0 sees it: every replica resumes from the one
    step it chose (two hosts listing a bucket a moment apart could otherwise disagree)."""
    found = checkpoints.newest_valid() if replicas.is_master else None
    if replicas.world == 1:
        return found
    step = replicas.from_master(found[1]["step"] if found else -1)
    if step < 0:
        return None
    if found is None:
        path = checkpoints.step_path(step)
        found = path, load_checkpoint(path)
    return found


class InitFrom:
    """``model.init_from`` for a fresh run: a trained detector's weights into the built model,
    on the host, its classes matched by name (``training/init_from.py``)."""

    def __init__(self, config: Config, coco: CocoDataset):
        self.config = config
        mapping = coco.mapping
        names = [mapping.names.get(i, str(i)) for i in mapping.category_ids]
        if mapping.mode == "raw":  # label = category id: slots without a category are unnamed
            by_id = dict(zip(mapping.category_ids, names))
            names = [by_id.get(label, f"(no category {label})") for label in range(config.model.num_classes)]
        self.names = names
        self.report: Optional[str] = None

    def __call__(self, model) -> None:
        anchors = model.anchor_generator.num_anchors_per_location
        source = storage.location(self.config.model.init_from)
        self.report = initialize_from(model, source, self.names, self.config.model.init_class_map, anchors).line()


def restore(run: TrainingRun, path: Location, payload: Dict) -> None:
    """The checkpoint's state, RNG and best AP into the run, ready for its next step."""
    missing = [key for key in RESUME_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing)}, which resuming needs; use --no-resume with another --output")
    steps = run.config.train.steps
    if payload["step"] > steps:
        raise ConfigError(
            f"{path}: the checkpoint is at step {payload['step']}, past train.steps {steps}: "
            "raise train.steps to train on, or use --no-resume with another --output"
        )
    state = run.step_fn.state
    try:
        state.restore(payload)
    except (RuntimeError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path}: does not fit this config ({first_line}); use --no-resume or another --output") from None
    torch.set_rng_state(payload["torch_rng_state"])
    run.start_step, run.best_ap = payload["step"], payload.get("best_ap", float("-inf"))
    run.last_checkpoint = path
    run.runtime.prepare_state(state.tensors())  # before the first step


def evaluator(config: Config, coco: CocoDataset, runtime: Runtime, files: StagedDirectory) -> Optional[Evaluator]:
    """``train.eval_every``'s evaluator: every replica evaluates its shard of the val split."""
    if config.train.eval_every <= 0:
        return None
    val = dataset_split(config, "val", files.local)
    val.mapping = coco.mapping  # detections are written with the training set's ids
    return Evaluator(config, val, runtime, show_progress=False)
