"""Where logged values go: ``metrics.jsonl`` (one JSON object per log step), TensorBoard event
files, and a rich progress bar. Only the master replica writes."""

import datetime
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from retinanet_xla.rundir.rows import metrics_rows, row_step


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
    step = row_step(line)
    return float("inf") if step is None else step  # a line cut off by a kill, or not ours: dropped


def logged_evaluations(path: Path) -> set:
    """The steps whose evaluation metrics ``metrics.jsonl`` holds."""
    if not path.is_file():
        return set()
    return {row["step"] for row in metrics_rows(path.read_text()).evaluations}


class MetricsLog:
    def __init__(self, output_dir: Path, total_steps: int, start_step: int = 0, console: Optional[Console] = None):
        from torch.utils.tensorboard import SummaryWriter

        path = output_dir / "metrics.jsonl"
        _keep_rows_up_to(path, start_step)
        self.jsonl = open(path, "a", buffering=1)
        self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
        # The run's story goes to stdout (warnings and errors go to stderr): `train ... > log.txt`
        # keeps it. In a terminal a live bar; redirected to a file (nohup, a TPU VM job, CI) a
        # bar shows nothing until the end, so every log step prints one plain line instead.
        self.console = console or Console()
        self.plain = not self.console.is_terminal
        self.total_steps, self.started = total_steps, (start_step, time.monotonic())
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=self.plain,
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
        if self.plain:
            self.message(self._plain_line(step, values))

    def _plain_line(self, step: int, values: Dict[str, float]) -> str:
        """``step 100/800  loss 2.41 (cls 0.62 + box 0.18 x weight)  lr 0.01  16.8 img/s  ETA 0:03:12``."""
        line = (
            f"step {step}/{self.total_steps}  loss {values['loss']:.4f} "
            f"(cls {values['cls_loss']:.4f} + weighted box {values['loss'] - values['cls_loss']:.4f})  lr {values['lr']:.4g}"
        )
        if "images_per_second" in values:
            line += f"  {values['images_per_second']:.1f} img/s"
        if "utilisation" in values:
            line += f" ({values['utilisation']:.0%} of peak)"
        first_step, first_time = self.started
        if step > first_step + 1:
            seconds_per_step = (time.monotonic() - first_time) / (step - first_step)
            line += f"  ETA {datetime.timedelta(seconds=round(seconds_per_step * (self.total_steps - step)))}"
        return line

    def write_eval(self, step: int, metrics: Dict) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
        per_category = metrics.get("per_category_AP", {})
        self.jsonl.write(json.dumps({"step": step, "eval": {**scalars, "per_category_AP": per_category}}) + "\n")
        for key, value in scalars.items():
            self.tensorboard.add_scalar(f"eval/{key}", value, step)
        for name, value in per_category.items():
            if value >= 0:  # -1: no ground truth of that category in the split
                self.tensorboard.add_scalar(f"eval_AP_per_category/{name}", value, step)
        self.message(f"step {step}: eval AP {scalars['AP']:.3f}  AP50 {scalars['AP50']:.3f}  AP75 {scalars['AP75']:.3f}")

    def message(self, text: str) -> None:
        # One line each, unwrapped: a log file is read with grep, not at 80 columns.
        self.progress.console.print(text, soft_wrap=True, markup=False, highlight=False)

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
