"""Keep the memory a step frees in the process, for the next step (XLA's CPU client only).

XLA:CPU allocates a step's buffers with ``malloc`` and frees them when the step ends. glibc
serves blocks above its mmap threshold with ``mmap`` and unmaps them on ``free``, so every step
maps them afresh and the kernel zero-fills each page on its first write: a fault per 4 KiB
page, every step. Here glibc is told to serve every block from its heaps (``M_MMAP_MAX`` 0;
the threshold at its maximum for the blocks it still maps: above 64 MiB in a thread's arena),
to grow them 256 MiB at a time and not to give freed memory back below 2 GiB: the process
keeps its peak memory, which a training step reuses every step.

Measured on the 2-core AMD EPYC VM (2026-12-02): a fused elementwise op writing a
4x96x128x128 float32 tensor 8.5-10.1 ms -> 2.1 ms; EfficientNet-B0's training step at
256x256, batch 4, 704-780 ms -> 646 ms (the first step's compilation unchanged, 39-46 s
against 43 s). ``MALLOC_ARENA_MAX=1`` as well (every thread on the main heap) gave 567-602 ms,
but compilation took 53-55 s: a user may set it. Eager PyTorch showed no gain (414-553 ms
either way, noisy), and on a TPU the step's buffers are the device's.

A user's own ``MALLOC_*`` settings win (glibc reads them at start); other C libraries are left
alone.

One block escapes this: the step's scratch buffer, all its intermediate tensors in one
allocation (518 MB for EfficientNet-B0's step at 256x256, batch 4). torch_xla runs the step on
a thread of its own, and glibc serves a thread's blocks above 64 MiB with ``mmap`` whatever
``M_MMAP_MAX`` says (a thread's heap cannot grow past 64 MiB), so that block is still mapped,
faulted in 4 KiB at a time and unmapped every step: about 26,000 page faults per step, and a
third of the CPU samples of that step (``perf``) in the kernel, zeroing and mapping pages.
``mallopt`` has no remedy that spares the other threads (``M_ARENA_MAX`` 1 puts every thread on
the main heap: the step went 450 -> 376-401 ms, but compilation took 30% longer and the host's
tracing twice as long, through the heap's lock). glibc's ``glibc.malloc.hugetlb=1`` tunable
does: the blocks it maps are asked for as transparent huge pages, one fault per 2 MiB. It is
read only when a process starts, so the console script starts itself again with it
(``retinanet_xla/__main__.py``, ``environment_for_huge_pages``).
"""

import ctypes
import ctypes.util
import os
from typing import Dict, Mapping, Optional

# glibc's mallopt parameters (malloc.h) and the values set here.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_SETTINGS = (
    (_M_MMAP_MAX, 0),
    (_M_MMAP_THRESHOLD, 32 * 2**20),  # glibc's maximum on 64-bit systems
    (_M_TOP_PAD, 256 * 2**20),
    (_M_TRIM_THRESHOLD, 2**31 - 1),  # the largest value mallopt takes
)


def keep_freed_memory() -> bool:
    """Have glibc's ``malloc`` keep freed memory for reuse; True if it was set here."""
    if any(key.startswith("MALLOC_") for key in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: these numbers mean other things
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in _SETTINGS)


# glibc 2.35 and later: malloc asks for transparent huge pages (madvise) where it maps memory or
# grows its heap. A kernel whose transparent huge pages are off ignores the request.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def _glibc_version() -> Optional[tuple]:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):  # not glibc, or not a POSIX system
        return None
    return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else None


def environment_for_huge_pages(environ: Mapping[str, str]) -> Optional[Dict[str, str]]:
    """The environment to start this process again with, so that glibc's malloc uses
    transparent huge pages for XLA:CPU's step buffers; None where that does not apply: XLA is
    not on its CPU client (``PJRT_DEVICE`` is not ``CPU``), the C library is not glibc 2.35 or
    later, or ``GLIBC_TUNABLES`` is set already (the user's, or this process was started again).

    Only for XLA's CPU client: eager PyTorch's step showed no gain (EfficientNet-B0 271-354 ms
    with it against 282-297 ms without, ResNet-18 294-296 against 266-272 ms, alternating
    pairs), and on a TPU the step's buffers are the device's."""
    if environ.get("PJRT_DEVICE", "").upper() != "CPU" or "GLIBC_TUNABLES" in environ:
        return None
    version = _glibc_version()
    if version is None or version < (2, 35):
        return None
    return {**environ, "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}
