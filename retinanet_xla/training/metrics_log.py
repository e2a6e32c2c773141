"""Where logged values go: ``metrics.jsonl`` (one JSON object per log step), TensorBoard event
files, and a rich progress bar. Only the master replica writes."""

import json
import math
from pathlib import Path
from typing import Dict, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class MetricsLog:
    def __init__(self, output_dir: Path, total_steps: int, start_step: int = 0, console: Optional[Console] = None):
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = open(output_dir / "metrics.jsonl", "a", buffering=1)
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
