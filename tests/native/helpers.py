"""Running the real CLI in a subprocess of this environment, or of the other one."""

import os
import signal
import subprocess
from pathlib import Path

from tests.cli_helpers import ROOT, SCRIPT
from tests.cross_backend import NATIVE_ENV as ENV
from tests.cross_backend import metrics

__all__ = ["ENV", "cli", "kill_group", "metrics"]


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
