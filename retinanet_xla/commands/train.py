"""``retinanet-xla train``: one training loop on every local replica."""

import contextlib
import logging
import time
from typing import Dict, Iterator, Optional

from retinanet_xla import storage
from retinanet_xla.config import Config
from retinanet_xla.data.splits import split_files
from retinanet_xla.device.choice import plan_launch
from retinanet_xla.device.runtime import Runtime
from retinanet_xla.distributed.launch import run_on_local_replicas
from retinanet_xla.distributed.preemption import PreemptionGuard, stop_file
from retinanet_xla.errors import ConfigError
from retinanet_xla.inference.report import write_report_or_warn
from retinanet_xla.rundir.directory import BEST, CheckpointDirectory
from retinanet_xla.rundir.lock import RunLock
from retinanet_xla.storage import Location, StagedDirectory
from retinanet_xla.training.periodic import TrainingDiverged, TrainingInterrupted
from retinanet_xla.training.setup import STAGED_LOGS
from retinanet_xla.training.trainer import Trainer

logger = logging.getLogger(__name__)


def train(config: Config, output_dir: Location, resume: bool = True, overwrite: bool = False) -> Dict:
    """Train on one device in this process, or with one replica per local device
    (``runtime.num_devices`` null: all of them). Returns the summary. ``resume=False`` in a
    directory holding an earlier run's checkpoints is refused unless ``overwrite``, which moves
    that run aside (``move_aside``). ``output_dir`` may be a bucket URL: checkpoints go there
    directly, logs through a local staging directory (``storage.StagedDirectory``)."""
    output_dir = storage.location(output_dir)
    plan = plan_launch(config.runtime)
    plan.check_batch(config.train.batch_size, "train.batch_size")  # fail before starting anything
    if config.train.eval_every > 0:
        plan.check_batch(config.eval.batch_size, "eval.batch_size")
    _check_weight_files(config)  # before config.yaml or the synthetic dataset is written
    run = StagedDirectory(output_dir)
    # The launcher's handlers turn SIGTERM/SIGINT into the STOP file every replica watches.
    with PreemptionGuard(stop_file(run.local)) as guard:
        summary = run_on_local_replicas(
            _train_replica,
            (config, output_dir, resume),
            plan,
            (TrainingDiverged, TrainingInterrupted),
            prepare=lambda: _prepared_run(config, output_dir, run, resume, overwrite, guard),
        )
    if summary is None:  # another process of a torchrun run: its master reports
        return None
    summary["report"] = write_report_or_warn(output_dir)
    return summary


@contextlib.contextmanager
def _prepared_run(
    config: Config, output_dir: Location, run: StagedDirectory, resume: bool, overwrite: bool, guard: PreemptionGuard
) -> Iterator[None]:
    """What a run does once before its replicas start, holding the run lock until they end:
    refuse to mix with an earlier run, clear what an interrupted one left, fetch the bucket's
    logs, write the synthetic dataset."""
    with RunLock(run.local):
        checkpoints = CheckpointDirectory(output_dir)
        existing = checkpoints.earlier_run()
        if existing and not resume and not overwrite:
            # Rotation keeps the highest step numbers: the old run's later checkpoints would
            # delete each new one as it is written, and a rerun would resume the old run; its
            # best.pt would be overwritten by the new run's first evaluation.
            steps = [storage.name(path) for path in existing if storage.name(path) != BEST]
            found = f"newest {steps[-1]}" if steps else BEST
            raise ConfigError(
                f"{output_dir}: holds checkpoints of an earlier run ({found}); "
                "--no-resume would mix the two runs: use another --output, or add --overwrite to move them aside"
            )
        if not resume and overwrite:
            moved = move_aside(output_dir)
            if moved is not None:
                logger.warning("moved the earlier run's checkpoints and logs to %s", moved)
        for leftover in checkpoints.remove_leftovers():
            logger.warning("removed %s, left by a save that was interrupted", leftover)
        if guard.signal_number is None:  # a stop request belongs to the run it stopped, not this one's
            stop_file(run.local).unlink(missing_ok=True)
        run.pull(STAGED_LOGS)  # a recreated VM continues the bucket's logs, not a stale local copy
        split_files(config, "train", run.local)
        if config.train.eval_every > 0:
            split_files(config, "val", run.local)
        if guard.signal_number is not None:  # stopped while preparing: the replicas stop at once
            stop_file(run.local).write_text(f"signal {guard.signal_number}\n")
        yield


# What a run writes into its output directory (the synthetic dataset stays: it is data).
RUN_ARTEFACTS = ("checkpoints", "metrics.jsonl", "summary.json", "tensorboard", "config.yaml", "eval", "export", "report")


def move_aside(output_dir: Location) -> Optional[Location]:
    """An earlier run's artefacts into ``OUTPUT/replaced-YYYYmmdd-HHMMSS/``: nothing is deleted."""
    found = [name for name in RUN_ARTEFACTS if storage.exists(storage.join(output_dir, name))]
    if not found:
        return None
    target = storage.join(output_dir, time.strftime("replaced-%Y%m%d-%H%M%S"))
    storage.make_dirs(target)
    for name in found:
        storage.move(storage.join(output_dir, name), storage.join(target, name))
    return target


def _check_weight_files(config: Config) -> None:
    """The files the model starts from exist (their content is checked when the model is built)."""
    weights, init_from = config.model.backbone.weights, config.model.init_from
    if weights and not storage.is_file(storage.location(weights)):
        raise ConfigError(f"model: backbone weights file {weights} does not exist")
    if init_from and not storage.exists(storage.location(init_from)):
        raise ConfigError(f"model.init_from {init_from}: no such file or directory")


def _train_replica(runtime: Runtime, config: Config, output_dir: Location, resume: bool) -> Dict:
    return Trainer(config, runtime, output_dir, resume).run()
