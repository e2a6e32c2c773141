"""Every path a bucket: data, config, run directory, eval / predict / export, through the real
CLI on CPU XLA against a real Cloud Storage server (``tests/gcs_server.py``). A preempted TPU VM
is recreated without its disk: the run must come back from the bucket alone."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from retinanet_xla.data.synthetic import write_synthetic_dataset
from retinanet_xla.rundir.checkpoint import load_checkpoint
from tests.cli_helpers import ROOT, SCRIPT, TINY, run_cli

pytestmark = pytest.mark.xla

N = 3  # steps between checkpoints
STEPS = [f"train.steps={2 * N}", "train.log_every=1", f"train.checkpoint_every={N}", "train.schedule.warmup_steps=1"]


@pytest.fixture(scope="module")
def bucket_data(gcs, tmp_path_factory):
    """The synthetic dataset and a config chain (``run.yaml`` extends the shipped smoke config) in a bucket."""
    bucket = gcs.make_bucket("retinanet-e2e")
    local = tmp_path_factory.mktemp("dataset")
    write_synthetic_dataset(local, num_train=24, num_val=7, seed=2)
    gcs.upload_tree(local, f"{bucket}/coco")
    data = [
        f"data.train.annotations={bucket}/coco/annotations/instances_train.json",
        f"data.train.images={bucket}/coco/train",
        f"data.val.annotations={bucket}/coco/annotations/instances_val.json",
        f"data.val.images={bucket}/coco/val",
    ]
    fs = gcs.filesystem()
    fs.pipe_file(f"{bucket}/configs/smoke.yaml", (ROOT / "configs" / "smoke.yaml").read_bytes())
    fs.pipe_file(f"{bucket}/configs/run.yaml", b"extends: smoke.yaml\ntrain:\n  seed: 3\n")
    return bucket, data


def train_args(config: str, output: str, data, *extra: str):
    args = [str(SCRIPT), "train", config, "--output", output]
    for override in (*TINY, *data, *STEPS, *extra):
        args += ["--set", override]
    return args


def wait_for_object(fs, url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not fs.exists(url):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{url} never appeared"
        time.sleep(0.05)


def test_train_in_a_bucket_survives_a_recreated_vm_and_eval_predict_export_read_it(
    gcs, bucket_data, tmp_path, capsys, monkeypatch
):
    bucket, data = bucket_data
    fs = gcs.filesystem()
    run_url = f"{bucket}/runs/first"
    cache = tmp_path / "vm-disk"  # the staging directory lives here: deleting it is the VM's recreation
    env = {**os.environ, "PJRT_DEVICE": "CPU", "XDG_CACHE_HOME": str(cache), **gcs.env}
    args = train_args(f"{bucket}/configs/run.yaml", run_url, data)

    process = subprocess.Popen(
        [*args, "--set", "train.steps=1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    wait_for_object(fs, f"{run_url}/checkpoints/step_{N:08d}.pt", process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not fs.exists(f"{run_url}/checkpoints/step_{2 * N:08d}.pt")
    # What reached the bucket with the checkpoint: the logs up to it and the run's config.
    assert fs.exists(f"{run_url}/config.yaml") and fs.exists(f"{run_url}/metrics.jsonl")
    shutil.rmtree(cache)  # the VM is recreated: nothing local survives

    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # News, not a warning: logged as information.
    assert (
        f"INFO retinanet_xla.training.trainer: resuming from {run_url}/checkpoints/step_{N:08d}.pt (step {N})" in resumed.stderr
    )
    summary = json.loads(fs.cat_file(f"{run_url}/summary.json"))
    assert summary["resumed_from_step"] == N and summary["compilations_after_warmup"] == 0
    assert summary["checkpoint"] == f"{run_url}/checkpoints/step_{2 * N:08d}.pt"
    rows = [json.loads(line) for line in fs.cat_file(f"{run_url}/metrics.jsonl").decode().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 2 * N + 1))  # replayed rows once
    assert fs.glob(f"{run_url}/tensorboard/events.out.tfevents.*")
    config = fs.cat_file(f"{run_url}/config.yaml").decode()
    assert "seed: 3" in config and f"{bucket}/coco/train" in config  # the extends chain was read from the bucket

    # A damaged newest checkpoint (a flipped byte inside its tensors) is skipped on resume.
    newest = f"{run_url}/checkpoints/step_{2 * N:08d}.pt"
    good = fs.cat_file(newest)
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    fs.pipe_file(newest, bytes(damaged))
    again = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"skipping unusable checkpoint: {newest}:" in again.stderr
    assert json.loads(fs.cat_file(f"{run_url}/summary.json"))["resumed_from_step"] == N
    rewritten = load_checkpoint(_local_copy(fs, newest, tmp_path))
    reference = torch.load(_bytes_file(good, tmp_path), weights_only=True)
    for name, tensor in reference["model"].items():  # the same steps again give the same weights
        torch.testing.assert_close(rewritten["model"][name], tensor, rtol=0, atol=1e-5, msg=name)

    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    result = run_cli(capsys, monkeypatch, "eval", run_url)
    assert result.exit_code == 0, result.stderr[-3000:]
    metrics = json.loads(fs.cat_file(f"{run_url}/eval/step_{2 * N:08d}/metrics.json"))
    assert metrics["checkpoint"] == newest and metrics["images"] == 7 and 0.0 <= metrics["AP"] <= 1.0
    assert fs.exists(f"{run_url}/eval/step_{2 * N:08d}/detections.json")

    result = run_cli(capsys, monkeypatch, "predict", run_url, f"{bucket}/coco/val", "--output", f"{bucket}/predicted")
    assert result.exit_code == 0, result.stderr[-3000:]
    assert "7 image(s)" in result.stdout and f"wrote {bucket}/predicted/detections.json" in result.stdout
    predicted = json.loads(fs.cat_file(f"{bucket}/predicted/detections.json"))
    assert len(predicted["images"]) == 7 and all(entry["file"].startswith(f"{bucket}/coco/val/") for entry in predicted["images"])
    assert len(fs.glob(f"{bucket}/predicted/*.png")) == 7

    result = run_cli(capsys, monkeypatch, "export", run_url, "--format", "torchscript", "--check")
    assert result.exit_code == 0, result.stderr[-3000:]
    exported = f"{run_url}/export/step_{2 * N:08d}"
    assert f"wrote {exported}/model.torchscript.pt and {exported}/" in result.stdout
    assert fs.exists(f"{exported}/model.torchscript.pt")


def _local_copy(fs, url: str, tmp_path: Path) -> Path:
    return _bytes_file(fs.cat_file(url), tmp_path)


def _bytes_file(data: bytes, tmp_path: Path) -> Path:
    path = tmp_path / f"copy-{len(list(tmp_path.glob('copy-*')))}.pt"
    path.write_bytes(data)
    return path


def test_a_storage_outage_mid_run_exits_75_and_the_same_command_resumes_to_the_same_weights(gcs, bucket_data, tmp_path):
    """The storage front end goes away after the first checkpoint (every connection closed, new
    ones refused): not the user's mistake, so exit 75 in one line; once it is back, the same
    command resumes and ends with the weights of a run that never saw the outage."""
    from tests.gcs_server import OutageProxy

    bucket, data = bucket_data
    fs = gcs.filesystem()
    proxy = OutageProxy(gcs.port)
    run_url = f"{bucket}/runs/outage"
    env = {**os.environ, "PJRT_DEVICE": "CPU", "XDG_CACHE_HOME": str(tmp_path / "cache"), **gcs.env}
    env["STORAGE_EMULATOR_HOST"] = proxy.url
    args = train_args(f"{bucket}/configs/run.yaml", run_url, data)
    try:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        wait_for_object(fs, f"{run_url}/checkpoints/step_{N:08d}.pt", process)
        proxy.go_down()
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 75, stderr[-3000:]
        assert "Traceback" not in stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: could not write the checkpoint: ") and (
            "the storage service is unavailable; run the same command again once it is back" in last
        ), stderr[-3000:]
        proxy.come_back()
        resumed = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    finally:
        proxy.close()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(fs.cat_file(f"{run_url}/summary.json"))
    assert summary["resumed_from_step"] == N, summary

    reference = tmp_path / "no-outage"  # the same run, into a local directory, uninterrupted
    local_env = {**env, "STORAGE_EMULATOR_HOST": gcs.env["STORAGE_EMULATOR_HOST"]}
    whole = subprocess.run(
        train_args(f"{bucket}/configs/run.yaml", str(reference), data), capture_output=True, text=True, timeout=600, env=local_env
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    final = f"step_{2 * N:08d}.pt"
    after_outage = load_checkpoint(_local_copy(fs, f"{run_url}/checkpoints/{final}", tmp_path))
    uninterrupted = load_checkpoint(reference / "checkpoints" / final)
    for name, tensor in uninterrupted["model"].items():
        torch.testing.assert_close(after_outage["model"][name], tensor, rtol=0, atol=1e-5, msg=name)
