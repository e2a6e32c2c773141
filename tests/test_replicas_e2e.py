"""Several replicas through ``xmp.spawn``: two CPU XLA devices (``CPU_NUM_DEVICES=2``), which
torch_xla runs as two threads of one child process, through the real CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from retinanet_xla.rundir.checkpoint import load_checkpoint
from tests.cli_helpers import ROOT, SCRIPT, TINY, run_cli, train_command
from tests.replica_checks import SETTINGS, UPDATE_TOLERANCES, initial_weights, update_differences

pytestmark = pytest.mark.xla

TWO_DEVICES = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "2"}


class TwoDeviceRun:
    """``command`` with two CPU devices, in its own process group, output in files (a leftover
    replica process holding a pipe would keep the test waiting); leftovers are killed at the end."""

    def __init__(self, command, workdir: Path):
        self.command, self.out, self.err = command, workdir / "stdout.txt", workdir / "stderr.txt"
        with self.out.open("w") as stdout, self.err.open("w") as stderr:
            self.process = subprocess.Popen(
                command, stdout=stdout, stderr=stderr, env=TWO_DEVICES, cwd=ROOT, start_new_session=True
            )

    def finish(self, timeout: int) -> subprocess.CompletedProcess:
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return subprocess.CompletedProcess(self.command, code, self.out.read_text(), self.err.read_text())


def run_on_two_devices(command, workdir: Path, timeout: int) -> subprocess.CompletedProcess:
    return TwoDeviceRun(command, workdir).finish(timeout)


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    output = tmp_path_factory.mktemp("two_replicas")
    return output, run_on_two_devices(train_command(output, *SETTINGS, "runtime.num_devices=null"), output, timeout=900)


def test_two_replicas_train_through_the_cli(two_replicas):
    output, result = two_replicas
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["replicas"] == 2
    assert summary["compilations_after_warmup"] == 0
    assert summary["images"] == 3 * 4  # the global batch
    assert sorted(p.name for p in (output / "checkpoints").glob("step_*.pt")) == [f"step_0000000{s}.pt" for s in (1, 2, 3)]
    # Only the master logs: one line per step, one start message, one TensorBoard file.
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "eval" not in line] == [1, 2, 3]
    assert [line["step"] for line in lines if "eval" in line] == [3]
    assert result.stdout.count("training steps 1-3, batch 4 on 2 replica(s)") == 1
    assert len(list((output / "tensorboard").glob("events.*"))) == 1


def test_two_replicas_make_the_same_update_as_one_device_with_the_global_batch(two_replicas, tmp_path, capsys, monkeypatch):
    output, result = two_replicas
    assert result.returncode == 0, result.stderr[-4000:]
    single = tmp_path / "one_device"
    cli = run_cli(capsys, monkeypatch, *train_command(single, *SETTINGS, "runtime.num_devices=1")[1:])
    assert cli.exit_code == 0, cli.stderr[-3000:]
    start = initial_weights(single)
    for step, (parameters, statistics) in UPDATE_TOLERANCES.items():
        relative = update_differences(output, single, step, start)
        assert relative["parameters"] < parameters and relative["statistics"] < statistics, f"step {step}: {relative}"
    first = lambda run: json.loads((run / "metrics.jsonl").read_text().splitlines()[0])  # noqa: E731
    assert first(output)["loss"] == pytest.approx(first(single)["loss"], rel=1e-5)
    assert first(output)["num_foreground"] == pytest.approx(first(single)["num_foreground"] / 2)  # a mean over replicas


def test_a_bf16_step_stays_close_to_the_fp32_step(two_replicas, tmp_path):
    """Cross-replica BatchNorm on two devices under bf16 autocast: the same first step as in
    float32 from the same weights and batch, to bfloat16's precision, with float32 statistics."""
    output, result = two_replicas
    assert result.returncode == 0, result.stderr[-4000:]
    bf16 = tmp_path / "bf16"
    run = run_on_two_devices(
        train_command(bf16, *SETTINGS, "train.steps=1", "train.eval_every=0", "train.precision=bf16", "runtime.num_devices=null"),
        tmp_path,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    first = {
        name: json.loads((path / "metrics.jsonl").read_text().splitlines()[0])
        for name, path in (("fp32", output), ("bf16", bf16))
    }
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%) in every convolution
    # of ResNet-18, FPN and head; the loss sums every anchor in float32, so the roundings
    # cancel: measured 2.3e-5 (loss), 4.6e-5 (cls), 1.8e-5 (box) apart. A loss summed in
    # bfloat16 would be off by its own rounding, up to 2^-8 = 4e-3; the bound is 1e-3.
    for key in ("loss", "cls_loss", "box_loss"):
        assert first["bf16"][key] == pytest.approx(first["fp32"][key], rel=1e-3), key
    assert first["bf16"]["num_foreground"] == first["fp32"]["num_foreground"]  # matching is float32
    # The same update, to bfloat16's precision. Measured 0.24 of the fp32 update apart over all
    # parameters (backbone 0.29, FPN 0.13, head 0.085: bf16 activations and gradients keep 8
    # bits, and BatchNorm's backward amplifies rounding, see UPDATE_TOLERANCES) and 0.009 over
    # the running statistics, computed in float32 from the bf16 activations. A halved update
    # would add 0.5; statistics of one replica only, 0.46.
    relative = update_differences(bf16, output, 1, initial_weights(bf16))
    assert relative["parameters"] < 0.4 and relative["statistics"] < 0.05, relative
    state = load_checkpoint(bf16 / "checkpoints" / "step_00000001.pt")["model"]
    statistics = [key for key in state if key.endswith(("running_mean", "running_var"))]
    assert statistics and all(state[key].dtype == torch.float32 for key in statistics)
    assert all(value.dtype == torch.float32 for value in state.values() if value.is_floating_point())


