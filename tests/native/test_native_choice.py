"""Device choice in the native environment, where TorchTPU is installed (on CPython 3.11) but
no TPU is present, and torch-xla is not installed: through the real CLI."""

import importlib.util
import json

import pytest

from tests.cli_helpers import TINY, train_command
from tests.native.helpers import cli

pytestmark = pytest.mark.native


def test_torch_xla_is_absent_and_torchtpu_installed_where_it_installs():
    """What the other tests here rely on: this is the native environment."""
    assert importlib.util.find_spec("torch_xla") is None
    assert importlib.util.find_spec("torch_tpu") is not None


def test_auto_resolves_to_the_cpu_beside_torchtpu_without_chips(tmp_path):
    result = cli(
        "bench", "configs/smoke.yaml", "--steps", "2", "--json", tmp_path / "b.json", "--peak-tflops", "2.5",
        *[a for o in TINY for a in ("--set", o)],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench["device"] == "cpu" and bench["step_graph"] == "eager"
    # The given peak, not the CPU's measured one; the printed line says the same.
    assert bench["peak_source"] == "--peak-tflops" and bench["peak_tflops_per_device"] == 2.5
    assert bench["utilisation"] == pytest.approx(bench["achieved_tflops_per_device"] / 2.5, abs=1e-4)
    assert f"{bench['utilisation']:.1%} of its peak 2.5 (--peak-tflops)" in result.stdout
    assert "torch_tpu" not in result.stderr and "PrivateUse1" not in result.stderr  # never imported


@pytest.mark.parametrize(
    "device, message",
    [
        (
            "tpu",
            "error: runtime.device is tpu but no TPU is visible on this machine (no /dev/accel* or /dev/vfio); use runtime.device=cpu or auto",
        ),
        (
            "xla",
            "error: runtime.device is xla but torch-xla is not installed: pip install 'retinanet-xla[xla]', or use runtime.device=auto",
        ),
    ],
)
def test_a_device_this_machine_cannot_run_is_one_line_and_exit_2(tmp_path, device, message):
    result = cli(*train_command(tmp_path / "run", f"runtime.device={device}")[1:], timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]
