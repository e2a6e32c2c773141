"""Which runtime a command gets: ``runtime.device`` resolved on the machine that runs it, and
the CPU client's launch setting."""

import json
import os
import subprocess

import pytest
import torch

from retinanet_xla.device import choice
from retinanet_xla.device.xla.runtime import prefer_nonblocking_cpu_client
from tests.cli_helpers import ROOT, SCRIPT, TINY


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


@pytest.mark.parametrize(
    "setting, pjrt_device, chips, installed, cuda, expected",
    [
        ("auto", "CPU", False, {"torch_xla"}, True, "xla"),  # PJRT_DEVICE names XLA's device, even beside a GPU
        ("auto", None, True, {"torch_tpu", "torch_xla", "libtpu"}, False, "tpu"),  # TorchTPU first on a TPU VM
        ("auto", None, True, {"torch_xla", "libtpu"}, False, "xla"),  # a TPU VM with torch-xla's TPU runtime
        ("auto", None, True, {"torch_xla"}, False, "cpu"),  # chips, but torch-xla without its TPU runtime
        ("auto", None, False, {"torch_tpu"}, False, "cpu"),  # TorchTPU installed on a machine without TPUs
        ("auto", None, False, set(), True, "cuda"),
        ("auto", None, False, set(), False, "cpu"),
        ("xla", None, False, {"torch_xla"}, False, "xla"),  # an explicit device is never second-guessed
        ("cpu", "TPU", True, {"torch_tpu", "torch_xla", "libtpu"}, True, "cpu"),
    ],
)
def test_runtime_device_auto_picks_xla_with_pjrt_device_then_torchtpu_then_torch_xla_on_chips_then_cuda_then_cpu(
    monkeypatch, setting, pjrt_device, chips, installed, cuda, expected
):
    if pjrt_device is None:
        monkeypatch.delenv("PJRT_DEVICE", raising=False)
    else:
        monkeypatch.setenv("PJRT_DEVICE", pjrt_device)
    monkeypatch.setattr(choice, "tpu_chips_present", lambda: chips)
    monkeypatch.setattr(choice, "_installed", lambda module: module in installed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert choice.resolve_device(setting) == expected


@pytest.mark.parametrize(
    "entries, expected",
    [((), False), (("accel0",), True), (("vfio/12",), True), (("vfio/vfio", "accelerator"), False), (("null",), False)],
)
def test_tpu_chips_are_the_accel_devices_or_numbered_vfio_groups(tmp_path, entries, expected):
    """v2-v4 chips appear as /dev/accelN, v5e and later as numbered VFIO groups; the VFIO
    control node and other devices are not chips."""
    for entry in entries:
        (tmp_path / entry).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / entry).touch()
    assert choice.tpu_chips_present(tmp_path) is expected


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
