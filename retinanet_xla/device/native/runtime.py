"""The native implementation of ``Runtime``: PyTorch's own devices, the step run eagerly or as
one ``torch.compile`` graph, replicas as processes joined by ``torch.distributed``.

Replicas are started here (``spawn``: one process per local device, rendezvous on 127.0.0.1),
or by an external ``torchrun``, detected from its environment: that is how several hosts join
(``--nnodes``, its rendezvous), each of its processes one replica."""

import logging
import os
import socket
from concurrent.futures import ProcessPoolExecutor
from datetime import timedelta
from multiprocessing import get_context
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import _get_capturable_supported_devices

from retinanet_xla.config import RuntimeConfig
from retinanet_xla.device.feed import TimedBatches
from retinanet_xla.device.native.compiled import CompiledProgram, compile_counts
from retinanet_xla.device.native.platforms import Platform, cpu_threads_per_replica, platform
from retinanet_xla.device.native.replicas import DistributedReplicaGroup
from retinanet_xla.device.peaks import Peak, measured_cpu_peak, tpu_accelerator_type
from retinanet_xla.device.runtime import CompiledStep, EveryCall, ReplicaGroup, Runtime, StepProgram, UpdateStyle
from retinanet_xla.errors import ConfigError

logger = logging.getLogger(__name__)

# How long a replica waits in a collective for the others (torch's own default), so that a
# replica that never arrives ends the run instead of hanging it.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun(environ=os.environ) -> bool:
    """This process is one of those an external ``torchrun`` started."""
    return all(key in environ for key in _TORCHRUN_KEYS)


def compile_choice(setting, kind: str) -> bool:
    """``runtime.compile``: ``auto`` compiles on accelerators, where eager launches one kernel
    per op; on the CPU it is off (the measured choice: docs/performance.md, "Native backend")."""
    if setting == "auto":
        return kind != "cpu"
    return bool(setting)


