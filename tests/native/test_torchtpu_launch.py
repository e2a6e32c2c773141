"""TorchTPU's launch environment (``device/native/tpu.py``), with torch-tpu 0.2.0 installed and no
chips: every rank needs ``TORCH_TPU_SLICEBUILDER_ADDRESSES`` (one address per rank) and
``TORCH_TPU_TOPOLOGY``, set in the parent before any worker starts. Each check runs in its own
interpreter: TorchTPU's call keeps what it decided for the life of the process."""

import json
import os
import subprocess
import sys

import pytest

from tests.cli_helpers import ROOT

pytestmark = pytest.mark.native

ENV = {
    **{key: value for key, value in os.environ.items() if key != "TPU_WORKER_HOSTNAMES"},
    "PYTHONPATH": str(ROOT),
    "TORCH_DEVICE_BACKEND_AUTOLOAD": "0",
}


def python(script: str, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env={**ENV, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_our_spawn_sets_the_launch_environment_for_its_count_before_any_worker_starts():
    """``--devices 4`` on a TPU VM: the call with 4, then the 4 worker processes."""
    script = """
import json, torch
import retinanet_xla.device.native.runtime as native
import retinanet_xla.device.native.tpu as tpu
from retinanet_xla.config import RuntimeConfig
import torch_tpu  # registers torch.tpu
tpu.tpu_chips_present = lambda: True  # a TPU VM, as far as the launcher can tell
torch.tpu.device_count = lambda: 4
events = []
from torch.tpu import distributed
distributed.set_tpu_launch_env = lambda **arguments: events.append(["set_tpu_launch_env", arguments])
class Workers:
    def __init__(self, count, mp_context=None):
        events.append(["workers", count])
        raise SystemExit
native.ProcessPoolExecutor = Workers
try:
    native.TpuRuntime.spawn(print, (), RuntimeConfig(device="tpu", num_devices=4))
except SystemExit:
    pass
print(json.dumps(events))
"""
    assert json.loads(python(script)) == [["set_tpu_launch_env", {"nproc_per_node": 4}], ["workers", 4]]


def test_torchtpus_own_call_gives_each_rank_an_address_and_keeps_a_pinned_topology():
    script = """
import os
from retinanet_xla.device.native.tpu import set_launch_environment
import torch_tpu
set_launch_environment(4)
print(os.environ["TORCH_TPU_TOPOLOGY"], os.environ["TORCH_TPU_SLICEBUILDER_ADDRESSES"])
"""
    topology, addresses = python(script, TORCH_TPU_TOPOLOGY="2,2,1").split()
    assert topology == "2,2,1"  # set from outside: never overwritten
    hosts = [address.rsplit(":", 1) for address in addresses.split(",")]
    assert len(hosts) == 4 and {host for host, _ in hosts} == {"localhost"} and len({port for _, port in hosts}) == 4
