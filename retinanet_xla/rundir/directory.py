"""The ``OUTPUT/checkpoints`` directory: naming, finding the newest valid checkpoint, and
keeping only the last K. ``open_checkpoint`` is how every command (train's resume, eval,
predict, export) turns a run directory into a checkpoint: one rule."""

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from retinanet_xla.errors import CheckpointError
from retinanet_xla.rundir.checkpoint import load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)
BEST = "best.pt"


class CheckpointDirectory:
    def __init__(self, run_dir: Path, keep: int = 0):
        self.path = Path(run_dir) / "checkpoints"
        self.keep = keep  # 0 = keep all

    def step_path(self, step: int) -> Path:
        return self.path / f"step_{step:08d}.pt"

    def remove_leftovers(self) -> List[Path]:
        """Temporary files of saves that a kill interrupted (``save_checkpoint`` renames only a
        complete file): one checkpoint's size each. Call only while holding the run lock."""
        leftovers = sorted(self.path.glob(".*.pt.*.tmp")) if self.path.is_dir() else []
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
        return leftovers

    def step_checkpoints(self) -> List[Path]:
        """Step checkpoints, oldest first (the zero-padded names sort by step)."""
        return sorted(self.path.glob("step_*.pt"))

    def newest_valid(self) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """The newest checkpoint that loads; unreadable newer ones are reported and skipped."""
        for path in reversed(self.step_checkpoints()):
            try:
                return path, load_checkpoint(path)
            except CheckpointError as error:
                logger.warning("skipping unusable checkpoint: %s", error)
        return None

    def save(self, step: int, payload: Dict[str, Any]) -> Path:
        path = self.step_path(step)
        save_checkpoint(path, payload)
        if self.keep > 0:
            for old in self.step_checkpoints()[: -self.keep]:
                old.unlink(missing_ok=True)
        return path

    def save_best(self, payload: Dict[str, Any]) -> Path:
        path = self.path / BEST
        save_checkpoint(path, payload)
        return path


def open_checkpoint(path: Path) -> Tuple[Path, Dict[str, Any]]:
    """A checkpoint file as given, or a run directory's newest valid step checkpoint (unusable
    newer ones are reported and skipped, as resume does), with its payload."""
    path = Path(path)
    if not path.is_dir():
        return path, load_checkpoint(path)
    found = CheckpointDirectory(path).newest_valid()
    if found is None:
        raise CheckpointError(f"{path}: no usable checkpoints/step_*.pt in this run directory")
    return found
