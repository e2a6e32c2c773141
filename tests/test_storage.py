"""Paths that are URLs (retinanet_xla/storage.py) against a real Cloud Storage server, and the
one-line errors for what can go wrong with them, through the real CLI."""

import importlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from retinanet_xla import storage
from retinanet_xla.data.synthetic import write_synthetic_dataset
from tests.cli_helpers import ROOT, SCRIPT, run_cli
from tests.gcs_server import GCS_ENV


@pytest.fixture(scope="module")
def bucket(gcs):
    return gcs.make_bucket("storage-tests")


def test_a_url_stays_a_url_and_a_local_path_a_path():
    assert storage.location("gs://b/runs/x/") == "gs://b/runs/x"
    assert storage.location("runs/x") == Path("runs/x") and storage.location("file:///tmp/x") == Path("/tmp/x")
    assert storage.join("gs://b/runs", "checkpoints", "step_1.pt") == "gs://b/runs/checkpoints/step_1.pt"
    assert storage.parent("gs://b/runs/x/checkpoints/a.pt") == "gs://b/runs/x/checkpoints"
    assert storage.name("gs://b/x/a.pt") == "a.pt" and storage.stem("gs://b/x/step_00000004.pt") == "step_00000004"


def test_files_in_a_bucket_read_write_list_and_vanish(gcs, bucket):
    root = f"{bucket}/basic"
    storage.write_text(f"{root}/a/one.txt", "1")
    storage.write_bytes(f"{root}/a/deeper/two.bin", b"\x00\x02")
    assert storage.read_text(f"{root}/a/one.txt") == "1" and storage.is_file(f"{root}/a/one.txt")
    assert storage.is_dir(f"{root}/a") and not storage.is_file(f"{root}/a") and not storage.exists(f"{root}/b")
    assert storage.glob(f"{root}/a", "*.txt") == [f"{root}/a/one.txt"]
    assert storage.glob(f"{root}/a", "*") == [f"{root}/a/one.txt"]  # files only, not the "directory" deeper/
    assert storage.files_below(f"{root}/a") == {"one.txt", "deeper/two.bin"}
    missing = f"{root}/a/missing.jpg"
    read = storage.read_many([f"{root}/a/one.txt", missing, f"{root}/a/deeper/two.bin"])
    assert read[0] == b"1" and isinstance(read[1], FileNotFoundError) and read[2] == b"\x00\x02"
    storage.remove(f"{root}/a/one.txt")
    storage.remove(f"{root}/a/one.txt")  # already gone is fine
    assert storage.glob(f"{root}/a", "*.txt") == []


def test_a_failed_upload_leaves_no_object(gcs, bucket):
    target = f"{bucket}/atomic/checkpoint.pt"

    def write_half_then_fail(handle):
        handle.write(b"PK\x03\x04 half of a checkpoint")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        storage.write_file(target, write_half_then_fail)
    assert not storage.exists(target)


