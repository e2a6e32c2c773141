"""The runtime: its batch stream (what the loop sees, what taking a batch costs) and how it sets up the CPU client."""

import os
import threading

import pytest
import torch

from retinanet_xla.data import DatasetError
from retinanet_xla.xla.runtime import Runtime, prefer_nonblocking_cpu_client


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
