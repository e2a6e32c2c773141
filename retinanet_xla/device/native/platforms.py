"""The native devices a step can run on, and the few things in which they differ: the device
type, ``torch.compile``'s backend, ``torch.distributed``'s backend, how to wait for the device
and how many there are on this host. TorchTPU's lines are ``device/native/tpu.py``."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from retinanet_xla.errors import ConfigError


@dataclass(frozen=True)
class Platform:
    kind: str  # runtime.device: cpu | cuda | tpu
    compile_backend: str  # torch.compile(backend=...)
    distributed_backend: str  # torch.distributed.init_process_group(backend=...)
    local_devices: Callable[[], int]  # devices on this host (a CPU host counts as one)
    synchronize: Callable[[torch.device], None]
    set_device: Callable[[torch.device], None] = lambda device: None
    indexed: bool = True  # one device per local rank (cuda:0, cuda:1, ...); the CPU has one
    # What the parent process must do before it starts ``count`` local replicas, which must
    # all see it (TorchTPU: the launch environment every rank shares; nothing elsewhere).
    prepare_launch: Callable[[int], None] = lambda count: None

    def device(self, local_rank: int) -> torch.device:
        return torch.device(self.kind, local_rank) if self.indexed else torch.device(self.kind)


def _no_wait(device: torch.device) -> None:
    """The CPU runs each op before it returns."""


CPU = Platform("cpu", "inductor", "gloo", lambda: 1, _no_wait, indexed=False)


def _cuda() -> Platform:
    if not torch.cuda.is_available():
        raise ConfigError("runtime.device is cuda but no CUDA device is available; use runtime.device=cpu or auto")
    return Platform("cuda", "inductor", "nccl", torch.cuda.device_count, torch.cuda.synchronize, torch.cuda.set_device)


def platform(kind: str) -> Platform:
    """The platform of ``runtime.device`` (resolved), its backend imported only now."""
    if kind == "cpu":
        return CPU
    if kind == "cuda":
        return _cuda()
    if kind == "tpu":
        from retinanet_xla.device.native.tpu import torchtpu_platform

        return torchtpu_platform()
    raise ValueError(f"not a native device: {kind}")


def cpu_threads_per_replica(local_replicas: int) -> int:
    """Replicas that are processes of one CPU share its cores instead of each taking all."""
    return max(1, (os.cpu_count() or 1) // max(local_replicas, 1))


def tpu_chips_present(dev: Path = Path("/dev")) -> bool:
    """A TPU VM's chips: ``/dev/accel*`` (v2-v4) or VFIO groups (v5e and later)."""
    return any(dev.glob("accel[0-9]*")) or any((dev / "vfio").glob("[0-9]*"))
