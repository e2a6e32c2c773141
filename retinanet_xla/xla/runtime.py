"""The device the loop runs on: an XLA device (TPU, or CPU through PJRT) or, for debugging,
eager CPU/CUDA. Everything XLA-specific the loop needs sits behind this one class."""

import contextlib
import functools
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Protocol, Sequence

import torch
from torch import nn

from retinanet_xla.xla.cpu_kernels import use_xla_cpu_kernels
from retinanet_xla.xla.cpu_memory import keep_freed_memory
from retinanet_xla.xla.feed import DeviceFeed, TimedBatches
from retinanet_xla.xla.replay import GraphReplay, Step


class GraphLaunchOrder(Protocol):
    """How replicas that are threads of this process take turns launching a collective graph
    (the distributed layer's ``LaunchOrder``)."""

    def run(self, rank: int, launch: Callable[[], None]) -> None: ...


def resolve_device(setting: str) -> str:
    """``runtime.device`` as the kind of device to use: ``auto`` is ``xla`` where XLA has a
    device to run on (``PJRT_DEVICE`` set, or a TPU VM's chips under ``/dev``), else ``cuda``
    when a CUDA device is available, else eager ``cpu``, which compiles nothing (XLA:CPU's first
    step takes 17-86 s) and whose step takes 0.6-1.5x XLA:CPU's for every shipped backbone
    (docs/models.md). Resolved where it is used, never stored: a checkpoint's config says
    ``auto`` and the machine that loads it decides."""
    if setting != "auto":
        return setting
    if os.environ.get("PJRT_DEVICE") or tpu_chips_present():
        return "xla"
    return "cuda" if torch.cuda.is_available() else "cpu"


def tpu_chips_present() -> bool:
    """A TPU VM's chips: ``/dev/accel*`` (v2-v4) or VFIO groups (v5e and later)."""
    dev = Path("/dev")
    return any(dev.glob("accel[0-9]*")) or any((dev / "vfio").glob("[0-9]*"))


@functools.cache
def xla_device_type() -> str:
    """``TPU``, ``CPU`` (the PJRT CPU client), ...: the backend of this process's XLA devices."""
    import torch_xla.runtime as xr

    return xr.device_type()


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
        self,
        kind: str = "xla",
        compile_cache: Optional[str] = None,
        rank: int = 0,
        order: Optional[GraphLaunchOrder] = None,
        step_graph: str = "replay",
    ):
        kind = resolve_device(kind)
        self.kind, self.step_graph = kind, step_graph
        # A replayed step donates its old weights' buffers to the new ones, as XLA does for a
        # traced step, except on the CPU client: there the aliasing made the smoke step 9%
        # slower (266-271 -> 289-295 ms, alternating pairs), and its memory is the host's.
        self.donate_step_buffers = not self.is_xla_cpu
        if self.is_xla_cpu:
            keep_freed_memory()  # the step's buffers, reused every step: cpu_memory.py
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

    @property
    def is_xla_cpu(self) -> bool:
        """XLA on the PJRT CPU client (CI, first runs), where ``cpu_kernels`` applies."""
        return self.is_xla and xla_device_type() == "CPU"

    def place_model(self, model: nn.Module) -> nn.Module:
        """``model`` on this device, with this backend's kernels (XLA:CPU's, ``cpu_kernels``):
        the one place a model meets the backend. Same parameters and state dict."""
        if self.is_xla_cpu:
            use_xla_cpu_kernels(model)
        return model.to(self.device)

    def replayable(self, step: Step, state: Callable[[], Sequence[torch.Tensor]], after_trace: Callable[[], None]) -> Step:
        """``step`` traced on its first call and its compiled graph replayed after that
        (``GraphReplay``), on XLA with ``runtime.step_graph: replay``; else ``step`` itself,
        traced (or, eagerly, run) every call. The graph is launched as a collective one."""
        if not self.is_xla or self.step_graph != "replay":
            return step
        return GraphReplay(step, state, after_trace, self.wait, self._launch_collective, self.donate_step_buffers)

    def _launch_collective(self, run: Callable[[], None]) -> None:
        if self.order is None:
            run()
        else:
            self.order.run(self.rank, run)

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

    def discard_pending(self) -> None:
        """Drop every graph traced on this device and not yet run: tensors it would have
        updated keep no value (``bench --trace-only``, which times tracing alone)."""
        if self.is_xla:
            import torch_xla

            torch_xla._XLAC._clear_pending_irs(str(self.device))

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
