"""Residual blocks whose output XLA:CPU computes once, not once per consumer.

A residual stage's output is a chain of cheap elementwise ops over every block before it:
``x_k = relu(x_{k-1} + bn(conv(...)))``, back to the stage's input. XLA:CPU fuses such a producer
into each fusion that consumes it (the next block's input relayout, its residual sum, the
backward pass's ReLU masks), so every consumer re-runs the whole chain from the stage's start,
and a stage's cost grows with the square of its depth. In ResNet-152's 36-block third stage
(256x256, batch 4) one such fusion read 36 [1024, 1024] convolution outputs and took 12 ms;
the profile of the stage's forward and backward held 403 ms of these fusions (and 311 ms of
relayouts doing the same) in 1.65 s of traced thread time, and 1.02 s after this change.

Here each block's output goes through ``materialized`` (a product with the identity, which XLA
never fuses into), so the next block reads a buffer, and the gradient that comes back into the
block is computed once in the same way. The values are the block's own, exactly.

Only on XLA's CPU backend (``cpu_kernels.use_xla_cpu_kernels``): eager PyTorch computes every
tensor once anyway, and on a TPU the fusion decisions are another backend's.
"""

from typing import Dict, Tuple, Type

from torch import Tensor, nn
from torchvision.models import convnext, efficientnet, mobilenetv2, mobilenetv3, regnet, resnet

from retinanet_xla.xla.cpu_convolution import materialized

# torchvision's residual blocks, for every backbone family in models/bodies.py.
RESIDUAL_BLOCKS: Tuple[Type[nn.Module], ...] = (
    resnet.BasicBlock,
    resnet.Bottleneck,
    regnet.ResBottleneckBlock,
    mobilenetv2.InvertedResidual,
    mobilenetv3.InvertedResidual,
    efficientnet.MBConv,
    efficientnet.FusedMBConv,
    convnext.CNBlock,
)


class MaterializedOutput(nn.Module):
    """Mixed in before a residual block's class: the block's ``forward``, its result
    ``materialized``."""

    def forward(self, x: Tensor) -> Tensor:
        return materialized(super().forward(x))


_CONVERTED: Dict[Type[nn.Module], Type[nn.Module]] = {}


def _xla_cpu_class(block: Type[nn.Module]) -> Type[nn.Module]:
    """``XlaCpu<Block>``: ``block`` with ``MaterializedOutput`` mixed in, one class per block class."""
    if block not in _CONVERTED:
        _CONVERTED[block] = type(f"XlaCpu{block.__name__}", (MaterializedOutput, block), {"__module__": __name__})
    return _CONVERTED[block]


def use_materialized_residual_blocks(model: nn.Module) -> None:
    """Give every torchvision residual block of ``model`` a ``materialized`` output (in place:
    parameters, names and hooks stay)."""
    for module in model.modules():
        if type(module) in RESIDUAL_BLOCKS:
            module.__class__ = _xla_cpu_class(type(module))
