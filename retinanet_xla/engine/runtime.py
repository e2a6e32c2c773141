"""The device the loop runs on: an XLA device (TPU, or CPU through PJRT) or, for debugging,
eager CPU/CUDA. Everything XLA-specific the loop needs sits behind this one class."""

import contextlib
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import torch

logger = logging.getLogger(__name__)


def _compile_progress() -> int:
    """Grows when a graph of this process was compiled (cached) or found in the cache."""
    import torch_xla.debug.metrics as metrics
    import torch_xla.runtime as xr

    return xr.get_num_cached_compilation_graph() + (metrics.counter_value("CachedCompile") or 0)


class LaunchOrder:
    """Replicas that are threads of one process (the CPU client with ``CPU_NUM_DEVICES=N``) get
    each collective graph from one compilation.

    Two threads compiling the same graph at once give its all-reduce different op ids, and it
    deadlocks until XLA aborts the process after 10 s (torch-xla 2.9.0, CPU). So the replicas
    take turns in rank order, and a replica's turn ends as soon as its graph is compiled or
    found in the cache: not when it returns, because a launch waits for the graph (``sync``),
    which waits in the all-reduce for the next replicas to launch theirs. At most one replica is
    between "started" and "past compilation" at a time, so the process-wide counters tell.

    Rank 0 starts a launch only once every replica has arrived at it. Otherwise another replica
    could still be compiling a graph without collectives (an evaluation batch), and its
    compilation would end rank 0's turn early, and the next replica would compile the same
    collective graph at the same time.
    """

    def __init__(self, world: int):
        self.world = world
        self._cond = threading.Condition()
        self._arrived = [0] * world  # collective launches each replica has reached
        self._started = [0] * world  # ... started
        self._passed = [0] * world  # ... and got past compilation
        self._marks = [0] * world  # _compile_progress() when each replica started its last one

    def _may_start(self, rank: int, launch_number: int) -> bool:
        progress = _compile_progress()
        for k in range(self.world):
            if self._passed[k] < self._started[k] and progress > self._marks[k]:
                self._passed[k] = self._started[k]
        before = all(self._passed[k] > launch_number for k in range(rank))
        after = all(self._passed[k] >= launch_number for k in range(rank + 1, self.world))
        return before and after

    def run(self, rank: int, launch: Callable[[], None]) -> None:
        with self._cond:
            number = self._started[rank]
            self._arrived[rank] = number + 1
            self._cond.notify_all()
            while not (min(self._arrived) > number and self._may_start(rank, number)):
                self._cond.wait(0.005)
            self._started[rank], self._marks[rank] = number + 1, _compile_progress()
        try:
            launch()
        finally:
            with self._cond:
                self._passed[rank] = max(self._passed[rank], number + 1)
                self._cond.notify_all()


_LAUNCH_ORDERS: Dict[int, LaunchOrder] = {}
_LAUNCH_ORDERS_LOCK = threading.Lock()


def launch_order(world: int) -> LaunchOrder:
    """The one LaunchOrder of this process's ``world`` replica threads."""
    with _LAUNCH_ORDERS_LOCK:
        return _LAUNCH_ORDERS.setdefault(world, LaunchOrder(world))


def prefer_nonblocking_cpu_client() -> None:
    """Have torch_xla's CPU client launch a step without waiting for it to run. Call before
    the client exists; a user's own ``PJRT_CPU_ASYNC_CLIENT`` wins.

    With the client's default (``PJRT_CPU_ASYNC_CLIENT=1``), torch-xla 2.9.0's ``sync()``
    returned only once the step had run (measured: 590 ms of a 600 ms smoke step), so the host
    traced the next step while the device idled, 12-13% of the wall time. With ``0`` the launch
    returns at once, and tracing overlaps the running step (docs/performance.md)."""
    if os.environ.get("PJRT_DEVICE", "CPU").upper() == "CPU":
        os.environ.setdefault("PJRT_CPU_ASYNC_CLIENT", "0")


def compile_cache_dir(setting: Optional[str]) -> Optional[Path]:
    """``auto``: on TPU, ``$XDG_CACHE_HOME/retinanet-xla/xla/...`` (``~/.cache/...``), one
    directory per torch_xla version; elsewhere none, because torch_xla 2.9's CPU client cannot
    load the executables it writes (measured: ``PersistentCacheDeserializeFailure`` on every
    reload). ``None``/``none``: no persistent cache. Anything else: that directory."""
    if setting is None or setting.lower() in ("none", "null", ""):
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    device = os.environ.get("PJRT_DEVICE", "").upper()
    if device != "TPU":
        return None
    import torch_xla

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "retinanet-xla" / "xla" / f"torch_xla-{torch_xla.__version__}-tpu"


