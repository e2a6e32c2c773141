import json
import os
import subprocess
import sys

# Page faults of writing a 64 MiB tensor, freeing it and writing a new one, before and after
# keep_freed_memory (in a fresh process: the setting is process-wide).
_PROBE = """
import json, resource, torch
from retinanet_xla.xla.cpu_memory import keep_freed_memory

def faults_of_a_second_allocation():
    torch.ones(16 * 2**20)  # 64 MiB, written, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_a_second_allocation()
kept = keep_freed_memory()
faults_of_a_second_allocation()  # the heap grows once
print(json.dumps({"default": default, "kept": kept, "after": faults_of_a_second_allocation()}))
"""


def _probe(**extra_env):
    """The probe's counts, run without this environment's own ``MALLOC_*`` settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env={**env, **extra_env}, check=True)
    return json.loads(out.stdout)


def test_freed_memory_is_reused_without_page_faults():
    result = _probe()
    assert result["kept"] is True
    # 64 MiB is 16,384 pages of 4 KiB: mapped afresh, each faults; reused, almost none does.
    assert result["default"] > 10_000
    assert result["after"] < 1_000


def test_a_users_own_malloc_settings_win():
    result = _probe(MALLOC_ARENA_MAX="1")
    assert result["kept"] is False
    assert result["after"] > 10_000  # glibc's default behaviour: mapped afresh
