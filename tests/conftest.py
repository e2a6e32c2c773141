"""Two environments run these tests (the README's `make test`): `.venv` has torch-xla (every
test but tests/native/), `.venv-native` PyPI's current torch (tests/native/ and the eager unit
tests, `-m "not xla"`)."""

import importlib.util
import os

import pytest

# As the console script does: TorchTPU, where installed, would load with torch otherwise.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

# tests/native/ needs PyPI's current torch (torch.compile of the whole step), never torch-xla's.
collect_ignore = ["native"] if importlib.util.find_spec("torch_xla") is not None else []

if importlib.util.find_spec("torch_xla") is not None:
    # The XLA tests run on the CPU PJRT client; set before torch_xla is first imported.
    os.environ.setdefault("PJRT_DEVICE", "CPU")

    import torch_xla

    from retinanet_xla.device.xla.runtime import prefer_nonblocking_cpu_client

    prefer_nonblocking_cpu_client()  # as every XlaRuntime does; before the client below exists

    # The XLA device must exist before the autograd engine starts (the first eager backward in
    # any test); otherwise a later XLA backward fails with "device_ready_queues_ ... INTERNAL ASSERT".
    torch_xla.device()


@pytest.fixture(scope="session")
def gcs():
    """A real Cloud Storage server on 127.0.0.1 for the session (tests/gcs_server.py)."""
    from tests.gcs_server import GcsServer

    server = GcsServer().start()
    yield server
    server.stop()
