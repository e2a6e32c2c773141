"""The runtime: its batch stream (what the loop sees, what taking a batch costs) and how it sets up the CPU client."""

import json
import os
import subprocess
import threading

import pytest
import torch

from retinanet_xla.data import DatasetError
from retinanet_xla.xla import runtime as runtime_module
from retinanet_xla.xla.runtime import Runtime, prefer_nonblocking_cpu_client, resolve_device
from tests.cli_helpers import ROOT, SCRIPT, TINY


def failing_host_batches():
    yield {"images": torch.full((2, 3, 8, 8), 7, dtype=torch.uint8)}
    raise DatasetError("instances.json: image 7 (a.jpg) cannot be decoded")


@pytest.mark.parametrize("kind", ["cpu", pytest.param("xla", marks=pytest.mark.xla)])
def test_a_failing_host_loader_fails_the_loop_with_its_own_error(kind):
    """On XLA the batches come through a background thread (DeviceFeed); the loop must get the
    host loader's error, not an end of the data (torch_xla's MpDeviceLoader gives the latter)."""
    batches = iter(Runtime(kind).device_batches(failing_host_batches()))
    first = next(batches)
    assert first["images"].device.type == kind and int(first["images"].cpu().sum()) == 7 * 2 * 3 * 8 * 8
    with pytest.raises(DatasetError, match=r"^instances.json: image 7 \(a.jpg\) cannot be decoded$"):
        next(batches)


@pytest.mark.xla
def test_a_finite_stream_still_ends_on_xla():
    runtime = Runtime("xla")
    batches = iter(runtime.device_batches({"images": torch.full((1, 2), float(i))} for i in range(3)))
    assert [float(batch["images"].cpu()[0, 0]) for batch in batches] == [0.0, 1.0, 2.0]


@pytest.mark.xla
def test_taking_batches_from_the_device_feed_launches_no_graph():
    """torch_xla's MpDeviceLoader syncs on every batch taken; with steps launched without
    waiting, that sync waited for the step just launched and the device idled while the host
    traced the next one. The loop's own sync is the only one."""
    import torch_xla.debug.metrics as metrics

    runtime = Runtime("xla")
    batches = iter(runtime.device_batches({"images": torch.full((1, 2), float(i))} for i in range(3)))
    before = metrics.counter_value("MarkStep") or 0
    taken = [next(batches) for _ in range(3)]
    assert (metrics.counter_value("MarkStep") or 0) == before
    assert [float(batch["images"].cpu()[0, 1]) for batch in taken] == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    "device, preset, expected",
    [("CPU", None, "0"), (None, None, "0"), ("CPU", "1", "1"), ("TPU", None, None)],
)
def test_the_cpu_client_launches_without_waiting_unless_the_user_says_otherwise(monkeypatch, device, preset, expected):
    for name, value in (("PJRT_DEVICE", device), ("PJRT_CPU_ASYNC_CLIENT", preset)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    prefer_nonblocking_cpu_client()
    assert os.environ.get("PJRT_CPU_ASYNC_CLIENT") == expected


@pytest.mark.xla
def test_closing_the_batches_ends_the_host_stream():
    """A loop that stops early (preemption, a failure) closes its batches: the copy thread
    stops and the host stream is closed, so a data loader's workers end with it."""
    closed = threading.Event()

    def endless_host_batches():
        try:
            while True:
                yield {"images": torch.zeros(1, 2)}
        finally:
            closed.set()

    batches = Runtime("xla").device_batches(endless_host_batches())
    next(batches)
    batches.close()
    assert closed.is_set()  # before close() returns: no thread is left inside torch_xla at exit
    with pytest.raises(StopIteration):
        next(batches)


@pytest.mark.parametrize(
    "setting, pjrt_device, chips, cuda, expected",
    [
        ("auto", "CPU", False, True, "xla"),  # PJRT_DEVICE names XLA's device, even beside a GPU
        ("auto", None, True, False, "xla"),  # a TPU VM where PJRT_DEVICE is not set
        ("auto", None, False, True, "cuda"),
        ("auto", None, False, False, "cpu"),
        ("xla", None, False, False, "xla"),  # an explicit device is never second-guessed
        ("cpu", "TPU", True, True, "cpu"),
    ],
)
def test_runtime_device_auto_is_xla_where_xla_has_a_device_else_cuda_else_cpu(
    monkeypatch, setting, pjrt_device, chips, cuda, expected
):
    if pjrt_device is None:
        monkeypatch.delenv("PJRT_DEVICE", raising=False)
    else:
        monkeypatch.setenv("PJRT_DEVICE", pjrt_device)
    monkeypatch.setattr(runtime_module, "tpu_chips_present", lambda: chips)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_device(setting) == expected


def test_no_tpu_chips_are_seen_on_this_machine():
    """CI's machine has no TPU: were this wrong, ``auto`` would start XLA's TPU client here."""
    assert runtime_module.tpu_chips_present() is False


def test_bench_with_device_auto_and_no_pjrt_device_runs_the_eager_step(tmp_path):
    """Through the real CLI in a fresh process: without PJRT_DEVICE and without a TPU, ``auto``
    runs the step eagerly (the same command with ``xla`` reports an ``xla:0`` device)."""
    command = [str(SCRIPT), "bench", str(ROOT / "configs" / "smoke.yaml"), "--steps", "2", "--json", str(tmp_path / "b.json")]
    for override in (*TINY, "runtime.device=auto"):
        command += ["--set", override]
    env = {key: value for key, value in os.environ.items() if key != "PJRT_DEVICE"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    bench = json.loads((tmp_path / "b.json").read_text())
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert bench["device"].startswith(expected) and bench["step_graph"] == "eager" and bench["step_seconds"] > 0
