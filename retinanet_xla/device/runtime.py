"""The one interface between the loop and a backend: ``Runtime`` and its ``ReplicaGroup``.

The trainer, the evaluator, the detector and bench talk to a ``Runtime`` and never ask which
backend it is. Each execution model implements it once: ``device/xla`` (lazy tensors, graph
replay, ``xmp.spawn``) and ``device/native`` (CPU, CUDA or TorchTPU, eager or ``torch.compile``,
processes joined by ``torch.distributed``). Which one runs is
``device/choice.py``'s decision, from ``runtime.device``.

The base classes are one replica's view: a ``ReplicaGroup`` of one, whose collectives return
their input, and a runtime that runs each step as it is called.
"""

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn

from retinanet_xla.config import RuntimeConfig
from retinanet_xla.device.feed import TimedBatches
from retinanet_xla.device.peaks import Peak, table_peak
from retinanet_xla.errors import ConfigError

Batch = Dict[str, Tensor]


class StepProgram(Protocol):
    """What a training step gives the runtime to compile (``Runtime.compile_step``)."""

    def trace(self, batch: Batch) -> Batch:
        """One step: forward, loss, backward, update; device tensors out."""

    def state_tensors(self) -> Sequence[Tensor]:
        """Every tensor the step reads from one call to the next or updates in place."""

    def after_trace(self) -> None:
        """Drop what a traced step leaves that is neither state nor output (gradients)."""


@dataclass(frozen=True)
class UpdateStyle:
    """How a step's optimizer writes weights and state on a backend: the runtime says it
    (``Runtime.update_style``), the optimizer and the gradient clipping follow."""

    # In place where the step runs eagerly or compiled whole; out of place, then copied, where
    # it is traced op by op (torch-xla): there each in-place op costs host time (SGD.step says why).
    in_place: bool = False
    # torch's functional optimizers may take the learning rate as a device tensor
    # (``capturable``) on this device, so that a changing rate never changes the graph.
    device_rate: bool = False
    # ... and their ``foreach`` kernels accept that here (CUDA; not XLA, not the eager CPU).
    foreach_device_rate: bool = False


class CompiledStep(Protocol):
    waited_seconds: float  # in calls, waiting for the device to finish the step before

    def __call__(self, batch: Batch) -> Batch: ...


class EveryCall:
    """The step itself, run (eagerly) or traced (lazily) at every call."""

    waited_seconds = 0.0

    def __init__(self, program: StepProgram):
        self.program = program

    def __call__(self, batch: Batch) -> Batch:
        return self.program.trace(batch)


def split_batch(batch_size: int, world: int, key: str) -> int:
    """Each of ``world`` replicas' part of a global batch (``key`` names the setting in the
    error): the one rule, checked before replicas start where their number is known."""
    if batch_size % world:
        raise ConfigError(f"{key} {batch_size} is not divisible by the {world} replicas")
    return batch_size // world


