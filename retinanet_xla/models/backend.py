"""Which XLA backend a tensor lives on: some lowerings are only worth it on XLA:CPU."""

import functools

from torch import Tensor


@functools.cache
def _xla_device_type() -> str:
    import torch_xla.runtime as xr

    return xr.device_type()


def on_xla_cpu(tensor: Tensor) -> bool:
    """True for a tensor on an XLA device backed by XLA's CPU client (``PJRT_DEVICE=CPU``): CI,
    first runs. TPUs have native kernels for what ``pooling.py`` and ``convolution.py`` avoid."""
    return tensor.device.type == "xla" and _xla_device_type() == "CPU"
