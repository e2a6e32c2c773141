"""Stop requests: SIGTERM/SIGINT (the preemption notice of a Cloud TPU VM, and Ctrl-C), or a
``STOP`` file in the output directory.

The first signal asks the trainer to save a checkpoint at the next step boundary and exit; a
second one exits at once (the checkpoint written before is still there: writes are atomic).
The signal handler writes the ``STOP`` file, which is how replicas running in threads or in a
child process (several devices) learn of it; a user or a job wrapper may create it too.
"""

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Optional

from retinanet_xla.errors import STOP_SIGNALS


def stop_file(output_dir: Path) -> Path:
    return Path(output_dir) / "STOP"


class PreemptionGuard:
    def __init__(self, stop_path: Optional[Path] = None):
        self.stop_path = stop_path
        self.signal_number: Optional[int] = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None or (self.stop_path is not None and self.stop_path.exists())

    @property
    def reason(self) -> Optional[str]:
        if self.signal_number is not None:
            return f"by signal {self.signal_number}"
        if self.stop_path is not None and self.stop_path.exists():
            written = self.stop_path.read_text().strip()  # what the launcher's handler saw
            return f"by {written}" if written.startswith("signal") else f"because {self.stop_path} exists"
        return None

    def _handle(self, number, frame) -> None:
        if self.signal_number is not None:
            os._exit(128 + number)
        self.signal_number = number
        if self.stop_path is not None:
            # Before the run's directory exists, the number alone is kept: the run writes
            # the file once it is prepared (commands/train.py).
            with contextlib.suppress(OSError):
                self.stop_path.write_text(f"signal {number}\n")

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