def test_staged_directory_uploads_what_changed_and_a_new_machine_gets_it_back(gcs, bucket, tmp_path):
    url = f"{bucket}/staged/run"
    staged = storage.StagedDirectory(url, cache_root=tmp_path / "vm1")
    staged.local.mkdir(parents=True)
    (staged.local / "metrics.jsonl").write_text('{"step": 1}\n')
    (staged.local / "tensorboard").mkdir()
    (staged.local / "tensorboard" / "events.1").write_bytes(b"e1")
    assert staged.push() == ["metrics.jsonl", "tensorboard/events.1"]
    assert staged.push() == []  # nothing changed
    with (staged.local / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 2}\n')
    assert staged.push() == ["metrics.jsonl"]

    recreated = storage.StagedDirectory(url, cache_root=tmp_path / "vm2")
    (recreated.local / "tensorboard").mkdir(parents=True)
    (recreated.local / "tensorboard" / "stale").write_bytes(b"from an earlier life")
    recreated.pull(["metrics.jsonl", "tensorboard", "summary.json"])
    assert (recreated.local / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    assert sorted(p.name for p in (recreated.local / "tensorboard").iterdir()) == ["events.1"]
    assert not (recreated.local / "summary.json").exists() and recreated.push() == []


def test_a_local_directory_is_its_own_staging(tmp_path):
    staged = storage.StagedDirectory(tmp_path)
    assert staged.local == tmp_path and not staged.remote and staged.push() == []


def test_data_check_reads_a_dataset_from_a_bucket(gcs, bucket, tmp_path, capsys, monkeypatch):
    write_synthetic_dataset(tmp_path, num_train=6, num_val=2, seed=1)
    gcs.upload_tree(tmp_path, f"{bucket}/check")
    gcs.filesystem().rm_file(f"{bucket}/check/train/000003.jpg")
    result = run_cli(
        capsys,
        monkeypatch,
        "data",
        "check",
        f"{bucket}/check/annotations/instances_train.json",
        "--images",
        f"{bucket}/check/train",
    )
    assert result.exit_code == 1, result.stderr
    assert result.stdout.startswith(f"{bucket}/check/annotations/instances_train.json: 5 usable images")
    assert f"missing image file: 1 (e.g. {bucket}/check/train/000003.jpg)" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "nfs2://host/config.yaml"], "nfs2://host/config.yaml: unknown storage scheme nfs2://"),
        (["train", "gs://no-such-bucket/config.yaml"], "bucket gs://no-such-bucket does not exist"),
        (["train", "gs://{bucket}/nothing-here.yaml"], "gs://{bucket}/nothing-here.yaml: config file does not exist"),
        (["eval", "gs://{bucket}/no-run"], "gs://{bucket}/no-run: checkpoint does not exist"),
        (
            ["data", "check", "gs://{bucket}/none.json", "--images", "gs://{bucket}/img"],
            "gs://{bucket}/none.json: annotation file does not exist",
        ),
    ],
)
def test_bad_urls_are_one_line_errors(gcs, bucket, args, message, capsys, monkeypatch):
    name = bucket.split("://")[1]
    result = run_cli(capsys, monkeypatch, *[a.format(bucket=name) for a in args])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(bucket=name) in lines[0], result.stderr


def test_without_gcsfs_a_gs_path_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed: importing it fails
    for scheme in ("gs", "gcs"):
        monkeypatch.delitem(importlib.import_module("fsspec.registry")._registry, scheme, raising=False)
    result = run_cli(capsys, monkeypatch, "train", "gs://bucket/configs/smoke.yaml")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: gs://bucket/configs/smoke.yaml: reading gs:// needs a package that is not installed: "
        "pip install 'retinanet-xla[gcs]'"
    )


def test_back_end_failures_are_described_in_one_line():
    from gcsfs.retry import HttpError
    from google.auth.exceptions import DefaultCredentialsError

    no_credentials = DefaultCredentialsError("Your default credentials were not found.\nTo set up ...")
    assert storage.describe_failure("gs://b/x", no_credentials) == (
        "gs://b/x: access denied (Your default credentials were not found.); on a TPU VM check its service account, "
        "elsewhere run `gcloud auth application-default login`"
    )
    forbidden = HttpError({"code": 403, "message": "caller does not have storage.objects.get access"})
    assert storage.describe_failure("gs://b/x", forbidden).startswith(
        "gs://b/x: access denied (caller does not have storage.objects.get access)"
    )
    assert storage.describe_failure("gs://b/x", HttpError({"code": 503, "message": "Backend Error"})) == (
        "gs://b/x: Backend Error (HTTP 503)"
    )


def test_metrics_written_by_eval_to_a_bucket_are_json(gcs, bucket):
    """``storage.write_text`` to a URL is what eval's metrics.json goes through."""
    storage.write_text(f"{bucket}/eval/metrics.json", json.dumps({"AP": 0.5}))
    assert json.loads(gcs.filesystem().cat_file(f"{bucket}/eval/metrics.json")) == {"AP": 0.5}


def test_config_extends_across_a_bucket(gcs, bucket):
    from retinanet_xla.config import load_config

    fs = gcs.filesystem()
    fs.pipe_file(f"{bucket}/cfg/base.yaml", (ROOT / "configs" / "smoke.yaml").read_bytes())
    fs.pipe_file(f"{bucket}/cfg/child.yaml", b"extends: base.yaml\ntrain:\n  steps: 7\n")
    config = load_config(f"{bucket}/cfg/child.yaml")
    assert config.train.steps == 7 and config.data.image_size == [128, 128]


