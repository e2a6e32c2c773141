"""Normalisation layers for the backbone, chosen by name.

- ``frozen_bn``: fixed ImageNet statistics and affine (torchvision's RetinaNet v1, fine-tuning).
- ``bn``: ordinary BatchNorm, statistics over each replica's own batch.
- ``cross_replica_bn``: statistics averaged over all replicas. On a TPU each core sees 8 images
  or fewer; training from scratch needs the statistics of the global batch (the TF recipe).
- ``gn``: GroupNorm (32 groups), independent of the batch.
"""

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

NORMS = ("frozen_bn", "bn", "cross_replica_bn", "gn")
GROUP_NORM_GROUPS = 32


def _identity(tensor: Tensor) -> Tensor:
    return tensor


class CrossReplicaBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose batch statistics are averaged over replicas in training.

    ``average_across_replicas`` must be a differentiable mean over replicas (the trainer installs
    torch_xla's all-reduce); with the default identity it is exactly ``nn.BatchNorm2d``. Every
    replica has the same per-replica batch, so the mean of per-replica moments is the global one,
    and the running variance is unbiased with the global count, as one BatchNorm over the global
    batch would.
    """

    average_across_replicas: Callable[[Tensor], Tensor] = staticmethod(_identity)
    num_replicas: int = 1

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.average_across_replicas is _identity:
            return super().forward(x)
        moments = torch.stack([x.mean(dim=(0, 2, 3)), (x * x).mean(dim=(0, 2, 3))])
        mean, mean_of_squares = self.average_across_replicas(moments)
        var = (mean_of_squares - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                count = x.numel() / x.shape[1] * self.num_replicas
                self.num_batches_tracked.add_(1)
                unbiased = var * (count / max(count - 1, 1))
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(unbiased, self.momentum)
        # The statistics carry gradient (through the all-reduce), so F.batch_norm cannot take them.
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = (self.bias if self.affine else 0) - mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def norm_layer(name: str) -> Callable[[int], nn.Module]:
    """A factory ``channels -> module`` for torchvision's ``norm_layer`` argument."""
    if name == "frozen_bn":
        return FrozenBatchNorm2d
    if name == "bn":
        return nn.BatchNorm2d
    if name == "cross_replica_bn":
        return CrossReplicaBatchNorm2d
    if name == "gn":
        return partial(nn.GroupNorm, GROUP_NORM_GROUPS)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {name!r}")


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below ``module`` (and itself) with FrozenBatchNorm2d holding the
    same statistics: frozen stages must not update running statistics either."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            frozen.weight.copy_(module.weight)
            frozen.bias.copy_(module.bias)
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        replacement = freeze_batch_norm(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module


def set_replica_averaging(module: nn.Module, average_across_replicas: Callable[[Tensor], Tensor], num_replicas: int) -> None:
    """Install the cross-replica mean on every CrossReplicaBatchNorm2d inside ``module``."""
    for layer in module.modules():
        if isinstance(layer, CrossReplicaBatchNorm2d):
            layer.average_across_replicas = average_across_replicas
            layer.num_replicas = num_replicas
