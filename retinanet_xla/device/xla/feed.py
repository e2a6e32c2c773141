"""Batches on their way to an XLA device: copied by a background thread."""

import logging
import queue
import threading
import time
from typing import Dict, Iterable, Sequence

import torch

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

    def __init__(
        self,
        batches: Iterable[Dict[str, torch.Tensor]],
        device: torch.device,
        host_keys: Sequence[str] = (),
        depth: int = 4,
    ):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._ended = self._closed = False
        self._host_keys = frozenset(host_keys)
        self._thread = threading.Thread(target=self._copy, args=(batches, device), name="device-feed", daemon=True)
        self._thread.start()

    def _copy(self, batches: Iterable[Dict[str, torch.Tensor]], device: torch.device) -> None:
        import torch_xla.core.xla_model as xm

        stream = iter(batches)
        try:
            for batch in stream:
                if self._closed:
                    return
                to_device = {key: value for key, value in batch.items() if key not in self._host_keys}
                on_host = {key: value for key, value in batch.items() if key in self._host_keys}
                self._queue.put({**xm.send_cpu_data_to_device(to_device, device), **on_host})
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
