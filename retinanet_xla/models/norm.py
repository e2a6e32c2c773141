"""Normalisation layers for the backbone, chosen by name.

- ``frozen_bn``: fixed ImageNet statistics and affine (torchvision's RetinaNet v1, fine-tuning).
- ``bn``: ordinary BatchNorm, statistics over each replica's own batch.
- ``cross_replica_bn``: statistics averaged over all replicas. On a TPU each core sees 8 images
  or fewer; training from scratch needs the statistics of the global batch (the TF recipe).
- ``gn``: GroupNorm (32 groups), independent of the batch.
"""

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from retinanet_xla.config import BACKBONE_NORMS as NORMS

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
        # In float32 whatever autocast gave us, as torch's own batch_norm under autocast: the
        # moments of bfloat16 activations lose 3 decimal digits, E[x^2] - E[x]^2 then cancels
        # them away, and the running buffers must stay float32 for eval and checkpoints.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._normalize_over_replicas(x.float())

    def _normalize_over_replicas(self, x: Tensor) -> Tensor:
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


def convert_batch_norm(module: nn.Module, norm: str) -> nn.Module:
    """Every ``nn.BatchNorm2d`` of a freshly built torchvision network, as ``norm`` says: ``bn``
    keeps it, ``frozen_bn`` / ``cross_replica_bn`` swap the class (same eps and statistics),
    ``gn`` puts GroupNorm with 32 groups (fewer where the channels do not divide) in its place.
    Networks with their own normalisation (ConvNeXt's LayerNorm) keep it."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if norm == "bn":
        return module
    if type(module) is nn.BatchNorm2d:
        if norm == "frozen_bn":
            return freeze_batch_norm(module)
        if norm == "gn":
            return nn.GroupNorm(math.gcd(GROUP_NORM_GROUPS, module.num_features), module.num_features, eps=module.eps)
        replica = CrossReplicaBatchNorm2d(module.num_features, module.eps, module.momentum)
        replica.load_state_dict(module.state_dict())
        return replica
    for name, child in module.named_children():
        replacement = convert_batch_norm(child, norm)
        if replacement is not child:
            setattr(module, name, replacement)
    return module


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
