"""Running the real CLI in a subprocess of this environment, or of the other one."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.cli_helpers import ROOT, SCRIPT

ENV = {key: value for key, value in os.environ.items() if key not in ("PJRT_DEVICE", "CPU_NUM_DEVICES")}


def cli(*args, timeout: int = 900, script: Path = SCRIPT, env=None) -> subprocess.CompletedProcess:
    """``retinanet-xla ARGS`` in its own process group (replica processes included), killed
    whole at the end so that no replica outlives the test."""
    process = subprocess.Popen(
        [str(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or ENV,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        kill_group(process)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def xla_script() -> Path:
    """The torch-xla environment's console script: `make test` names it in RETINANET_XLA_ENV."""
    bin_dir = os.environ.get("RETINANET_XLA_ENV")
    if not bin_dir or not (Path(bin_dir) / "retinanet-xla").exists():
        pytest.fail("set RETINANET_XLA_ENV to the torch-xla environment's bin/ (make test does: .venv/bin)")
    return Path(bin_dir) / "retinanet-xla"


def metrics(output: Path):
    """The training lines of metrics.jsonl, by step."""
    lines = map(json.loads, (output / "metrics.jsonl").read_text().splitlines())
    return {line["step"]: line for line in lines if "loss" in line}
