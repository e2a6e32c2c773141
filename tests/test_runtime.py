"""The runtime's batch stream: what the training loop sees when the host loader fails."""

import pytest
import torch

from retinanet_xla.data import DatasetError
from retinanet_xla.engine.runtime import Runtime


def failing_host_batches():
    yield {"images": torch.full((2, 3, 8, 8), 7, dtype=torch.uint8)}
    raise DatasetError("instances.json: image 7 (a.jpg) cannot be decoded")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # torch_xla's thread
@pytest.mark.parametrize("kind", ["cpu", pytest.param("xla", marks=pytest.mark.xla)])
def test_a_failing_host_loader_fails_the_loop_with_its_own_error(kind):
    """On XLA the batches come through torch_xla's loader thread, which prints the error and
    ends the stream as if the data had run out: the loop must not take that for the end."""
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
