"""`retinanet-xla bench` in a process of its own, for the benchmarks that compare networks: one
network's compilations and memory then do not count towards the next."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"


def bench_in_own_process(settings: List[str], steps: int, on_xla: bool = True) -> dict:
    """`bench configs/smoke.yaml --steps STEPS --set ...`, on PJRT_DEVICE=CPU where `on_xla`, else
    without PJRT_DEVICE (an eager run as a user without XLA starts it); its JSON result, or exit
    with the run's error."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "bench.json"
        command = [sys.executable, "-m", "retinanet_xla", "bench", str(SMOKE), "--steps", str(steps), "--json", str(out)]
        for setting in settings:
            command += ["--set", setting]
        # From the checkout's root, `-m` imports this checkout's package: the code measured. As the
        # console script does, it starts itself again with glibc's huge pages on XLA:CPU (__main__.py).
        env = {key: value for key, value in os.environ.items() if key != "PJRT_DEVICE"}
        if on_xla:
            env["PJRT_DEVICE"] = "CPU"
        finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        if finished.returncode != 0:
            sys.exit(f"bench {' '.join(settings)}: failed ({finished.returncode}):\n{finished.stderr[-2000:]}")
        return json.loads(out.read_text())