def test_record_shards_in_a_bucket_give_the_local_files_batches(gcs, bucket, tmp_path, capsys, monkeypatch):
    import torch

    from retinanet_xla.config import load_config
    from retinanet_xla.data.splits import dataset_split
    from retinanet_xla.device.runtime import ReplicaGroup
    from retinanet_xla.training.batches import train_batches

    paths = write_synthetic_dataset(tmp_path, num_train=10, num_val=1, seed=6)["train"]
    prefix = f"{bucket}/records/train"
    result = run_cli(
        capsys, monkeypatch, "data", "convert", paths["annotations"], "--from", "coco", "--images", paths["images"],
        "--output", prefix, "--shards", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert sorted(gcs.filesystem().ls(f"{bucket}/records")) == [
        f"{bucket[5:]}/records/train-00000-of-00002.rxr",
        f"{bucket[5:]}/records/train-00001-of-00002.rxr",
        f"{bucket[5:]}/records/train.json",
    ]
    common = ["data.image_size=[64,64]", "data.max_boxes=auto", "data.num_workers=0", "train.batch_size=2"]
    files = load_config(
        overrides=[*common, f"data.train.annotations={paths['annotations']}", f"data.train.images={paths['images']}"]
    )
    records = load_config(overrides=[*common, f"data.train.records={prefix}"])
    streams = [iter(train_batches(c, dataset_split(c, "train", tmp_path), ReplicaGroup())) for c in (files, records)]
    for _ in range(6):
        a, b = next(streams[0]), next(streams[1])
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_storage_service_that_is_down_ends_the_run_with_exit_75_in_one_line(tmp_path):
    """Not the user's mistake: exit 75 ("try again"), as a preempted run, so that a wrapper
    rerunning while the exit is 75 reruns; the back-end's retries are one warning line each."""
    env = {**os.environ, **GCS_ENV, "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}
    result = subprocess.run(
        [str(SCRIPT), "train", str(ROOT / "configs" / "smoke.yaml"), "--output", "gs://down/run", "--set", "runtime.device=cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 75, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "Cannot connect to host 127.0.0.1:9 ssl:default [Connect call failed ('127.0.0.1', 9)]: "
            "the storage service is unavailable; run the same command again once it is back"
        )
    )
    assert not list(tmp_path.iterdir())  # nothing written locally either


def test_an_output_that_cannot_be_written_is_named_before_any_work(gcs, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(storage.StorageError) as error:
        storage.require_writable(a_file / "eval")
    assert str(error.value) == f"{a_file / 'eval'}: cannot write there (Not a directory)"
    with pytest.raises(storage.StorageError, match="bucket gs://no-such-bucket does not exist"):
        storage.require_writable("gs://no-such-bucket/eval")
    storage.require_writable(tmp_path / "new" / "eval")
    assert (tmp_path / "new" / "eval").is_dir() and not list((tmp_path / "new" / "eval").iterdir())


def test_a_storage_server_that_never_answers_ends_the_run_with_exit_75_within_the_time_limit(tmp_path):
    """A server that accepts connections and then says nothing: each request gives up after
    RETINANET_GCS_READ_TIMEOUT, and the run ends as for any outage instead of waiting forever."""
    silent = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: [held.append(silent.accept()) for _ in iter(int, 1)], daemon=True).start()
    env = {
        **os.environ,
        **GCS_ENV,
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{silent.getsockname()[1]}",
        "RETINANET_GCS_READ_TIMEOUT": "1",
    }
    try:
        result = subprocess.run(
            [
                str(SCRIPT),
                "train",
                str(ROOT / "configs" / "smoke.yaml"),
                "--output",
                "gs://silent/run",
                "--set",
                "runtime.device=cpu",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=tmp_path,
        )
    finally:
        silent.close()
    assert held, "the run never reached the server"
    assert result.returncode == 75, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: gs://silent") and last.endswith(
        "the storage service is unavailable; run the same command again once it is back"
    ), last
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "value, limit, message",
    [
        (None, 30.0, None),
        ("2.5", 2.5, None),
        ("soon", None, "RETINANET_GCS_READ_TIMEOUT='soon': expected a number of seconds"),
        ("0", None, "RETINANET_GCS_READ_TIMEOUT='0': expected a positive number of seconds"),
        ("inf", None, "RETINANET_GCS_READ_TIMEOUT='inf': expected a positive number of seconds"),
    ],
)
def test_the_storage_time_limits_come_from_the_environment(value, limit, message):
    environ = {} if value is None else {"RETINANET_GCS_READ_TIMEOUT": value}
    if message is None:
        assert storage.gcs_time_limits(environ) == {"sock_connect": 20.0, "sock_read": limit}
    else:
        with pytest.raises(storage.StorageError) as error:
            storage.gcs_time_limits(environ)
        assert str(error.value) == message
