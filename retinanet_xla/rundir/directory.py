"""The ``OUTPUT/checkpoints`` directory, local or in a bucket: naming, finding the newest valid
checkpoint, and keeping only the last K. ``open_checkpoint`` is how every command (train's
resume, eval, predict, export) turns a run directory into a checkpoint: one rule."""

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from retinanet_xla import storage
from retinanet_xla.errors import CheckpointError
from retinanet_xla.rundir.checkpoint import check_inference_fields, load_checkpoint, save_checkpoint
from retinanet_xla.storage import Location

logger = logging.getLogger(__name__)
BEST = "best.pt"


class CheckpointDirectory:
    def __init__(self, run_dir: Location, keep: int = 0):
        self.path = storage.join(storage.location(run_dir), "checkpoints")
        self.keep = keep  # 0 = keep all

    def step_path(self, step: int) -> Location:
        return storage.join(self.path, f"step_{step:08d}.pt")

    def remove_leftovers(self) -> List[Location]:
        """Temporary files of saves that a kill interrupted (``storage.write_file`` renames only
        a complete file): one checkpoint's size each. Call only while holding the run lock. (A
        bucket has none: an interrupted upload never becomes an object.)"""
        leftovers = [] if storage.is_url(self.path) else storage.glob(self.path, ".*.pt.*.tmp")
        for leftover in leftovers:
            storage.remove(leftover)
        return leftovers

    def step_checkpoints(self) -> List[Location]:
        """Step checkpoints, oldest first (the zero-padded names sort by step)."""
        return storage.glob(self.path, "step_*.pt")

    def earlier_run(self) -> List[Location]:
        """What an earlier run left that a new one would overwrite or mix with: its step
        checkpoints and its best checkpoint (kept alone when the step ones were deleted)."""
        best = storage.join(self.path, BEST)
        return self.step_checkpoints() + ([best] if storage.exists(best) else [])

    def newest_valid(self) -> Optional[Tuple[Location, Dict[str, Any]]]:
        """The newest checkpoint that loads; unreadable newer ones are reported and skipped."""
        for path in reversed(self.step_checkpoints()):
            try:
                return path, load_checkpoint(path)
            except CheckpointError as error:
                logger.warning("skipping unusable checkpoint: %s", error)
        return None

    def save(self, step: int, payload: Dict[str, Any]) -> Location:
        """Write the step's checkpoint, then drop all but the newest ``keep``: the one just
        written is complete before anything older is deleted."""
        path = self.step_path(step)
        save_checkpoint(path, payload)
        if self.keep > 0:
            for old in self.step_checkpoints()[: -self.keep]:
                storage.remove(old)
        return path

    def save_best(self, payload: Dict[str, Any]) -> Location:
        path = storage.join(self.path, BEST)
        save_checkpoint(path, payload)
        return path


def run_of(checkpoint: Location) -> Location:
    """``RUN/checkpoints/step_N.pt`` -> ``RUN``."""
    return storage.parent(storage.parent(checkpoint))


def local_run_files(checkpoint: Location) -> Path:
    """The local directory of a checkpoint's run: the run directory itself, or, for a run in a
    bucket, its staging directory (where a synthetic dataset is written, say)."""
    return storage.StagedDirectory(run_of(checkpoint)).local


def open_checkpoint(path: Location) -> Tuple[Location, Dict[str, Any]]:
    """A checkpoint file as given, or a run directory's newest valid step checkpoint (unusable
    newer ones are reported and skipped, as resume does), with its payload."""
    path = storage.location(path)
    if not storage.is_dir(path):
        found = path, load_checkpoint(path)
    else:
        found = CheckpointDirectory(path).newest_valid()
        if found is None:
            raise CheckpointError(f"{path}: no usable checkpoints/step_*.pt in this run directory")
    check_inference_fields(*found)
    return found
