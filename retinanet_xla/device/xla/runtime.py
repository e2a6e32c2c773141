"""The torch-xla implementation of ``Runtime``: lazy tensors on an XLA device (a TPU, or the CPU
through PJRT), steps traced and replayed, replicas started by ``xmp.spawn``.

Everything torch-xla-specific the loop needs sits here and in this package; nothing outside
``device/`` imports torch_xla."""

import functools
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch
from torch import nn

from retinanet_xla.config import RuntimeConfig
from retinanet_xla.device.feed import TimedBatches
from retinanet_xla.device.peaks import Peak, measured_cpu_peak, tpu_accelerator_type
from retinanet_xla.device.runtime import CompiledStep, EveryCall, Runtime, StepProgram, UpdateStyle
from retinanet_xla.device.xla.cpu_convolution import use_matmul_convolutions
from retinanet_xla.device.xla.feed import DeviceFeed
from retinanet_xla.device.xla.launch_order import launch_order
from retinanet_xla.device.xla.replay import GraphReplay
from retinanet_xla.device.xla.replicas import XlaReplicaGroup
from retinanet_xla.errors import ConfigError


@functools.cache
def xla_device_type() -> str:
    """``TPU``, ``CPU`` (the PJRT CPU client), ...: the backend of this process's XLA devices."""
    import torch_xla.runtime as xr

    return xr.device_type()


def on_cpu_client() -> bool:
    """Whether this process's XLA devices are (or will be) the PJRT CPU client's, as known
    before the client exists."""
    return os.environ.get("PJRT_DEVICE", "CPU").upper() == "CPU"


def prefer_nonblocking_cpu_client() -> None:
    """Have torch_xla's CPU client launch a step without waiting for it to run. Call before
    the client exists; a user's own ``PJRT_CPU_ASYNC_CLIENT`` wins.

    With the client's default, torch-xla 2.9.0's ``sync()`` returned only once the step had run,
    so the host traced the next step while the device idled; with ``0`` tracing overlaps the
    running step (docs/performance.md, "The CPU client's asynchronous launch")."""
    if on_cpu_client():
        os.environ.setdefault("PJRT_CPU_ASYNC_CLIENT", "0")


def compile_cache_dir(setting: Optional[str]) -> Optional[Path]:
    """``auto``: on TPU, ``$XDG_CACHE_HOME/retinanet-xla/xla/...`` (``~/.cache/...``), one
    directory per torch_xla version; elsewhere none, because torch_xla 2.9's CPU client cannot
    load the executables it writes (``PersistentCacheDeserializeFailure`` on every reload).
    ``None``/``none``: no persistent cache. Anything else: that directory."""
    if setting is None or setting.lower() in ("none", "null", ""):
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    if os.environ.get("PJRT_DEVICE", "").upper() != "TPU":
        return None
    import torch_xla

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "retinanet-xla" / "xla" / f"torch_xla-{torch_xla.__version__}-tpu"


