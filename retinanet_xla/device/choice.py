"""Which ``Runtime`` implementation runs: ``runtime.device`` resolved on the machine that runs,
each backend imported only once chosen (torch-xla and TorchTPU never in one process)."""

import importlib.util
import os
from typing import Type

import torch

from retinanet_xla.config import RuntimeConfig
from retinanet_xla.device.native.platforms import tpu_chips_present
from retinanet_xla.device.runtime import Runtime
from retinanet_xla.errors import ConfigError

__all__ = ["create_runtime", "local_replica_count", "resolve_device", "runtime_class", "tpu_chips_present"]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_device(setting: str) -> str:
    """``runtime.device`` as the kind of device to use. ``auto``, in order: ``xla`` where
    ``PJRT_DEVICE`` is set; ``tpu`` (TorchTPU) where ``torch_tpu`` is installed and TPU chips
    are present; ``xla`` where torch-xla and its TPU runtime (libtpu) are installed and chips
    are present; ``cuda`` where a CUDA device is available; else ``cpu``. Resolved where it is
    used, never stored: a checkpoint's config says ``auto`` and the machine that loads it decides."""
    if setting != "auto":
        return setting
    if os.environ.get("PJRT_DEVICE"):
        return "xla"
    chips = tpu_chips_present()
    if chips and _installed("torch_tpu"):
        return "tpu"
    if chips and _installed("torch_xla") and _installed("libtpu"):
        return "xla"
    return "cuda" if torch.cuda.is_available() else "cpu"


def runtime_class(setting: str) -> Type[Runtime]:
    """The implementation for ``runtime.device``, imported only now."""
    kind = resolve_device(setting)
    if kind == "xla":
        if not _installed("torch_xla"):
            raise ConfigError(
                "runtime.device is xla but torch-xla is not installed: pip install 'retinanet-xla[xla]', or use runtime.device=auto"
            )
        from retinanet_xla.device.xla.runtime import XlaRuntime

        return XlaRuntime
    from retinanet_xla.device.native.runtime import NATIVE_RUNTIMES

    return NATIVE_RUNTIMES[kind]


def local_replica_count(settings: RuntimeConfig) -> int:
    """How many replicas a command runs on this host, known without starting a device (the
    launcher must not touch one before it spawns replicas)."""
    return runtime_class(settings.device).local_replica_count(settings)


def create_runtime(settings: RuntimeConfig) -> Runtime:
    """The runtime of a command's only local replica, in this process."""
    return runtime_class(settings.device).in_this_process(settings)
