"""Two environments run these tests (the README's `make test`): `.venv` has torch-xla (every
test but tests/native/), `.venv-native` PyPI's current torch (tests/native/ and the eager unit
tests, `-m "not xla"`)."""

import importlib.util
import os
import socket

import pytest

# As the console script does: TorchTPU, where installed, would load with torch otherwise.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

# Tests talk only to 127.0.0.1. gcsfs runs google-auth's credential discovery even against the
# local storage server, and google-auth and libtpu ask the GCE metadata server (169.254.169.254)
# what machine this is: both are pointed at a closed local port, or told not to ask, and gcsfs
# is given anonymous credentials. Every process a test starts inherits this.
NO_METADATA_SERVER = {
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "NO_GCE_CHECK": "true",
    "TPU_SKIP_MDS_QUERY": "1",
    "FSSPEC_GCS_TOKEN": "anon",  # fsspec passes it to gcsfs: anonymous credentials, no discovery
}
os.environ.update(NO_METADATA_SERVER)

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


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _loopback_only(connect):
    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            raise AssertionError(f"a test tried to reach {address[0]}:{address[1]}; tests talk only to 127.0.0.1")
        return connect(sock, address)

    return guarded


@pytest.fixture(autouse=True, scope="session")
def network_is_loopback_only():
    """Inside the test process, a connection to anything but this machine fails the test that
    made it (processes a test starts get the environment above)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _loopback_only(socket.socket.connect))
        patch.setattr(socket.socket, "connect_ex", _loopback_only(socket.socket.connect_ex))
        yield
