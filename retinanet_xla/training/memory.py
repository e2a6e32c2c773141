"""A lower bound of the training step's memory, checked before the first step: an input size
and batch that cannot fit are refused in one line instead of swapping the host for minutes or
dying in the allocator (a 10000x10000 input grew past 7 GiB before it failed)."""

import copy

import torch
from torch import nn

from retinanet_xla.config import Config
from retinanet_xla.device.runtime import Runtime
from retinanet_xla.errors import ConfigError
from retinanet_xla.training.batches import replica_batch_size

GIB = 2**30


def activation_bytes(model: nn.Module, batch_size: int, image_size, precision: str) -> int:
    """What the step keeps for its backward pass at least: every convolution's output, for
    ``batch_size`` images of ``image_size`` (each is a BatchNorm's, an activation's or the
    next layer's saved input). Computed on the meta device: shapes only, nothing allocated."""
    meta = copy.deepcopy(model).to("meta")
    total = 0

    def count(module, inputs, output) -> None:
        nonlocal total
        total += output.numel()

    hooks = [m.register_forward_hook(count) for m in meta.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            meta(torch.zeros(batch_size, 3, *image_size, device="meta"))  # normalised images
    finally:
        for hook in hooks:
            hook.remove()
    return total * (2 if precision == "bf16" else 4)


def check_step_memory(model: nn.Module, config: Config, runtime: Runtime) -> None:
    """``ConfigError`` when one replica's step needs more than the device can give it."""
    available = runtime.memory_bytes()
    if available is None:
        return
    batch = replica_batch_size(config, runtime.replicas)
    needed = activation_bytes(model, batch, tuple(config.data.image_size), config.train.precision)
    needed += 4 * sum(p.numel() for p in model.parameters()) * 4  # weights, gradients, two optimizer moments
    if needed > available:
        height, width = config.data.image_size
        raise ConfigError(
            f"data.image_size [{height}, {width}] with {batch} image(s) per replica needs at least {needed / GIB:.1f} GiB "
            f"for the training step, and {available / GIB:.1f} GiB is available to each replica: lower data.image_size "
            "or train.batch_size"
        )