def train_time_eval(run: Path) -> dict:
    return next(json.loads(line)["eval"] for line in (run / "metrics.jsonl").read_text().splitlines() if "eval" in line)


def test_eval_on_two_replicas_gives_the_detections_of_one_device(two_replicas, tmp_path, capsys, monkeypatch):
    """Each replica runs its shard; the master gathers: the same detections, in the same order,
    as one device evaluating the whole split, and the same AP the training run logged."""
    output, result = two_replicas
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = output / "checkpoints" / "step_00000003.pt"
    eval_args = ["eval", str(checkpoint), "--set", "eval.score_threshold=0.0"]
    two = run_on_two_devices([str(SCRIPT), *eval_args, "--output", str(tmp_path / "two")], tmp_path, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    one = run_cli(capsys, monkeypatch, *eval_args, "--output", str(tmp_path / "one"), "--devices", "1")
    assert one.exit_code == 0, one.stderr[-3000:]
    detections = {n: json.loads((tmp_path / n / "detections.json").read_text()) for n in ("one", "two")}
    assert detections["two"] == detections["one"]
    assert len({d["image_id"] for d in detections["two"]}) == 7  # every image, the padded slot dropped
    metrics = {n: json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two")}
    assert (metrics["one"]["replicas"], metrics["two"]["replicas"]) == (1, 2)
    assert metrics["two"]["AP"] == metrics["one"]["AP"] and metrics["two"]["summary"] == metrics["one"]["summary"]
    assert two.stdout.count(" Average Precision") == 6 and "AP per category" in two.stdout
    # Evaluation during training took the same path, with the default score threshold.
    default_threshold = run_cli(
        capsys, monkeypatch, "eval", str(checkpoint), "--output", str(tmp_path / "default"), "--set", "runtime.num_devices=1"
    )
    assert default_threshold.exit_code == 0, default_threshold.stderr[-3000:]
    logged = train_time_eval(output)
    assert logged["AP"] == json.loads((tmp_path / "default" / "metrics.json").read_text())["AP"]


def test_bench_runs_one_replica_per_device(tmp_path):
    command = [str(SCRIPT), "bench", str(ROOT / "configs" / "smoke.yaml"), "--steps", "3", "--json", str(tmp_path / "bench.json")]
    for override in TINY:
        command += ["--set", override]
    result = run_on_two_devices([*command, "--devices", "2"], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["replicas"] == 2 and bench["batch_size"] == 4  # the global batch
    assert len(bench["replica_step_seconds"]) == 2 and bench["step_seconds"] == max(bench["replica_step_seconds"]) > 0
    assert bench["images_per_second"] == pytest.approx(4 / bench["step_seconds"], rel=1e-2)
    assert bench["compilations_after_warmup"] == 0
    assert "x 2 replica(s)" in result.stdout


def test_a_failing_replica_ends_the_run_quickly_with_its_message(tmp_path):
    script = (
        "from retinanet_xla.config import load_config\n"
        "from retinanet_xla.device.choice import plan_launch\n"
        "from retinanet_xla.distributed.launch import run_on_local_replicas\n"
        "from tests.replica_faults import fail_on_replica_1\n"
        "run_on_local_replicas(fail_on_replica_1, (), plan_launch(load_config(None, ['runtime.num_devices=2']).runtime))\n"
    )
    started = time.monotonic()
    result = run_on_two_devices([sys.executable, "-c", script], tmp_path, timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "error: replica 1 failed: RuntimeError: injected failure" in result.stderr
    assert "ReplicaFailed: a replica process ended abnormally" in result.stderr
    assert elapsed < 120  # replica 0 alone would sleep for 600 s


def test_a_global_batch_that_does_not_split_over_the_replicas_is_refused(tmp_path):
    result = run_on_two_devices(
        train_command(tmp_path / "run", "train.batch_size=3", "runtime.num_devices=null"), tmp_path, timeout=300
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: train.batch_size 3 is not divisible by the 2 replicas"


LOG_EVERY = 10


def stop_two_replicas_with_sigterm(workdir: Path) -> tuple:
    output = workdir / "run"
    # Stops are agreed at log steps: the replicas keep training for up to 10 steps after the
    # signal, and their loader workers keep producing batches meanwhile.
    command = train_command(
        output, "train.steps=500", f"train.log_every={LOG_EVERY}", "train.checkpoint_every=1000", "runtime.num_devices=null"
    )
    run = TwoDeviceRun(command, workdir)
    try:
        log, deadline = output / "metrics.jsonl", time.monotonic() + 600
        while not (log.exists() and len(log.read_text().splitlines()) >= 2):  # steps 1 and 10: compiled
            assert run.process.poll() is None, run.err.read_text()[-3000:]
            assert time.monotonic() < deadline, f"training never reached step {LOG_EVERY}"
            time.sleep(0.05)
        os.killpg(run.process.pid, signal.SIGTERM)
    finally:
        result = run.finish(timeout=300)
    return output, result


def test_sigterm_to_every_process_stops_all_replicas_with_a_checkpoint(tmp_path):
    """What a TPU VM preemption does: SIGTERM to every process. The replicas ignore it, the
    launcher asks them to stop, and they agree on the next log step."""
    output, result = stop_two_replicas_with_sigterm(tmp_path)
    assert result.returncode == 75, result.stderr[-3000:]
    # torch's loader workers died of the signal; their replica's batches then ended in
    # "DataLoader worker ... exited unexpectedly".
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    saved = sorted((output / "checkpoints").glob("step_*.pt"))
    assert len(saved) == 1
    step = int(saved[0].stem.split("_")[1])
    assert step % LOG_EVERY == 0 and LOG_EVERY <= step < 500  # a log step, where the replicas agree
    assert f"stopped by signal 15 at step {step}; saved {saved[0]}; run the same command again to resume" in result.stderr
    assert load_checkpoint(saved[0])["step"] == step


def test_replica_0_alone_chooses_the_checkpoint_both_replicas_resume_from(two_replicas, tmp_path):
    """Two hosts listing a bucket a moment apart could see different newest checkpoints: only
    replica 0 lists, skips the damaged one, and sends its choice to the other."""
    output, first = two_replicas
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "run"
    shutil.copytree(output, run)
    newest = run / "checkpoints" / "step_00000003.pt"
    newest.write_bytes(newest.read_bytes()[:2000])  # cut short
    command = train_command(run, *SETTINGS, "train.steps=4", "train.eval_every=0", "runtime.num_devices=null")
    result = run_on_two_devices(command, tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count(f"skipping unusable checkpoint: {newest}") == 1  # listed once, by replica 0
    resumed = f"resuming from {run / 'checkpoints' / 'step_00000002.pt'} (step 2)"
    assert result.stderr.count(resumed) == 2  # and both replicas loaded its choice
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["replicas"] == 2 and summary["compilations_after_warmup"] == 0
