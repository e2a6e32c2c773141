"""Which ``Runtime`` implementation runs: ``runtime.device`` resolved on the machine that runs,
each backend imported only once chosen (torch-xla and TorchTPU never in one process)."""

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional, Type

import torch

from retinanet_xla.config import RuntimeConfig
from retinanet_xla.device.native.platforms import tpu_chips_present
from retinanet_xla.device.runtime import Runtime, split_batch
from retinanet_xla.errors import ConfigError

__all__ = ["LaunchPlan", "create_runtime", "plan_launch", "resolve_device", "runtime_class", "tpu_chips_present"]


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


@dataclass(frozen=True)
class LaunchPlan:
    """A command's backend, resolved once from ``runtime.device``, and its replicas on this
    host: what a command and the launcher ask, instead of resolving or counting themselves."""

    settings: RuntimeConfig
    backend: Type[Runtime]
    # Replicas on this host, known without touching a device (the launcher must not before it
    # spawns them); None: every local device, counted once they start.
    local_replicas: Optional[int]

    @property
    def external(self) -> bool:
        """This process is one replica that ``torchrun`` started: the command runs once per process."""
        return self.backend.started_by_external_launcher()

    def check_batch(self, batch_size: int, key: str) -> None:
        """Fail before anything starts when the local replicas cannot share ``batch_size``
        (``key`` names the setting); each replica checks its own share again once it knows
        the whole group (``ReplicaGroup.share``)."""
        if self.local_replicas is not None:
            split_batch(batch_size, self.local_replicas, key)

    def runtime_here(self) -> Runtime:
        """The runtime of the command's only local replica, in this process."""
        return self.backend.in_this_process(self.settings)


def plan_launch(settings: RuntimeConfig) -> LaunchPlan:
    backend = runtime_class(settings.device)
    return LaunchPlan(settings, backend, backend.local_replica_count(settings))


def create_runtime(settings: RuntimeConfig) -> Runtime:
    """The runtime of a command's only local replica, in this process (loading a detector)."""
    return runtime_class(settings.device).in_this_process(settings)
