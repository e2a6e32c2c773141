"""SIGTERM/SIGINT handling: the preemption notice of a Cloud TPU VM (and Ctrl-C).

The first signal asks the trainer to save a checkpoint at the next step boundary and exit; a
second one exits at once (the checkpoint written before is still there: writes are atomic).
"""

import os
import signal
import threading
from typing import Optional

# Exit status after a requested stop with a saved checkpoint (EX_TEMPFAIL: "try again"): a job
# wrapper reruns the same command, which resumes.
EXIT_INTERRUPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionGuard:
    def __init__(self):
        self.signal_number: Optional[int] = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def _handle(self, number, frame) -> None:
        if self.signal_number is not None:
            os._exit(128 + number)
        self.signal_number = number

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
