"""The device feed every backend gives the loop (``Runtime.device_batches``): what the loop
sees, what taking a batch costs, what stays on the host, how it ends."""

import threading

import pytest
import torch

from retinanet_xla.config import RuntimeConfig
from retinanet_xla.data import DatasetError
from retinanet_xla.device.choice import create_runtime


def runtime_on(kind: str):
    return create_runtime(RuntimeConfig(device=kind))


def failing_host_batches():
    yield {"images": torch.full((2, 3, 8, 8), 7, dtype=torch.uint8)}
    raise DatasetError("instances.json: image 7 (a.jpg) cannot be decoded")


@pytest.mark.parametrize("kind", ["cpu", pytest.param("xla", marks=pytest.mark.xla)])
def test_a_failing_host_loader_fails_the_loop_with_its_own_error(kind):
    """On XLA the batches come through a background thread (DeviceFeed); the loop must get the
    host loader's error, not an end of the data (torch_xla's MpDeviceLoader gives the latter)."""
    batches = iter(runtime_on(kind).device_batches(failing_host_batches()))
    first = next(batches)
    assert first["images"].device.type == kind and int(first["images"].cpu().sum()) == 7 * 2 * 3 * 8 * 8
    with pytest.raises(DatasetError, match=r"^instances.json: image 7 \(a.jpg\) cannot be decoded$"):
        next(batches)


@pytest.mark.xla
def test_a_finite_stream_still_ends_on_xla():
    runtime = runtime_on("xla")
    batches = iter(runtime.device_batches({"images": torch.full((1, 2), float(i))} for i in range(3)))
    assert [float(batch["images"].cpu()[0, 0]) for batch in batches] == [0.0, 1.0, 2.0]


@pytest.mark.xla
def test_taking_batches_from_the_device_feed_launches_no_graph():
    """torch_xla's MpDeviceLoader syncs on every batch taken; with steps launched without
    waiting, that sync waited for the step just launched and the device idled while the host
    traced the next one. The loop's own sync is the only one."""
    import torch_xla.debug.metrics as metrics

    runtime = runtime_on("xla")
    batches = iter(runtime.device_batches({"images": torch.full((1, 2), float(i))} for i in range(3)))
    before = metrics.counter_value("MarkStep") or 0
    taken = [next(batches) for _ in range(3)]
    assert (metrics.counter_value("MarkStep") or 0) == before
    assert [float(batch["images"].cpu()[0, 1]) for batch in taken] == [0.0, 1.0, 2.0]


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

    batches = runtime_on("xla").device_batches(endless_host_batches())
    next(batches)
    batches.close()
    assert closed.is_set()  # before close() returns: no thread is left inside torch_xla at exit
    with pytest.raises(StopIteration):
        next(batches)


@pytest.mark.parametrize("kind", ["cpu", pytest.param("xla", marks=pytest.mark.xla)])
def test_host_keys_stay_on_the_host_and_the_rest_reach_the_device(kind):
    host = {"images": torch.full((2, 3), 5.0), "scale": torch.tensor([0.5, 2.0], dtype=torch.float64)}
    (batch,) = list(runtime_on(kind).device_batches([host], host_keys=("scale",)))
    assert batch["images"].device.type == kind and batch["scale"] is host["scale"]
    assert float(batch["images"].cpu().sum()) == 30.0