class XlaRuntime(Runtime):
    kind = "xla"

    def __init__(self, settings: RuntimeConfig, rank: int = 0, world: int = 1, threaded: bool = False):
        super().__init__()
        import torch_xla
        import torch_xla.runtime as xr

        if settings.num_devices not in (None, world):
            raise ConfigError(f"runtime.num_devices is {settings.num_devices} but {world} XLA device(s) are running")
        prefer_nonblocking_cpu_client()
        self.step_graph, self.xla_cpu_kernels = settings.step_graph, settings.xla_cpu_kernels
        self.replicas = XlaReplicaGroup(self, rank, world, threaded)
        # Replicas that are threads of this process launch each collective graph in rank order.
        self.order = launch_order(world) if threaded and world > 1 else None
        cache = compile_cache_dir(settings.compile_cache)
        # Compiled executables are written to disk and reused by the next launch of the same
        # graph (a second run, a resume after preemption): no recompilation across runs. Only
        # possible before the first computation of the process.
        if cache is not None and not torch_xla._XLAC._xla_computation_cache_is_initialized():
            cache.mkdir(parents=True, exist_ok=True)
            xr.initialize_cache(str(cache), readonly=False)
            self.compile_cache = cache
        self.device = torch_xla.device()
        self.on_cpu = xla_device_type() == "CPU"
        # A replayed step donates its old weights' buffers to the new ones, as XLA does for a
        # traced step, except on the CPU client, where the aliasing made the step slower and
        # the memory is the host's anyway (docs/performance.md, "Buffer donation").
        self.donate_step_buffers = not self.on_cpu

    # -- starting replicas ----------------------------------------------------------------

    @staticmethod
    def local_replica_count(settings: RuntimeConfig) -> Optional[int]:
        """Replicas on this host, known before the client exists (``xmp.spawn`` must come
        first): on the CPU client ``num_devices`` or else ``CPU_NUM_DEVICES``; on a TPU
        ``num_devices``, or None for every chip."""
        num_devices = settings.num_devices
        if not on_cpu_client():
            return num_devices
        count = num_devices if num_devices is not None else int(os.environ.get("CPU_NUM_DEVICES", "1"))
        # Each CPU device is a thread, and XLA aborts a collective whose threads have not all
        # arrived within 10 s: with more threads than cores, some never get there in time.
        cores = len(os.sched_getaffinity(0))
        if count > cores:
            raise ConfigError(
                f"runtime.num_devices {count}: the XLA CPU client runs each device as a thread, at most one per core "
                f"({cores} here); use --devices {cores} or fewer"
            )
        return count

    @staticmethod
    def spawn(entry: Callable, args: tuple, settings: RuntimeConfig) -> None:
        """``entry(index, *args)`` in one replica per local XLA device (``xmp.spawn``)."""
        import torch_xla.distributed.xla_multiprocessing as xmp

        if settings.num_devices is not None and on_cpu_client():
            os.environ["CPU_NUM_DEVICES"] = str(settings.num_devices)  # the CPU client's device count
        prefer_nonblocking_cpu_client()  # the replica process creates its client before any runtime
        xmp.spawn(entry, args=args)

    @classmethod
    def in_spawned_replica(cls, settings: RuntimeConfig, index: int) -> "XlaRuntime":
        """This replica's runtime, from inside ``spawn`` (torch-xla knows its ordinal)."""
        import torch_xla.runtime as xr

        return cls(settings, xr.global_ordinal(), xr.world_size(), threaded=xr.process_count() == 1)

    @classmethod
    def in_this_process(cls, settings: RuntimeConfig) -> "XlaRuntime":
        return cls(settings)

    # -- the step -------------------------------------------------------------------------

    def place_model(self, model: nn.Module) -> nn.Module:
        if self.on_cpu and self.xla_cpu_kernels:
            use_matmul_convolutions(model)  # the CPU client's slow convolutions (cpu_convolution.py)
        return model.to(self.device)

    def compile_step(self, program: StepProgram) -> CompiledStep:
        """``runtime.step_graph: replay``: traced on the first call, its compiled graph replayed
        after that (``GraphReplay``); ``retrace``: traced every call."""
        return GraphReplay(program, self) if self.step_graph == "replay" else EveryCall(program)

    def launch_collective(self, run: Callable[[], None]) -> None:
        """``run()`` starts a graph with collectives: replicas that are threads of this process
        take turns (``LaunchOrder``)."""
        if self.order is None:
            run()
        else:
            self.order.run(self.replicas.rank, run)

    def prepare_state(self, tensors: Iterable[torch.Tensor]) -> None:
        """Give every 0-dim tensor its own device buffer, then end the step.

        torch_xla caches host-to-device transfers of scalars by value, so after loading a
        checkpoint the 20 BatchNorm ``num_batches_tracked`` buffers of a ResNet-18 (all equal)
        share one device buffer. The first step's graph then has fewer inputs than every later
        step's, and step 2 compiles again. An in-place ``add_(0)`` gives each its own output."""
        with torch.no_grad():
            for tensor in tensors:
                if tensor.dim() == 0:
                    tensor.add_(0)
        self.end_step(collective=False)

    def end_step(self, collective: bool = True) -> None:
        """XLA compiles the traced step (the first time) and launches it asynchronously.
        ``collective``: the graph may all-reduce across replicas, so every replica launches it
        at the same point, and replicas that are threads of this process take turns and wait."""
        import torch_xla

        if collective and self.order is not None:
            device = torch_xla._XLAC._xla_get_default_device()
            # Launched and waited for. With the collective steps left to run asynchronously, a
            # 2-device CPU run deadlocked after 40-75 s: one replica's step waited in its
            # all-reduce while the other replica's launch waited for its device, still held by
            # the cleanup of its previous step. The wait also means the step's all-reduce token,
            # which sync() drops, is computed: freeing it earlier waited for the step while
            # holding the GIL.
            self.order.run(self.replicas.rank, lambda: torch_xla._XLAC._xla_step_marker(device, [], wait=True))
        torch_xla.sync()
        super().end_step(collective)

    def update_style(self) -> UpdateStyle:
        """Traced op by op: updates out of place, then copied; the rate a device tensor in
        torch's per-parameter kernels (its ``foreach`` ones refuse XLA tensors as capturable)."""
        return UpdateStyle(in_place=False, device_rate=True, foreach_device_rate=False)

    def trace_only(self, program: StepProgram, batch: Dict[str, torch.Tensor]) -> None:
        import torch_xla

        program.trace(batch)
        torch_xla._XLAC._clear_pending_irs(str(self.device))

    def device_batches(self, batches: Iterable[Dict[str, torch.Tensor]], host_keys: Sequence[str] = ()) -> TimedBatches:
        """A background thread copies the next batches while the device runs this step."""
        return TimedBatches(DeviceFeed(batches, self.device, host_keys))

    def wait(self) -> None:
        import torch_xla.core.xla_model as xm

        # This replica's device only: waiting for all of a process's devices would wait for
        # another replica's next collective step, which waits for this replica.
        xm.wait_device_ops(xm.xla_real_devices([self.device]))

    def compilations(self) -> Dict[str, float]:
        """Also how the persistent cache fared (hits, misses, executables it could not load)."""
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

    def device_seconds(self) -> Optional[float]:
        """torch_xla's ``ExecuteTime``, averaged over the process's devices."""
        import torch_xla.debug.metrics as metrics
        import torch_xla.runtime as xr

        data = metrics.metric_data("ExecuteTime")
        return (data[1] / 1e9 if data else 0.0) / max(xr.addressable_device_count(), 1)

    def memory_bytes(self) -> Optional[int]:
        """A chip's memory on a TPU (torch_xla's ``bytes_limit``); the host's on the CPU client."""
        if self.on_cpu:
            return super().memory_bytes()
        import torch_xla.core.xla_model as xm

        try:
            return int(xm.get_memory_info(self.device)["bytes_limit"])
        except (KeyError, TypeError, ValueError, RuntimeError):
            return None

    def chip_name(self) -> Optional[str]:
        """The TPU's accelerator type, from its environment or torch_xla's reading of it."""
        if self.on_cpu:
            return None
        found = tpu_accelerator_type()
        if found is None and xla_device_type() == "TPU":
            from torch_xla._internal import tpu

            try:
                found = tpu.get_tpu_type()
            except (KeyError, OSError, RuntimeError, ValueError):
                found = None
        return found

    def peak(self, precision: str) -> Peak:
        """On the CPU client: the host's matmul rate shared by its XLA devices (threads of this
        process that share its cores)."""
        if not self.on_cpu:
            return super().peak(precision)
        measured = measured_cpu_peak(precision)
        share = self.local_replicas
        return Peak(measured.tflops / share, measured.source + (f", shared by {share} XLA devices" if share > 1 else ""))

    def start_profile(self, log_dir: Path) -> None:
        """torch_xla's profiler (host and device activity)."""
        import torch_xla.debug.profiler as profiler

        log_dir.mkdir(parents=True, exist_ok=True)
        profiler.start_trace(str(log_dir))

    def stop_profile(self) -> None:
        import torch_xla.debug.profiler as profiler

        self.wait()  # the traced steps' device work belongs in the trace
        profiler.stop_trace()
