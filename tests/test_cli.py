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


def test_the_console_script_starts_one_interpreter_on_the_cpu_client(tmp_path):
    """No command re-executes itself (an earlier version restarted under PJRT_DEVICE=CPU with
    glibc tunables, which its data-loader workers inherited): every interpreter that starts
    runs the ``sitecustomize`` below once, so a restart would add a line."""
    (tmp_path / "sitecustomize.py").write_text(
        f"import os\nwith open({str(tmp_path / 'starts')!r}, 'a') as f:\n    f.write(str(os.getpid()) + '\\n')\n"
    )
    script = Path(sys.executable).parent / "retinanet-xla"
    env = {"PATH": "/usr/bin:/bin", "PJRT_DEVICE": "CPU", "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and "Usage: retinanet-xla" in result.stdout
    assert len((tmp_path / "starts").read_text().split()) == 1


def test_help_and_version_do_not_import_torch():
    """`--help` and `--version` answer without torch (seconds to import; docs/performance.md,
    "Start-up"): the commands import what they run when they run."""
    probe = (
        "import sys\n"
        "from retinanet_xla.cli import app\n"
        "for arguments in (['--version'], ['--help'], ['train', '--help'], ['data', 'convert', '--help']):\n"
        "    try:\n"
        "        app(arguments)\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 0, (arguments, done.code)\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "False"
