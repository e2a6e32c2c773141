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
for _ in range(4):  # the heap grows, and its free blocks settle (64-byte aligned ones leave slivers)
    faults_of_a_second_allocation()
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


def test_huge_pages_are_asked_for_on_xla_cpu_only_and_never_over_a_users_tunables(monkeypatch):
    from retinanet_xla.xla import cpu_memory
    from retinanet_xla.xla.cpu_memory import HUGE_PAGES_TUNABLE, environment_for_huge_pages

    assert environment_for_huge_pages({"PJRT_DEVICE": "CPU", "HOME": "/h"}) == {
        "PJRT_DEVICE": "CPU",
        "HOME": "/h",
        "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE,
    }
    assert environment_for_huge_pages({"PJRT_DEVICE": "cpu"})["GLIBC_TUNABLES"] == HUGE_PAGES_TUNABLE
    assert environment_for_huge_pages({"PJRT_DEVICE": "TPU"}) is None
    assert environment_for_huge_pages({}) is None  # eager, or XLA's default device
    # Set by the user, or by the restart itself: never started again.
    assert environment_for_huge_pages({"PJRT_DEVICE": "CPU", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}) is None
    assert environment_for_huge_pages({"PJRT_DEVICE": "CPU", "GLIBC_TUNABLES": ""}) is None
    # Other C libraries, and glibc before 2.35 (no such tunable): left alone.
    monkeypatch.setattr(cpu_memory.os, "confstr", lambda name: "glibc 2.34")
    assert environment_for_huge_pages({"PJRT_DEVICE": "CPU"}) is None
    monkeypatch.setattr(cpu_memory.os, "confstr", lambda name: "musl 1.2")
    assert environment_for_huge_pages({"PJRT_DEVICE": "CPU"}) is None

    def no_such_name(name):
        raise ValueError(name)

    monkeypatch.setattr(cpu_memory.os, "confstr", no_such_name)
    assert environment_for_huge_pages({"PJRT_DEVICE": "CPU"}) is None
