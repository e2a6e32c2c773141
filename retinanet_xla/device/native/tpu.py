"""TorchTPU (``torch_tpu``): Cloud TPU chips as the native device ``tpu``. What differs from
CUDA is these lines: the device type, ``torch.compile(backend="tpu")``, ``torch.distributed``'s
``tpu_dist`` and ``torch.tpu`` for the device count and waits.

Written from TorchTPU 0.2.0's API (its loader registers ``torch.tpu`` and the ``tpu_dist``
process group on import); it has never run on a TPU here (docs/tpu.md says what ran where).
``torch_tpu`` registers itself as one of torch's autoloaded device backends; the console script
turns that autoload off (``retinanet_xla/__main__.py``) and this module imports it only when
``runtime.device`` resolves to ``tpu``."""

import importlib.util

import torch

from retinanet_xla.device.native.platforms import Platform, tpu_chips_present
from retinanet_xla.errors import ConfigError


def torchtpu_installed() -> bool:
    return importlib.util.find_spec("torch_tpu") is not None


def torchtpu_platform() -> Platform:
    if not torchtpu_installed():
        raise ConfigError("runtime.device is tpu but TorchTPU is not installed: pip install 'retinanet-xla[torchtpu]'")
    if not tpu_chips_present():
        raise ConfigError(
            "runtime.device is tpu but no TPU is visible on this machine (no /dev/accel* or /dev/vfio); use runtime.device=cpu or auto"
        )
    import torch_tpu  # noqa: F401 - registers torch.tpu, the tpu compile backend and tpu_dist

    return Platform(
        "tpu",
        compile_backend="tpu",
        distributed_backend="tpu_dist",
        local_devices=torch.tpu.device_count,
        synchronize=torch.tpu.synchronize,
        set_device=torch.tpu.set_device,
        prepare_launch=set_launch_environment,
    )


def set_launch_environment(count: int) -> None:
    """Every TorchTPU rank needs ``TORCH_TPU_SLICEBUILDER_ADDRESSES`` (one ``host:port`` per
    rank, the same list on all) and ``TORCH_TPU_TOPOLOGY``, decided once in the parent before
    any worker starts: nothing upstream sets them. TorchTPU's own call does (it never overwrites
    a variable already set, so an operator can pin any of them)."""
    from torch.tpu import distributed

    distributed.set_tpu_launch_env(nproc_per_node=count)
