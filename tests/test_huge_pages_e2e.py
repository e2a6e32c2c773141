"""The console script on XLA's CPU client: it starts itself again with glibc's huge pages
tunable, and the step's scratch buffer stops being faulted in page by page every step
(xla/cpu_memory.py). Through the real script, on the smoke model, whose scratch buffer is
larger than a thread's heap."""

import json
import os
import subprocess

from retinanet_xla.xla.cpu_memory import HUGE_PAGES_TUNABLE
from tests.cli_helpers import ROOT, SCRIPT


def _bench(tmp_path, **extra_env):
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    env.update(PJRT_DEVICE="CPU", **extra_env)
    out = tmp_path / "bench.json"
    command = [str(SCRIPT), "bench", str(ROOT / "configs" / "smoke.yaml"), "--steps", "3", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_xla_cpu_steps_run_without_mapping_their_buffers_afresh(tmp_path):
    bench = _bench(tmp_path)
    assert bench["glibc_tunables"] == HUGE_PAGES_TUNABLE
    assert bench["device"].startswith("xla") and bench["compilations_after_warmup"] == 0
    # Measured: 23 per step (about 10,900 without the tunable, below).
    assert bench["page_faults_per_step"] < 2_000


def test_a_users_own_glibc_tunables_win(tmp_path):
    bench = _bench(tmp_path, GLIBC_TUNABLES="glibc.malloc.tcache_count=7")  # glibc's default value
    assert bench["glibc_tunables"] == "glibc.malloc.tcache_count=7"
    # The scratch buffer mapped afresh and faulted in 4 KiB at a time, every step.
    assert bench["page_faults_per_step"] > 5_000
