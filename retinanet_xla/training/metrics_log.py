"""Where logged values go: ``metrics.jsonl`` (one JSON object per log step), TensorBoard event
files, and a rich progress bar. Only the master replica writes."""

import json
import math
import os
from pathlib import Path
from typing import Dict, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _keep_rows_up_to(path: Path, step: int) -> None:
    """A resumed run redoes the steps after its checkpoint: rows past ``step`` (the run that was
    stopped logged them) are dropped, so every step appears once. Rewritten atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _row_step(line) <= step]
    if len(kept) != len(lines):
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(kept))
        os.replace(temporary, path)


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a line cut off by a kill: dropped


class MetricsLog:
    def __init__(self, output_dir: Path, total_steps: int, start_step: int = 0, console: Optional[Console] = None):
        from torch.utils.tensorboard import SummaryWriter

        path = output_dir / "metrics.jsonl"
        _keep_rows_up_to(path, start_step)
        self.jsonl = open(path, "a", buffering=1)
        self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="compiling")
        self.progress.start()

    def advance(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def write(self, step: int, values: Dict[str, float]) -> None:
        record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        for key, value in values.items():
            self.tensorboard.add_scalar(f"train/{key}", value, step)
        status = f"loss {values['loss']:.4f}  lr {values['lr']:.4g}"
        if "images_per_second" in values:
            status += f"  {values['images_per_second']:.1f} img/s"
        self.progress.update(self.task, completed=step, status=status)

    def write_eval(self, step: int, metrics: Dict[str, float]) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
        self.jsonl.write(json.dumps({"step": step, "eval": scalars}) + "\n")
        for key, value in scalars.items():
            self.tensorboard.add_scalar(f"eval/{key}", value, step)
        self.message(f"step {step}: eval AP {scalars['AP']:.3f}  AP50 {scalars['AP50']:.3f}  AP75 {scalars['AP75']:.3f}")

    def message(self, text: str) -> None:
        self.progress.console.print(text)

    def close(self) -> None:
        self.progress.stop()
        self.tensorboard.close()
        self.jsonl.close()


class SilentLog:
    """What replicas other than the master log: nothing."""

    def advance(self, step: int) -> None:
        pass

    def write(self, step: int, values: Dict[str, float]) -> None:
        pass

    def write_eval(self, step: int, metrics: Dict[str, float]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass
