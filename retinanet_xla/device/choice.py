"""Which ``Runtime`` implementation runs: ``runtime.device`` resolved on the machine that runs,
each backend imported only once chosen."""

import os
from pathlib import Path
from typing import Optional, Type

import torch

from retinanet_xla.config import RuntimeConfig
from retinanet_xla.device.runtime import Runtime


def resolve_device(setting: str) -> str:
    """``runtime.device`` as the kind of device to use: ``auto`` is ``xla`` where XLA has a
    device to run on (``PJRT_DEVICE`` set, or a TPU VM's chips under ``/dev``), else ``cuda``
    when a CUDA device is available, else eager ``cpu``, which compiles nothing (XLA:CPU's first
    step compiles for tens of seconds; docs/models.md compares the steps). Resolved where it is
    used, never stored: a checkpoint's config says ``auto`` and the machine that loads it decides."""
    if setting != "auto":
        return setting
    if os.environ.get("PJRT_DEVICE") or tpu_chips_present():
        return "xla"
    return "cuda" if torch.cuda.is_available() else "cpu"


def tpu_chips_present(dev: Path = Path("/dev")) -> bool:
    """A TPU VM's chips: ``/dev/accel*`` (v2-v4) or VFIO groups (v5e and later)."""
    return any(dev.glob("accel[0-9]*")) or any((dev / "vfio").glob("[0-9]*"))


def runtime_class(setting: str) -> Type[Runtime]:
    """The implementation for ``runtime.device``, imported only now."""
    if resolve_device(setting) == "xla":
        from retinanet_xla.device.xla.runtime import XlaRuntime

        return XlaRuntime
    from retinanet_xla.device.eager import EagerRuntime

    return EagerRuntime


def local_replica_count(settings: RuntimeConfig) -> Optional[int]:
    """How many replicas a command runs on this host, known without starting a device (the
    launcher must not touch one before it spawns replicas); None: every local device."""
    return runtime_class(settings.device).local_replica_count(settings.num_devices)


def create_runtime(settings: RuntimeConfig) -> Runtime:
    """The runtime of a command's only replica, in this process."""
    kind = resolve_device(settings.device)
    if kind == "xla":
        from retinanet_xla.device.xla.runtime import XlaRuntime

        return XlaRuntime(settings)
    from retinanet_xla.device.eager import EagerRuntime

    return EagerRuntime(settings, kind)
