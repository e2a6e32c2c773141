"""Headless Chromium (Debian's package, /usr/bin/chromium) taking a screenshot of a page, as the
report test needs. `.ci/run` installs the package where it is missing."""

import shutil
import subprocess
import tempfile
from pathlib import Path

# Without the networking flags Chromium keeps trying Google's hosts, which a closed network
# refuses many times a second; as root it needs --no-sandbox.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "this test needs Debian's chromium package: apt-get install chromium (.ci/run installs it)"
    return found


def screenshot(page: Path, target: Path, width: int = 1280, height: int = 1600) -> Path:
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                chromium(),
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={target}",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0 and target.is_file(), result.stderr[-2000:]
    return target
