"""Body + FPN, laid out with torchvision's parameter names.

``backbone.body.*`` is a torchvision classifier without its pooling and classifier
(``bodies.py``; for ResNet-50, torchvision's ResNet without ``avgpool``/``fc``) and
``backbone.fpn.*`` is torchvision's ``FeaturePyramidNetwork`` with ``LastLevelP6P7``, so a
torchvision RetinaNet state dict loads into ours with ``strict=True``.
"""

from pathlib import Path
from typing import List, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from retinanet_xla.models.bodies import ClassifierBody


def upsample_nearest(x: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour upsampling to ``size``, equal to ``F.interpolate(mode="nearest")``.

    torch_xla 2.9 has no lowering for ``upsample_nearest2d_backward``: it falls back to the CPU,
    which splits the train step into several graphs. When each side doubles (or doubles minus
    one, as odd sizes do in a stride-2 network) nearest upsampling is a broadcast and a crop,
    whose backward is a plain sum that XLA fuses.
    """
    batch, channels, height, width = x.shape
    out_h, out_w = int(size[0]), int(size[1])
    if out_h not in (2 * height - 1, 2 * height) or out_w not in (2 * width - 1, 2 * width):
        return F.interpolate(x, size=(out_h, out_w), mode="nearest")
    doubled = x[:, :, :, None, :, None].expand(batch, channels, height, 2, width, 2)
    return doubled.reshape(batch, channels, 2 * height, 2 * width)[:, :, :out_h, :out_w]


class LastLevelP6P7(nn.Module):
    """P6 = conv(P5, stride 2), P7 = conv(relu(P6), stride 2): torchvision v1 and the TF recipe.
    With ``in_channels`` (C5's), P6 comes from C5 instead: torchvision's v2 and detectron2."""

    def __init__(self, channels: int, in_channels: Optional[int] = None):
        super().__init__()
        self.from_c5 = in_channels is not None
        self.p6 = nn.Conv2d(in_channels or channels, channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)

    def forward(self, p5: Tensor, c5: Tensor) -> List[Tensor]:
        p6 = self.p6(c5 if self.from_c5 else p5)
        return [p6, self.p7(F.relu(p6))]


class FeaturePyramid(nn.Module):
    """Top-down FPN over C3-C5 plus P6/P7, parameter names as torchvision's
    ``FeaturePyramidNetwork`` (``inner_blocks.i.0``, ``layer_blocks.i.0``, ``extra_blocks.p6``)."""

    def __init__(self, in_channels: Sequence[int], channels: int = 256, p6_from: str = "p5"):
        super().__init__()
        if p6_from not in ("p5", "c5"):
            raise ValueError(f"p6_from must be p5 or c5, got {p6_from!r}")
        self.inner_blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, channels, 1)) for c in in_channels)
        self.layer_blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1)) for _ in in_channels)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.constant_(module.bias, 0)
        self.extra_blocks = LastLevelP6P7(channels, in_channels[-1] if p6_from == "c5" else None)

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        last_inner = self.inner_blocks[-1](features[-1])
        outputs = [self.layer_blocks[-1](last_inner)]
        for index in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[index](features[index])
            top_down = upsample_nearest(last_inner, lateral.shape[-2:])
            last_inner = lateral + top_down
            outputs.insert(0, self.layer_blocks[index](last_inner))
        return outputs + self.extra_blocks(outputs[-1], features[-1])


class BackboneWithFPN(nn.Module):
    """The RetinaNet backbone: five feature maps P3-P7 with ``out_channels`` channels each."""

    def __init__(
        self,
        name: str = "resnet50",
        channels: int = 256,
        norm: str = "frozen_bn",
        freeze_at: int = 2,
        weights: Optional[Path] = None,
        p6_from: str = "p5",
    ):
        super().__init__()
        self.body = ClassifierBody(name, norm)
        if weights is not None:
            self.body.load_imagenet_weights(weights)
        self.body.freeze(freeze_at)
        self.fpn = FeaturePyramid(self.body.out_channels, channels, p6_from)
        self.out_channels = channels

    def forward(self, images: Tensor) -> List[Tensor]:
        return self.fpn(self.body(images))
