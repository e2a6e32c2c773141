"""Preemption safety through the real CLI on CPU XLA: exact resume after SIGKILL, SIGTERM,
corrupt checkpoints, divergence."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from retinanet_xla.rundir.checkpoint import load_checkpoint, save_checkpoint
from tests.cli_helpers import train_command

pytestmark = pytest.mark.xla

N = 4
STEPS = [
    f"train.steps={2 * N}",
    "train.log_every=1",
    f"train.checkpoint_every={N}",
    "train.schedule.warmup_steps=2",
    "train.schedule.kind=step",  # the rate must not depend on train.steps: runs of different length share steps 1..N
]


def command(output: Path, *extra: str):
    return train_command(output, *STEPS, *extra)


ENV = {**os.environ, "PJRT_DEVICE": "CPU"}


def run(output: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command(output, *extra), capture_output=True, text=True, timeout=timeout, env=ENV)


def start(output: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(command(output, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def losses(output: Path):
    return {
        line["step"]: line["loss"]
        for line in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())
        if "loss" in line
    }


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, compile_cache):
    output = tmp_path_factory.mktemp("straight")
    result = run(output, f"runtime.compile_cache={compile_cache}")
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def test_resume_after_sigkill_continues_the_same_trajectory(straight, tmp_path):
    # Slow steps a little (bigger batch of work per step is not needed: we poll every 5 ms).
    process = start(tmp_path, f"train.steps={20 * N}")  # long run; killed right after step N
    wait_for(tmp_path / "checkpoints" / f"step_{N:08d}.pt", process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (tmp_path / "checkpoints" / f"step_{2 * N:08d}.pt").exists(), "the run got past step 2N before the kill"

    resumed = run(tmp_path)  # train.steps = 2N again: resumes at N, ends at 2N
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from_step"] == N and summary["compilations_after_warmup"] == 0
    assert "resuming from" in resumed.stderr

    expected, actual = losses(straight), losses(tmp_path)
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 2 * N + 1))  # the steps the killed run logged past N, once
    for step in range(N + 1, 2 * N + 1):
        assert actual[step] == pytest.approx(expected[step], abs=1e-5), step
    final = load_checkpoint(tmp_path / "checkpoints" / f"step_{2 * N:08d}.pt")
    reference = load_checkpoint(straight / "checkpoints" / f"step_{2 * N:08d}.pt")
    for name, tensor in reference["model"].items():
        torch.testing.assert_close(final["model"][name], tensor, rtol=0, atol=1e-5, msg=name)
    for a, b in zip(final["optimizer"]["momentum_buffers"], reference["optimizer"]["momentum_buffers"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_sigterm_saves_the_step_reached_and_exits_75(tmp_path):
    process = start(tmp_path, "train.steps=1000")
    wait_for(tmp_path / "checkpoints" / f"step_{N:08d}.pt", process)
    second = run(tmp_path, "train.steps=1000")  # the same --output while the first one writes
    assert second.returncode == 2 and second.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}: another train run (pid {process.pid}) is writing to this directory; wait for it or use another --output"
    )
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    assert "stopped by signal 15 at step" in stderr and "run the same command again to resume" in stderr
    reached = max(int(p.stem.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*.pt"))
    assert reached >= N and load_checkpoint(tmp_path / "checkpoints" / f"step_{reached:08d}.pt")["step"] == reached
    resumed = run(tmp_path, f"train.steps={reached + 2}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["resumed_from_step"] == reached


def test_truncated_newest_checkpoint_is_skipped_and_old_ones_rotate(straight, tmp_path):
    output = tmp_path / "run"
    for checkpoint in (straight / "checkpoints").glob("step_*.pt"):
        (output / "checkpoints").mkdir(parents=True, exist_ok=True)
        (output / "checkpoints" / checkpoint.name).write_bytes(checkpoint.read_bytes())
    newest = output / "checkpoints" / f"step_{2 * N:08d}.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a write cut short
    leftover = output / "checkpoints" / f".step_{2 * N:08d}.pt.x1y2z3.tmp"  # a save killed before its rename
    leftover.write_bytes(b"partial")
    (output / "synthetic").symlink_to(straight / "synthetic")
    result = run(output, f"train.steps={3 * N}", "train.keep_checkpoints=2", "train.checkpoint_every=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping unusable checkpoint: {newest}: not a readable checkpoint" in result.stderr
    assert not leftover.exists() and f"removed {leftover}, left by a save that was interrupted" in result.stderr
    assert json.loads((output / "summary.json").read_text())["resumed_from_step"] == N
    assert sorted(p.name for p in (output / "checkpoints").glob("step_*.pt")) == [
        f"step_{3 * N - 2:08d}.pt",
        f"step_{3 * N:08d}.pt",
    ]


def test_divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    result = run(
        tmp_path,
        "train.schedule.base_lr=1.0e+8",
        "train.schedule.warmup_steps=0",
        "train.grad_clip_norm=0.0",
        "train.checkpoint_every=1",
        "train.steps=30",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    message = [line for line in result.stderr.splitlines() if line.startswith("error: the loss is not finite at step")]
    assert len(message) == 1 and "Traceback" not in result.stderr
    step = int(message[0].split("at step ")[1].split(";")[0])
    checkpoints = sorted((tmp_path / "checkpoints").glob("step_*.pt"))
    assert all(int(p.stem.split("_")[1]) < step for p in checkpoints)
    if checkpoints:
        last = load_checkpoint(checkpoints[-1])
        assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
        assert str(checkpoints[-1]) in message[0]


def assert_no_resume_refused(output: Path, found: str) -> None:
    """``train --no-resume`` into OUTPUT is refused in one line naming what the earlier run left."""
    result = subprocess.run(
        command(output, "train.steps=2") + ["--no-resume"], capture_output=True, text=True, timeout=600, env=ENV
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {output}: holds checkpoints of an earlier run ({found}); "
        "--no-resume would mix the two runs: use another --output, or add --overwrite to move them aside"
    )


def test_no_resume_refuses_a_directory_holding_an_earlier_runs_checkpoints(straight, tmp_path):
    """Rotation keeps the highest steps: the old run's later checkpoints would delete every new
    one, and a rerun would resume the old run. Nothing is written, nothing lost."""
    old = tmp_path / "checkpoints" / f"step_{2 * N:08d}.pt"
    old.parent.mkdir(parents=True)
    old.write_bytes((straight / "checkpoints" / old.name).read_bytes())
    assert_no_resume_refused(tmp_path, f"newest {old.name}")
    assert old.read_bytes() == (straight / "checkpoints" / old.name).read_bytes()
    assert not (tmp_path / "config.yaml").exists()
    (tmp_path / "metrics.jsonl").write_text('{"step": 8, "loss": 1.0}\n')
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "index.html").write_text("the earlier run's page")
    # Told to start over: the earlier run is moved aside, whole, and the new one starts at step 1.
    result = subprocess.run(
        command(tmp_path, "train.steps=2") + ["--no-resume", "--overwrite"], capture_output=True, text=True, timeout=600, env=ENV
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (aside,) = tmp_path.glob("replaced-*")
    assert f"moved the earlier run's checkpoints and logs to {aside}" in result.stderr
    assert (aside / "checkpoints" / old.name).read_bytes() == (straight / "checkpoints" / old.name).read_bytes()
    assert (aside / "metrics.jsonl").read_text() == '{"step": 8, "loss": 1.0}\n'
    assert (aside / "report" / "index.html").read_text() == "the earlier run's page"
    assert sorted(losses(tmp_path)) == [1, 2]
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*.pt")] == ["step_00000002.pt"]


def test_no_resume_refuses_a_directory_whose_run_kept_only_its_best_checkpoint(straight, tmp_path):
    """A run whose step checkpoints were deleted to save space still holds its best.pt and
    logs: starting over there would overwrite both."""
    best = tmp_path / "checkpoints" / "best.pt"
    best.parent.mkdir(parents=True)
    best.write_bytes((straight / "checkpoints" / f"step_{2 * N:08d}.pt").read_bytes())
    (tmp_path / "metrics.jsonl").write_text((straight / "metrics.jsonl").read_text())
    assert_no_resume_refused(tmp_path, "best.pt")
    assert best.read_bytes() == (straight / "checkpoints" / f"step_{2 * N:08d}.pt").read_bytes()
    assert (tmp_path / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()


def test_a_checkpoint_without_what_resuming_needs_is_one_line(straight, tmp_path):
    payload = load_checkpoint(straight / "checkpoints" / f"step_{N:08d}.pt")
    del payload["torch_rng_state"]
    save_checkpoint(tmp_path / "checkpoints" / f"step_{N:08d}.pt", payload)
    (tmp_path / "synthetic").symlink_to(straight / "synthetic")
    result = run(tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(f"step_{N:08d}.pt: lacks torch_rng_state, which resuming needs; use --no-resume with another --output")
    )


def test_no_resume_starts_over_and_finds_every_graph_in_the_persistent_cache(straight, compile_cache, tmp_path):
    output = tmp_path / "again"
    output.mkdir()
    (output / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n')  # a run killed before its first checkpoint
    args = command(output, "train.steps=2", f"runtime.compile_cache={compile_cache}") + ["--no-resume"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["resumed_from_step"] == 0
    assert sorted(losses(output)) == [1, 2]  # the killed run's row is gone
    # A second launch of the same config traces the very graphs of the first: each one is in
    # the persistent cache (torch_xla 2.9's CPU client then fails to load it and compiles
    # again, counted as a load failure; TPU loads it: docs/performance.md).
    first = json.loads((straight / "summary.json").read_text())
    assert first["cache_misses"] == first["compilations_total"] >= 1 and first["cache_hits"] == 0
    assert summary["cache_misses"] == 0
    assert summary["cache_hits"] + summary["cache_load_failures"] == first["cache_misses"]


ADAMW = ["train.optimizer.name=adamw", "train.schedule.base_lr=1.0e-3", "train.optimizer.weight_decay=0.05"]


def test_adamw_compiles_once_and_resumes_exactly(tmp_path):
    """AdamW's state (moments and per-parameter step counts) is part of the one graph, in the
    checkpoint, and restored: a run stopped at step N and resumed ends where a straight run does."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    result = run(straight, *ADAMW, "train.optimizer.weight_decay_norm_and_bias=false")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["compilations_after_warmup"] == 0
    first = run(split, *ADAMW, "train.optimizer.weight_decay_norm_and_bias=false", f"train.steps={N}")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run(split, *ADAMW, "train.optimizer.weight_decay_norm_and_bias=false")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((split / "summary.json").read_text())
    assert summary["resumed_from_step"] == N and summary["compilations_after_warmup"] == 0

    final = load_checkpoint(split / "checkpoints" / f"step_{2 * N:08d}.pt")
    reference = load_checkpoint(straight / "checkpoints" / f"step_{2 * N:08d}.pt")
    for name, tensor in reference["model"].items():
        torch.testing.assert_close(final["model"][name], tensor, rtol=0, atol=1e-5, msg=name)
    assert sorted(reference["optimizer"]) == ["exp_avg_sqs", "exp_avgs", "steps"]
    assert {float(step) for step in reference["optimizer"]["steps"]} == {2.0 * N}
    for key, tensors in reference["optimizer"].items():
        for a, b in zip(final["optimizer"][key], tensors):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=key)
    # Resuming one optimizer's run with the other is refused in one line, nothing written.
    refused = run(split, f"train.steps={3 * N}")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "does not fit this config (the checkpoint's optimizer state (exp_avg_sqs, exp_avgs, steps) is not "
            "train.optimizer.name=sgd's); use --no-resume or another --output"
        )
    )


def test_resuming_past_train_steps_is_one_line_not_a_run_of_negative_length(straight, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / f"step_{2 * N:08d}.pt").write_bytes(
        (straight / "checkpoints" / f"step_{2 * N:08d}.pt").read_bytes()
    )
    (tmp_path / "synthetic").symlink_to(straight / "synthetic")
    result = run(tmp_path, f"train.steps={N}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"step_{2 * N:08d}.pt: the checkpoint is at step {2 * N}, past train.steps {N}: "
            "raise train.steps to train on, or use --no-resume with another --output"
        )
    )
    assert not (tmp_path / "summary.json").exists()
