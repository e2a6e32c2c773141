import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from retinanet_xla import __version__
from retinanet_xla.cli import app


def test_version_flag_prints_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"retinanet-xla {__version__}"


def test_console_script_is_installed_and_shows_help():
    script = Path(sys.executable).parent / "retinanet-xla"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "Usage: retinanet-xla" in result.stdout
