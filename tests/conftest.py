import os

import pytest

# The XLA tests run on the CPU PJRT client; set before torch_xla is first imported.
os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch_xla  # noqa: E402

from retinanet_xla.device.xla.runtime import prefer_nonblocking_cpu_client  # noqa: E402

prefer_nonblocking_cpu_client()  # as every XlaRuntime does; before the client below exists

# The XLA device must exist before the autograd engine starts (the first eager backward in any
# test); otherwise a later XLA backward fails with "device_ready_queues_ ... INTERNAL ASSERT".
torch_xla.device()


@pytest.fixture(scope="session")
def gcs():
    """A real Cloud Storage server on 127.0.0.1 for the session (tests/gcs_server.py)."""
    from tests.gcs_server import GcsServer

    server = GcsServer().start()
    yield server
    server.stop()
