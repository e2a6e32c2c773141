"""Run the real ``retinanet-xla`` entry point in-process and capture what a user would see."""

import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(capsys, monkeypatch, *args: str) -> CliResult:
    from retinanet_xla.cli import main

    monkeypatch.setattr(sys, "argv", ["retinanet-xla", *map(str, args)])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


# A tiny model and dataset for end-to-end runs on the CPU XLA device (compiles in ~20 s).
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "retinanet-xla"
TINY = [
    "data.image_size=[64,64]",
    "data.max_boxes=auto",  # 8: the synthetic images hold up to 5
    "data.num_workers=1",
    "data.synthetic.train_images=24",
    "data.synthetic.val_images=7",
    "data.synthetic.seed=2",
    "model.fpn_channels=32",
    "model.head.convs=1",
    "train.batch_size=4",
    "eval.batch_size=4",
]


# Training with an evaluation every 20 steps, each after that step's checkpoint, at a rate and
# score threshold at which even step 20 has detections to score (tests of evaluation during training).
EVALUATING = [
    "train.eval_every=20",
    "train.checkpoint_every=20",
    "train.log_every=10",
    "train.schedule.base_lr=0.04",
    "train.schedule.warmup_steps=5",
    "eval.score_threshold=0.001",
]


def set_options(overrides) -> list:
    """``["--set", o1, "--set", o2, ...]``."""
    return [item for override in overrides for item in ("--set", override)]


def train_command(output, *overrides: str):
    """``retinanet-xla train configs/smoke.yaml --output OUTPUT`` with TINY and ``overrides``."""
    args = [str(SCRIPT), "train", str(ROOT / "configs" / "smoke.yaml"), "--output", str(output)]
    for override in (*TINY, *overrides):
        args += ["--set", override]
    return args
