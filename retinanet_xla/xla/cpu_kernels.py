"""The one adapter between the model and XLA's CPU backend.

``RetinaNet`` is built from plain torchvision modules on every backend: ``print(model)`` and
every export look the same everywhere. Where a train or evaluation step is built on XLA:CPU
(CI, ``make demo``, a user's first run), the runtime calls ``use_xla_cpu_kernels`` on the built
model: the same parameters and state dict, with the kernels XLA:CPU runs slowly replaced
(measured on the smoke step, docs/performance.md):

- the 3x3/2 stem max pool, whose gradient XLA lowers to a scalar-loop ``select-and-scatter``
  (51 -> 23 ms forward and backward; ``cpu_pooling.py``);
- 1x1 convolutions, and others with fewer output pixels than channels, whose relayouts (of the
  activations to channels last, of the weights) cost more than the convolution: a matrix
  product (``cpu_convolution.py``; ResNet-50's body 2.7 -> 1.0 s forward and backward at
  256x256, batch 4);
- depthwise convolutions, which XLA:CPU's grouped convolution runs slowly: a sum of shifted taps,
  whose input gradient is a sum of taps too (docs/models.md).
- other grouped convolutions (ResNeXt, RegNetY): one ordinary convolution per group
  (docs/models.md);
- linear layers (ConvNeXt's MLPs), whose bias gradient XLA:CPU sums one column at a time: the
  bias becomes a column of the weight's matrix product (``cpu_linear.py``);
- residual blocks, whose output XLA:CPU would recompute from the stage's start in every fusion
  that reads it: it is computed once (``cpu_residuals.py``).
"""

from torch import nn

from retinanet_xla.xla.cpu_convolution import use_xla_cpu_convolutions
from retinanet_xla.xla.cpu_linear import use_xla_cpu_linears
from retinanet_xla.xla.cpu_pooling import use_separable_stem_pools
from retinanet_xla.xla.cpu_residuals import use_materialized_residual_blocks


def use_xla_cpu_kernels(model: nn.Module) -> nn.Module:
    """Convert ``model`` in place for XLA:CPU and return it."""
    use_separable_stem_pools(model)
    use_xla_cpu_convolutions(model)
    use_xla_cpu_linears(model)
    use_materialized_residual_blocks(model)
    return model