class ReplicaGroup:
    """This replica and the collectives it joins: a group of one here, where every collective
    returns its input. Every replica calls a collective at the same point of the same step.
    Decisions that end the run normally (a stop request, a non-finite loss) are ``agree``\\ d,
    so that every replica leaves the loop at the same step."""

    rank: int = 0
    world: int = 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def share(self, batch_size: int, key: str) -> int:
        """Each replica's part of a global batch (``key`` names the setting in the error)."""
        return split_batch(batch_size, self.world, key)

    def mean(self, tensor: Tensor) -> Tensor:
        """The mean over replicas of a tensor without gradient (the loss normaliser), in the step."""
        return tensor

    def differentiable_mean(self, tensor: Tensor) -> Tensor:
        """The mean over replicas, with gradient (cross-replica BatchNorm statistics)."""
        return tensor

    def average_gradients(self, gradients: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
        """The gradients averaged over replicas, inside the step (None stays None)."""
        return gradients

    def gather(self, tensor: Tensor) -> Tensor:
        """Every replica's host ``tensor`` (same shape everywhere), concatenated along dim 0 in
        rank order, on the host of every replica. Waits for the device."""
        return tensor

    def agree(self, flags: Sequence[bool]) -> List[bool]:
        """Each flag is true if it is true on any replica. Waits for the device: call it only
        where the loop reads values anyway."""
        return list(flags)

    def from_master(self, value: int) -> int:
        """Replica 0's ``value`` (a non-negative int, or -1) on every replica: a decision taken
        once, such as the checkpoint to resume from."""
        return value

    def barrier(self) -> None:
        """Wait on the host until every replica arrives (the master writing a checkpoint)."""


def host_memory_bytes(sharers: int = 1, meminfo: Path = Path("/proc/meminfo")) -> Optional[int]:
    """The host memory available now (Linux's MemAvailable), split between ``sharers``."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // max(sharers, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


class Runtime:
    """One replica's device: where the model lives, how its step is compiled and launched, and
    what the loop can ask of it (timings, compilations, a profile)."""

    kind: str  # the resolved runtime.device: xla | cpu | cuda | tpu
    device: torch.device
    replicas: ReplicaGroup
    compile_cache: Optional[Path] = None
    step_graph: str = "eager"  # how a step runs, as bench reports it: replay | retrace | compiled | eager

    def __init__(self):
        self._after_step: List = []

    # -- starting replicas (class methods: no device exists yet) ---------------------------

    @classmethod
    def local_replica_count(cls, settings: RuntimeConfig) -> Optional[int]:
        """Replicas a command runs on this host (None: every local device), known before any
        device is touched (the replicas start first)."""
        raise NotImplementedError

    @classmethod
    def started_by_external_launcher(cls) -> bool:
        """This process is one replica of a group that a launcher outside the command started
        (``torchrun``): the command then runs once per process, not once per host."""
        return False

    @classmethod
    def spawn(cls, entry: Callable, args: tuple, settings: RuntimeConfig) -> None:
        """``entry(index, *args)`` in every local replica; an exception raised by a replica is
        raised here, and a replica that ends its process breaks the launch."""
        raise NotImplementedError

    @classmethod
    def in_spawned_replica(cls, settings: RuntimeConfig, index: int) -> "Runtime":
        """Replica ``index``'s runtime, inside ``spawn``."""
        raise NotImplementedError

    @classmethod
    def in_this_process(cls, settings: RuntimeConfig) -> "Runtime":
        """The runtime of a command's only local replica."""
        raise NotImplementedError

    def place_model(self, model: nn.Module) -> nn.Module:
        """``model`` on this device, with this backend's kernels where it has any: the one
        place a model meets the backend. Same parameters and state dict."""
        return model.to(self.device)

    def compile_step(self, program: StepProgram) -> CompiledStep:
        """The training step as this backend runs it; ``__call__`` launches one step."""
        return EveryCall(program)

    def compile_inference(self, module: nn.Module) -> Callable:
        """``module``'s forward (a detector's device half: static shapes, no gradients) as this
        backend runs it. Here, as it is: a lazy backend traces it into a graph anyway."""
        return module

    def prepare_state(self, tensors: Iterable[Tensor]) -> None:
        """Make freshly loaded state ready for step 1 (built or restored weights, buffers)."""

    def end_step(self, collective: bool = True) -> None:
        """End the step the loop just called: the device runs it (lazily traced work starts
        here); then the ``on_step_end`` callbacks get their values. ``collective``: the step
        may hold collectives (a training step), which every replica ends at the same point;
        an evaluation batch holds none."""
        pending, self._after_step = self._after_step, []
        for callback, tensors in pending:
            callback({key: value.item() for key, value in tensors.items()})

    def on_step_end(self, callback: Callable[[Dict[str, float]], None], tensors: Dict[str, Tensor]) -> None:
        """Call ``callback(values)`` with host copies of ``tensors`` right after the next
        ``end_step``: only the steps that log pay the wait for the device."""
        self._after_step.append((callback, tensors))

    def update_style(self) -> UpdateStyle:
        """How the step's update writes its tensors here (``UpdateStyle``): eagerly on the
        host's CPU, in place, with the rate as a number in torch's functional kernels."""
        return UpdateStyle(in_place=True)

    def trace_only(self, program: StepProgram, batch: Batch) -> None:
        """Trace one step of ``program`` and drop it unrun (``bench --trace-only``: the host's
        cost alone). Only a backend that traces before it runs can."""
        raise ConfigError("bench --trace-only needs runtime.device: xla (an eager step runs as it is called)")

    def device_batches(self, batches: Iterable[Batch], host_keys: Sequence[str] = ()) -> TimedBatches:
        """Host batches on the device, for train, eval, predict and bench alike; the
        ``host_keys`` of each batch stay on the host (what the loop reads there)."""
        raise NotImplementedError

    def autocast(self, precision: str):
        if precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def wait(self) -> None:
        """Block until this device has finished all launched work (for honest timings)."""

    def compilations(self) -> Dict[str, float]:
        """Graphs compiled so far in this process and the seconds spent compiling them."""
        return {"count": 0, "seconds": 0.0}

    def device_seconds(self) -> Optional[float]:
        """Seconds this device has spent executing so far; None where it is not known."""
        return None

    def peak_memory_bytes(self) -> Optional[int]:
        """The most device memory this process has held at once so far, where the backend
        counts it (CUDA); None otherwise."""
        return None

    def chip_name(self) -> Optional[str]:
        """What the device is, as its vendor names it (``NVIDIA H100 80GB HBM3``, a TPU
        accelerator type such as ``v5litepod-8``); None where it cannot tell."""
        return None

    def peak(self, precision: str) -> Peak:
        """One device's peak rate in ``precision`` (``bf16`` or ``fp32``), for utilisation:
        the datasheet figure of a known chip; a CPU measures its own (``peaks.measured_cpu_peak``)."""
        name = self.chip_name()
        if name is None:
            return Peak(None, "the device cannot name itself, so its peak is not known; pass --peak-tflops")
        return table_peak(name, precision)

    def memory_bytes(self) -> Optional[int]:
        """The memory one replica's step may use, where the backend can tell; None otherwise.
        Here, the host's: what it has available now, shared by this host's replicas."""
        return host_memory_bytes(self.local_replicas)

    @property
    def local_replicas(self) -> int:
        """Replicas of this run on this host (they share its memory and cores)."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.replicas.world))

    def start_profile(self, log_dir: Path) -> None:
        """Start a trace of host and device activity that TensorBoard's profile tab reads."""
        log_dir.mkdir(parents=True, exist_ok=True)
        self._profile = torch.profiler.profile(on_trace_ready=torch.profiler.tensorboard_trace_handler(str(log_dir)))
        self._profile.start()

    def stop_profile(self) -> None:
        profile = getattr(self, "_profile", None)
        if profile is not None:
            self.wait()
            profile.stop()
            self._profile = None