class Runtime:
    def __init__(
        self, kind: str = "xla", compile_cache: Optional[str] = None, rank: int = 0, order: Optional[LaunchOrder] = None
    ):
        self.kind = kind
        self.rank, self.order = rank, order  # order: set when replicas are threads of this process
        self.compile_cache = None
        self._after_sync = []
        if kind == "xla":
            import torch_xla
            import torch_xla.runtime as xr

            prefer_nonblocking_cpu_client()
            cache = compile_cache_dir(compile_cache)
            # Compiled executables are written to disk and reused by the next launch of the same
            # graph (a second run, a resume after preemption): no recompilation across runs.
            # Only possible before the first computation of the process.
            if cache is not None and not torch_xla._XLAC._xla_computation_cache_is_initialized():
                cache.mkdir(parents=True, exist_ok=True)
                xr.initialize_cache(str(cache), readonly=False)
                self.compile_cache = cache
            self.device = torch_xla.device()
        elif kind == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("runtime.device is cuda but no CUDA device is available")
            self.device = torch.device("cuda")
        else:
            self.device = torch.device("cpu")

    @property
    def is_xla(self) -> bool:
        return self.kind == "xla"

    def sync(self, collective: bool = False) -> None:
        """End the traced step: XLA compiles (first time) and launches the graph asynchronously.
        ``collective``: the graph all-reduces across replicas and every replica launches it at
        the same point (see LaunchOrder); replicas that are threads of this process wait for
        it. Then the ``on_step_end`` callbacks run."""
        if self.is_xla:
            import torch_xla

            if collective and self.order is not None:
                device = torch_xla._XLAC._xla_get_default_device()
                # Launched and waited for. With the collective steps left to run asynchronously, a
                # 2-device CPU run deadlocked after 40-75 s: one replica's step waited in its
                # all-reduce while the other replica's launch waited for its device, still held
                # by the cleanup of its previous step. The wait also means the step's all-reduce
                # token, which sync() drops, is computed: freeing it earlier waited for the step
                # while holding the GIL.
                self.order.run(self.rank, lambda: torch_xla._XLAC._xla_step_marker(device, [], wait=True))
            torch_xla.sync()
        pending, self._after_sync = self._after_sync, []
        for callback, tensors in pending:
            callback({k: v.item() for k, v in tensors.items()})

    def separate_scalars(self, tensors: Iterable[torch.Tensor]) -> None:
        """Give every 0-dim tensor its own device buffer, then sync.

        torch_xla caches host-to-device transfers of scalars by value, so after loading a
        checkpoint the 20 BatchNorm ``num_batches_tracked`` buffers of a ResNet-18 (all equal)
        share one device buffer. The first step's graph then has fewer inputs than every later
        step's, and step 2 compiles again. An in-place ``add_(0)`` gives each its own output.
        """
        if not self.is_xla:
            return
        with torch.no_grad():
            for tensor in tensors:
                if tensor.dim() == 0:
                    tensor.add_(0)
        self.sync()

    def wait(self) -> None:
        """Block until this device has finished all launched work (for honest timings)."""
        if self.is_xla:
            import torch_xla.core.xla_model as xm

            # This replica's device only: waiting for all of a process's devices would wait
            # for another replica's next collective step, which waits for this replica.
            xm.wait_device_ops(xm.xla_real_devices([self.device]))
        elif self.kind == "cuda":
            torch.cuda.synchronize()

    def on_step_end(self, callback: Callable, tensors: Dict[str, torch.Tensor]) -> None:
        """Call ``callback(values)`` with host copies of ``tensors`` right after the next
        ``sync()`` has launched the step (what a torch_xla step closure does). Only the steps
        that log pay the wait for the device."""
        self._after_sync.append((callback, tensors))

    def autocast(self, precision: str):
        if precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type="xla" if self.is_xla else self.device.type, dtype=torch.bfloat16)

    def compilations(self) -> Dict[str, float]:
        """Graphs compiled so far in this process, the seconds spent compiling them, and how the
        persistent cache fared (hits, misses, and executables it could not load)."""
        if not self.is_xla:
            return {"count": 0, "seconds": 0.0}
        import torch_xla.debug.metrics as metrics

        data = metrics.metric_data("CompileTime")
        found = {"count": int(data[0]), "seconds": data[1] / 1e9} if data else {"count": 0, "seconds": 0.0}
        if self.compile_cache is not None:
            for counter, key in (
                ("PersistentCacheHit", "cache_hits"),
                ("PersistentCacheMiss", "cache_misses"),
                ("PersistentCacheDeserializeFailure", "cache_load_failures"),
            ):
                found[key] = metrics.counter_value(counter) or 0
        return found

    def device_batches(self, batches: Iterable[Dict[str, torch.Tensor]]) -> "TimedBatches":
        """Batches on the device. On XLA a background thread copies the next batches while the
        device runs the current step (``DeviceFeed``)."""
        if self.is_xla:
            return TimedBatches(DeviceFeed(batches, self.device))
        return TimedBatches({k: v.to(self.device, non_blocking=True) for k, v in batch.items()} for batch in batches)

    def device_seconds(self) -> Optional[float]:
        """Seconds each device of this process has spent executing graphs so far (torch_xla's
        ``ExecuteTime``, averaged over the process's devices); None off XLA."""
        if not self.is_xla:
            return None
        import torch_xla.debug.metrics as metrics
        import torch_xla.runtime as xr

        data = metrics.metric_data("ExecuteTime")
        return (data[1] / 1e9 if data else 0.0) / max(xr.addressable_device_count(), 1)

    def start_profile(self, log_dir: Path) -> None:
        """Start torch_xla's profiler (host and device activity); TensorBoard's profile plugin
        reads what ``stop_profile`` writes under ``log_dir``."""
        if self.is_xla:
            import torch_xla.debug.profiler as profiler

            log_dir.mkdir(parents=True, exist_ok=True)
            profiler.start_trace(str(log_dir))

    def stop_profile(self) -> None:
        if self.is_xla:
            import torch_xla.debug.profiler as profiler

            self.wait()  # the traced steps' device work belongs in the trace
            profiler.stop_trace()


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
