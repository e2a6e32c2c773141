"""How long the loop waits for its batches, and what share of the time that was."""

import time
from typing import Callable, Dict, Iterable, Optional


class TimedBatches:
    """An iterator of batches that counts the seconds the loop waited for the next one. Device
    work is queued asynchronously, so while the loop waits the device finishes what was queued
    and then idles: the wait is an upper bound on the device's time starved of input."""

    def __init__(self, batches: Iterable):
        self._source = batches
        self._batches = iter(batches)
        self.wait_seconds = 0.0

    def close(self) -> None:
        """The loop is done with the batches (it may stop early): the source stops, and a
        generator's cleanup runs now (a data loader's workers end)."""
        close = getattr(self._source, "close", None)
        if close is not None:
            close()

    def __iter__(self) -> "TimedBatches":
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self._batches)
        finally:
            self.wait_seconds += time.perf_counter() - start


class InputWait:
    """How much of the wall time since it was created went to waiting for input.

    ``input_wait_fraction``: the loop blocked on the next batch. ``device_idle_fraction``: the
    devices executed nothing (for any reason). The device can only have waited for input while
    both held, so ``device_wait_fraction`` is the smaller: an upper bound. (The first alone can
    overstate: a loop that blocks on its batch while the device still runs queued steps.)"""

    def __init__(self, device_seconds: Callable[[], Optional[float]], batches: TimedBatches):
        """``device_seconds``: the runtime's (``Runtime.device_seconds``)."""
        self.device_seconds, self.batches = device_seconds, batches
        self.start = (time.perf_counter(), batches.wait_seconds, device_seconds())

    def fractions(self) -> Dict[str, Optional[float]]:
        start_time, start_wait, start_device = self.start
        wall = max(time.perf_counter() - start_time, 1e-9)
        waiting = (self.batches.wait_seconds - start_wait) / wall
        device = self.device_seconds()
        idle = None if device is None else min(max(1.0 - (device - start_device) / wall, 0.0), 1.0)
        return {
            "input_wait_fraction": round(waiting, 4),
            "device_idle_fraction": None if idle is None else round(idle, 4),
            "device_wait_fraction": round(waiting if idle is None else min(waiting, idle), 4),
        }


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
