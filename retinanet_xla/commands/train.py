"""``retinanet-xla train``: one training loop on every local replica."""

from pathlib import Path
from typing import Dict

from retinanet_xla.config import Config
from retinanet_xla.data.splits import split_files
from retinanet_xla.distributed.launch import local_replica_count, run_on_local_replicas
from retinanet_xla.distributed.preemption import PreemptionGuard, stop_file
from retinanet_xla.distributed.replicas import Replicas
from retinanet_xla.training.trainer import Trainer, TrainingDiverged, TrainingInterrupted, check_batch_sizes


def train(config: Config, output_dir: Path, resume: bool = True) -> Dict:
    """Train on one device in this process, or with one replica per local XLA device
    (``runtime.num_devices`` null: all of them). Returns the summary."""
    output_dir = Path(output_dir)
    stop_file(output_dir).unlink(missing_ok=True)  # a stop request belongs to the run it stopped
    count = local_replica_count(config.runtime.device, config.runtime.num_devices)
    if count is not None:
        check_batch_sizes(config, Replicas(world=count))  # fail before starting anything
    split_files(config, "train", output_dir)
    if config.train.eval_every > 0:
        split_files(config, "val", output_dir)
    # The launcher's handlers turn SIGTERM/SIGINT into the STOP file every replica watches.
    with PreemptionGuard(stop_file(output_dir)):
        return run_on_local_replicas(
            _train_replica, (config, output_dir, resume), config, (TrainingDiverged, TrainingInterrupted)
        )


def _train_replica(replicas: Replicas, config: Config, output_dir: Path, resume: bool) -> Dict:
    return Trainer(config, output_dir, resume, replicas=replicas).run()