class NativeRuntime(Runtime):
    kind: str  # set by each device's subclass below

    def __init__(self, settings: RuntimeConfig, rank: int = 0, world: int = 1, local_rank: int = 0, local_world: int = 1):
        super().__init__()
        self.platform: Platform = platform(self.kind)
        self.device = self.platform.device(local_rank)
        self.platform.set_device(self.device)
        self.compiled = compile_choice(settings.compile, self.kind)
        self.compile_mode = settings.compile_mode
        self.step_graph = "compiled" if self.compiled else "eager"
        self.replicas = DistributedReplicaGroup(rank, world, self.device) if world > 1 else ReplicaGroup()
        if self.kind == "cpu" and local_world > 1:
            torch.set_num_threads(cpu_threads_per_replica(local_world))

    # -- starting replicas ----------------------------------------------------------------

    @classmethod
    def started_by_external_launcher(cls) -> bool:
        return under_torchrun()

    @classmethod
    def local_replica_count(cls, settings: RuntimeConfig) -> int:
        """Replicas this command starts on this host: one under ``torchrun`` (which started
        this process as one of them), else ``num_devices``, else every local device."""
        if under_torchrun():
            local = int(os.environ["LOCAL_WORLD_SIZE"])
            if settings.num_devices not in (None, local) and int(os.environ.get("RANK", "0")) == 0:
                # torchrun decided: a config written for one device (smoke.yaml) runs as launched.
                logger.info("runtime.num_devices %d yields to torchrun's %d process(es) per host", settings.num_devices, local)
            return 1
        available = platform(cls.kind).local_devices()
        count = settings.num_devices or available
        if cls.kind != "cpu" and count > available:
            raise ConfigError(f"runtime.num_devices is {count} but this machine has {available} {cls.kind} device(s)")
        return count

    @classmethod
    def spawn(cls, entry: Callable, args: tuple, settings: RuntimeConfig) -> None:
        """``entry(index, *args)`` in one new process per replica, joined on 127.0.0.1. An
        exception a replica raises comes back from here; a replica that ends its process
        breaks the pool (``BrokenProcessPool``)."""
        count = cls.local_replica_count(settings)
        platform(cls.kind).prepare_launch(count)  # before any replica process exists
        rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(count)}
        previous = {key: os.environ.get(key) for key in rendezvous}
        os.environ.update(rendezvous)  # the replica processes inherit it
        try:
            with ProcessPoolExecutor(count, mp_context=get_context("spawn")) as pool:
                for replica in [pool.submit(entry, index, *args) for index in range(count)]:
                    replica.result()
        finally:
            for key, value in previous.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)

    @classmethod
    def in_spawned_replica(cls, settings: RuntimeConfig, index: int) -> "NativeRuntime":
        world = int(os.environ["WORLD_SIZE"])
        return cls._joined(settings, rank=index, world=world, local_rank=index, local_world=world)

    @classmethod
    def in_this_process(cls, settings: RuntimeConfig) -> "NativeRuntime":
        """The runtime of a command's only local replica: one of ``torchrun``'s, or the only one."""
        if not under_torchrun():
            return cls(settings)
        e = os.environ
        return cls._joined(settings, int(e["RANK"]), int(e["WORLD_SIZE"]), int(e["LOCAL_RANK"]), int(e["LOCAL_WORLD_SIZE"]))

    @classmethod
    def _joined(cls, settings: RuntimeConfig, rank: int, world: int, local_rank: int, local_world: int) -> "NativeRuntime":
        runtime = cls(settings, rank, world, local_rank, local_world)
        if world > 1 and not dist.is_initialized():
            backend = runtime.platform.distributed_backend
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
        return runtime

    # -- the step -------------------------------------------------------------------------

    def compile_step(self, program: StepProgram) -> CompiledStep:
        """``runtime.compile``: the whole step as one ``torch.compile`` graph, else eager."""
        if not self.compiled:
            return EveryCall(program)
        return CompiledProgram(program, self.platform.compile_backend, self.compile_mode)

    def compile_inference(self, module: nn.Module) -> Callable:
        """One ``torch.compile`` graph where the step is compiled (``runtime.compile``), else eager."""
        if not self.compiled:
            return module
        return torch.compile(module, backend=self.platform.compile_backend, fullgraph=True, dynamic=False)

    def update_style(self) -> UpdateStyle:
        """In place. The rate stays a device tensor where torch's capturable kernels exist for
        this device (CUDA; torch's private list, the one its optimizers check); a compiled step
        makes them capturable anyway while it is traced (``Optimizer`` asks torch.compile)."""
        capturable = self.device.type in _get_capturable_supported_devices(supports_xla=False)
        return UpdateStyle(in_place=True, device_rate=capturable, foreach_device_rate=capturable)

    def device_batches(self, batches: Iterable[Dict[str, torch.Tensor]], host_keys: Sequence[str] = ()) -> TimedBatches:
        return TimedBatches(_on_device(batches, self.device, frozenset(host_keys)))

    def wait(self) -> None:
        self.platform.synchronize(self.device)

    def compilations(self) -> Dict[str, float]:
        """Graphs ``torch.compile`` built in this process (a recompilation is one more), the
        seconds it took and its graph breaks, from torch's own counters."""
        return compile_counts()


class CpuRuntime(NativeRuntime):
    kind = "cpu"

    def peak(self, precision: str) -> Peak:
        """This replica's threads' matmul rate (replicas that share the CPU split its cores)."""
        return measured_cpu_peak(precision)


class CudaRuntime(NativeRuntime):
    kind = "cuda"

    def memory_bytes(self) -> Optional[int]:
        return torch.cuda.mem_get_info(self.device)[1]  # the whole device's: our step is its user

    def chip_name(self) -> Optional[str]:
        return torch.cuda.get_device_name(self.device)

    def peak_memory_bytes(self) -> Optional[int]:
        return torch.cuda.max_memory_allocated(self.device)


class TpuRuntime(NativeRuntime):
    """TorchTPU (``device/native/tpu.py``): its documented API says nothing of memory."""

    kind = "tpu"

    def memory_bytes(self) -> Optional[int]:
        return None

    def chip_name(self) -> Optional[str]:
        return tpu_accelerator_type()


NATIVE_RUNTIMES = {runtime.kind: runtime for runtime in (CpuRuntime, CudaRuntime, TpuRuntime)}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _on_device(batches: Iterable[Dict[str, torch.Tensor]], device: torch.device, host_keys) -> Iterator[Dict[str, torch.Tensor]]:
    stream = iter(batches)
    try:
        for batch in stream:
            yield {key: value if key in host_keys else value.to(device, non_blocking=True) for key, value in batch.items()}
    finally:
        if hasattr(stream, "close"):
            stream.close()  # a data loader's workers end with the loop
