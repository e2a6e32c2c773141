"""Two replicas on the CPU as two processes joined by torch.distributed (gloo), through the real
CLI: the update of one process with the same global batch, cross-replica BatchNorm statistics
included, and an exact resume after the whole run is killed."""

import json
import subprocess
import time

import pytest
import torch

from retinanet_xla.rundir.checkpoint import load_checkpoint
from tests.cli_helpers import ROOT, SCRIPT, train_command
from tests.native.helpers import ENV, cli, kill_group, metrics
from tests.replica_checks import SETTINGS, UPDATE_TOLERANCES, initial_weights, update_differences

pytestmark = pytest.mark.native

# Eager steps (the comparison is of the replica group, not of the compiler), and a schedule that
# does not depend on train.steps, so that a longer killed run shares steps 1-3 with these.
NATIVE = [*SETTINGS, "runtime.device=cpu", "runtime.compile=false", "train.schedule.kind=step"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    output = tmp_path_factory.mktemp("two_processes")
    result = cli(*train_command(output, *NATIVE, "runtime.num_devices=2")[1:])
    assert result.returncode == 0, result.stderr[-4000:]
    return output, result


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    output = tmp_path_factory.mktemp("one_process")
    result = cli(*train_command(output, *NATIVE, "runtime.num_devices=1")[1:])
    assert result.returncode == 0, result.stderr[-4000:]
    return output


def test_two_processes_train_with_one_log_and_every_checkpoint(two_processes):
    output, result = two_processes
    summary = json.loads((output / "summary.json").read_text())
    assert summary["replicas"] == 2 and summary["images"] == 3 * 4  # the global batch
    assert sorted(p.name for p in (output / "checkpoints").glob("step_*.pt")) == [f"step_0000000{s}.pt" for s in (1, 2, 3)]
    assert [step for step in metrics(output)] == [1, 2, 3]
    assert result.stdout.count("training steps 1-3, batch 4 on 2 replica(s)") == 1
    assert summary["eval"]["AP"] >= 0.0  # the 7 validation images, sharded over both processes


def test_two_processes_make_the_update_of_one_with_the_global_batch(two_processes, one_process):
    """The same bounds as the XLA replicas' test (tests/replica_checks.py), statistics of
    cross-replica BatchNorm included."""
    output, _ = two_processes
    start = initial_weights(one_process)
    for step, (parameters, statistics) in UPDATE_TOLERANCES.items():
        relative = update_differences(output, one_process, step, start)
        assert relative["parameters"] < parameters and relative["statistics"] < statistics, f"step {step}: {relative}"
    two, one = metrics(output), metrics(one_process)
    assert two[1]["loss"] == pytest.approx(one[1]["loss"], rel=1e-5)
    assert two[1]["num_foreground"] == pytest.approx(one[1]["num_foreground"] / 2)  # a mean over replicas


def test_sigkill_of_the_whole_run_then_the_same_command_resumes_exactly(two_processes, tmp_path):
    output, _ = two_processes
    command = train_command(tmp_path, *NATIVE, "runtime.num_devices=2", "train.steps=300")
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, cwd=ROOT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "checkpoints" / "step_00000001.pt").exists():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
    finally:
        kill_group(process)  # the launcher and both replica processes, as a lost VM would
        process.wait(timeout=60)
    assert not (tmp_path / "checkpoints" / "step_00000003.pt").exists(), "the run got past step 3 before the kill"

    resumed = cli(*train_command(tmp_path, *NATIVE, "runtime.num_devices=2")[1:], script=SCRIPT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["resumed_from_step"] >= 1
    expected, actual = metrics(output), metrics(tmp_path)
    for step in (2, 3):
        assert actual[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-5), step
    final = load_checkpoint(tmp_path / "checkpoints" / "step_00000003.pt")["model"]
    for name, tensor in load_checkpoint(output / "checkpoints" / "step_00000003.pt")["model"].items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_the_same_command_under_torchrun_joins_its_processes(tmp_path):
    """An external ``torchrun`` (how several hosts join) starts the processes; each is one
    replica of its process group."""
    torchrun = SCRIPT.parent / "torchrun"
    args = ["--nproc-per-node", "2", "-m", "retinanet_xla", "bench", "configs/smoke.yaml", "--steps", "2"]
    args += ["--json", tmp_path / "b.json"]
    for override in ("runtime.device=cpu", "data.image_size=[64,64]", "model.fpn_channels=32"):
        args += ["--set", override]
    result = cli(*args, script=torchrun, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # smoke.yaml says runtime.num_devices: 1; torchrun started 2: it decides, said once.
    assert result.stderr.count("runtime.num_devices 1 yields to torchrun's 2 process(es) per host") == 1, result.stderr
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench["replicas"] == 2 and bench["device"] == "cpu"
    # One summary, the master's: the other process reports nothing.
    summaries = [line for line in result.stdout.splitlines() if " replica(s): first step " in line]
    assert len(summaries) == 1 and summaries[0].startswith("cpu x 2 replica(s)"), result.stdout


def test_train_under_torchrun_prepares_the_run_once_and_makes_the_spawned_runs_update(two_processes, tmp_path):
    """``torchrun ... -m retinanet_xla train``, as the README shows: every process runs the
    command, the master alone takes the run lock and writes the shared files while the other
    waits, and the run is the one that ``--devices 2`` trains (same weights at step 3)."""
    spawned, _ = two_processes
    torchrun = SCRIPT.parent / "torchrun"
    args = ["--nproc-per-node", "2", "-m", "retinanet_xla", *train_command(tmp_path, *NATIVE, "runtime.num_devices=null")[1:]]
    result = cli(*args, script=torchrun, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("training steps 1-3, batch 4 on 2 replica(s)") == 1, result.stdout
    assert "another train run" not in result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["replicas"] == 2 and [step for step in metrics(tmp_path)] == [1, 2, 3]
    final = load_checkpoint(tmp_path / "checkpoints" / "step_00000003.pt")["model"]
    for name, tensor in load_checkpoint(spawned / "checkpoints" / "step_00000003.pt")["model"].items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_sigterm_to_torchrun_saves_the_step_on_every_rank_and_exits_75_through_our_torchrun(tmp_path):
    """The outer loop the docs give ("rerun while 75") under torchrun: its SIGTERM reaches both
    ranks, which agree on a step, save it and exit 75; ``retinanet_xla.distributed.torchrun``
    ends with 75 where torch's own torchrun ends with 1."""
    command = [str(SCRIPT.parent / "python"), "-m", "retinanet_xla.distributed.torchrun", "--nproc-per-node", "2"]
    command += ["-m", "retinanet_xla", *train_command(tmp_path, *NATIVE, "runtime.num_devices=null", "train.steps=500")[1:]]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "metrics.jsonl").is_file() or not (tmp_path / "metrics.jsonl").read_text().strip():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training never logged a step"
            time.sleep(0.05)
        process.send_signal(15)  # SIGTERM, as a TPU VM's preemption notice
        stdout, stderr = process.communicate(timeout=300)
    finally:
        kill_group(process)
    assert process.returncode == 75, stderr[-3000:]
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped by signal 15 at step ")]
    assert len(stopped) == 2 and "saved None" not in stderr, stderr[-3000:]  # each rank names the one checkpoint
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert (tmp_path / "checkpoints" / f"step_{step:08d}.pt").is_file() and all(f"step_{step:08d}.pt" in line for line in stopped)
    assert "run the same command again to resume" in stderr


def test_a_users_mistake_under_torchrun_is_one_line_once_and_exit_2(tmp_path):
    command = [str(SCRIPT.parent / "python"), "-m", "retinanet_xla.distributed.torchrun", "--nproc-per-node", "2"]
    command += [
        "-m",
        "retinanet_xla",
        "train",
        "configs/smoke.yaml",
        "--output",
        str(tmp_path),
        "--set",
        "train.optimizer.name=adam",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: configs/smoke.yaml with --set train.optimizer.name=adam: train.optimizer.name must be one of sgd, adamw, got 'adam'"
    ]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
