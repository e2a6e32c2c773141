"""One training run per output directory at a time.

Two runs writing one directory interleave their ``metrics.jsonl`` rows and overwrite each
other's checkpoints and config. ``train`` holds an exclusive POSIX record lock (``lockf``) on
``OUTPUT/.lock`` for as long as it runs; the kernel releases it when the process ends in any
way (SIGKILL, a preempted VM), so a crashed run never leaves a stale lock behind. Not ``flock``:
its lock belongs to the open file, which forked data-loading workers inherit, and a killed
run's workers held it for seconds after their parent died. Local and NFS paths only.
"""

import errno
import fcntl
import os
from pathlib import Path
from typing import Optional

from retinanet_xla.errors import ConfigError

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self._handle: Optional[int] = None

    def __enter__(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:  # the run's first write: a read-only or full disk, a file in the way
            raise ConfigError(f"{self.path.parent}: cannot write the run here ({error.strerror})") from None
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(handle)
                raise
            holder = os.read(handle, 64).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            raise ConfigError(
                f"{self.path.parent}: another train run (pid {holder}) is writing to this directory; wait for it or use another --output"
            ) from None
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            fcntl.lockf(self._handle, fcntl.LOCK_UN)
            os.close(self._handle)
            self._handle = None
