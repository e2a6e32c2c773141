"""One checkpoint format across backends: a run trained on torch-xla resumes and evaluates on
the native backend, and the other way round. Each environment's suite drives the other
environment's console script (`make test` names it), so both directions run through the real
CLI: tests/native/test_from_xla.py and tests/test_to_xla_e2e.py."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from retinanet_xla.rundir.checkpoint import load_checkpoint
from tests.cli_helpers import train_command
from tests.replica_checks import update_differences

N = 2
# A schedule independent of train.steps (runs of different length share steps 1..N), no
# augmentation randomness beyond the sampler's, logs at every step.
STEPS = [
    "train.log_every=1",
    "train.checkpoint_every=1",
    "train.keep_checkpoints=10",
    "train.schedule.warmup_steps=2",
    "train.schedule.kind=step",
]
XLA = ["runtime.device=xla"]
NATIVE = ["runtime.device=cpu", "runtime.compile=false"]
XLA_ENV = {**os.environ, "PJRT_DEVICE": "CPU"}
NATIVE_ENV = {key: value for key, value in os.environ.items() if key not in ("PJRT_DEVICE", "CPU_NUM_DEVICES")}


def other_script(variable: str, environment: str) -> Path:
    bin_dir = os.environ.get(variable)
    if not bin_dir or not (Path(bin_dir) / "retinanet-xla").exists():
        pytest.fail(f"set {variable} to the {environment} environment's bin/ (make test does)")
    return Path(bin_dir) / "retinanet-xla"


def command(script: Path, output: Path, steps: int, backend) -> list:
    return [str(script), *train_command(output, *STEPS, f"train.steps={steps}", *backend)[1:]]


def metrics(output: Path) -> dict:
    lines = map(json.loads, (output / "metrics.jsonl").read_text().splitlines())
    return {line["step"]: line for line in lines if "loss" in line}


def run(args, env) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# Both runs continue from the same checkpoint at step N, one on the backend that wrote it, one
# on the other; their weights at 2N differ by the backends' float32 rounding, and by an anchor
# whose IoU sits on a matching threshold, which XLA:CPU and eager can round to either side
# (step 1 of these runs: 40 and 41 foreground anchors). Measured here (2-core AMD EPYC,
# 2026-12-03), relative to the two steps' update: parameters 0.085 (XLA:CPU to native). A resume
# that lost the optimizer's momentum gives 0.71.
UPDATE_TOLERANCE = 0.3


def assert_the_run_continues_on_the_other_backend(first: tuple, second: tuple, output: Path) -> None:
    """N steps on ``first`` (script, backend, environment), then the same command for 2N steps
    on ``second`` resumes them: step, learning rate and weights continue as they do on
    ``first`` itself."""
    run(command(first[0], output / "crossed", N, first[1]), first[2])
    shutil.copytree(output / "crossed", output / "stayed")
    crossed = run(command(second[0], output / "crossed", 2 * N, second[1]), second[2])
    assert "resuming from" in crossed.stderr
    run(command(first[0], output / "stayed", 2 * N, first[1]), first[2])

    summary = json.loads((output / "crossed" / "summary.json").read_text())
    assert summary["resumed_from_step"] == N and summary["steps"] == 2 * N
    ours, theirs = metrics(output / "crossed"), metrics(output / "stayed")
    assert sorted(ours) == sorted(theirs) == list(range(1, 2 * N + 1))
    for step in range(N + 1, 2 * N + 1):
        assert ours[step]["lr"] == pytest.approx(theirs[step]["lr"], rel=1e-6), step
    start = load_checkpoint(output / "crossed" / "checkpoints" / f"step_{N:08d}.pt")["model"]
    relative = update_differences(output / "crossed", output / "stayed", 2 * N, start)
    assert relative["parameters"] < UPDATE_TOLERANCE, relative


def assert_the_crossed_run_evaluates(script: Path, output: Path, device: str, env) -> None:
    """``eval`` of the run continued on the other backend, on that backend."""
    evaluated = run([str(script), "eval", str(output / "crossed"), "--set", f"runtime.device={device}"], env)
    metrics = json.loads(next((output / "crossed" / "eval").glob("step_*/metrics.json")).read_text())
    assert set(metrics) >= {"AP", "AP50", "AP75"} and "AP" in evaluated.stdout
