"""Batches on their way to the device: a background copy to an XLA device, and how long the loop
waited for them."""

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Dict, Iterable, Optional

import torch

if TYPE_CHECKING:
    from retinanet_xla.xla.runtime import Runtime

logger = logging.getLogger(__name__)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class DeviceFeed:
    """Host batches copied to an XLA device by a background thread, up to ``depth`` batches
    ahead of the loop, so that the copy overlaps the step that runs.

    torch_xla's ``MpDeviceLoader`` does the same, but each of its ``next()`` calls syncs too:
    with steps launched without waiting (the CPU client, ``prefer_nonblocking_cpu_client``)
    that sync waits for the step just launched, and the host can no longer trace the next step
    while the device runs this one. Its thread also swallows the host loader's errors and ends
    the stream as if the data had run out; here the loop gets the error itself."""

    def __init__(self, batches: Iterable[Dict[str, torch.Tensor]], device: torch.device, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._ended = self._closed = False
        self._thread = threading.Thread(target=self._copy, args=(batches, device), name="device-feed", daemon=True)
        self._thread.start()

    def _copy(self, batches: Iterable[Dict[str, torch.Tensor]], device: torch.device) -> None:
        import torch_xla.core.xla_model as xm

        stream = iter(batches)
        try:
            for batch in stream:
                if self._closed:
                    return
                self._queue.put(xm.send_cpu_data_to_device(batch, device))
        except BaseException as error:  # noqa: BLE001 - handed to the loop's thread
            self._queue.put(_Failure(error))
        else:
            self._queue.put(_END)
        finally:
            if hasattr(stream, "close"):
                stream.close()  # a generator's cleanup runs now: a data loader's workers end

    def __iter__(self) -> "DeviceFeed":
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._ended:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._ended = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._ended = True
            raise item.error
        return item

    def close(self, timeout: float = 60.0) -> None:
        """The loop is done with the batches (it may stop early): stop copying, close the host
        stream, and wait for the thread to end. A copy still inside torch_xla when the
        interpreter exits can abort the process ("terminate called without an active
        exception": seen once, in a run stopped by SIGTERM, before this wait)."""
        self._closed = self._ended = True
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                while True:
                    self._queue.get_nowait()  # frees a copy blocked on a full queue
            except queue.Empty:
                pass
            self._thread.join(0.05)
        if self._thread.is_alive():
            logger.warning("the batch copy thread is still waiting for the host loader after %.0f s", timeout)


class TimedBatches:
    """An iterator of batches that counts the seconds the loop waited for the next one. Device
    work is queued asynchronously, so while the loop waits the device finishes what was queued
    and then idles: the wait is an upper bound on the device's time starved of input."""

    def __init__(self, batches: Iterable):
        self._source = batches
        self._batches = iter(batches)
        self.wait_seconds = 0.0

    def close(self) -> None:
        if isinstance(self._source, DeviceFeed):
            self._source.close()

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

    def __init__(self, runtime: "Runtime", batches: TimedBatches):
        self.runtime, self.batches = runtime, batches
        self.start = (time.perf_counter(), batches.wait_seconds, runtime.device_seconds())

    def fractions(self) -> Dict[str, Optional[float]]:
        start_time, start_wait, start_device = self.start
        wall = max(time.perf_counter() - start_time, 1e-9)
        waiting = (self.batches.wait_seconds - start_wait) / wall
        device = self.runtime.device_seconds()
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
