"""RetinaNet classification and box-regression heads, named as torchvision's ``RetinaNetHead``.

Each branch is a tower of ``num_convs`` 3x3 convs (optionally GroupNorm, as torchvision's v2
head) then a predictor conv. Outputs are flattened level by level in (H, W, anchor) order, the
order of the anchors.
"""

import math
from typing import Dict, List

import torch
from torch import Tensor, nn

from retinanet_xla.config import HEAD_GROUPS, HEAD_NORMS


def _conv_tower(channels: int, num_convs: int, norm: str) -> nn.Sequential:
    if norm not in HEAD_NORMS:
        raise ValueError(f"head norm must be one of {', '.join(HEAD_NORMS)}, got {norm!r}")
    layers = []
    for _ in range(num_convs):
        if norm == "gn":
            block = [
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.GroupNorm(HEAD_GROUPS, channels),
                nn.ReLU(inplace=True),
            ]
        else:
            block = [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Sequential(*block))
    tower = nn.Sequential(*layers)
    for module in tower.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=0.01)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)
    return tower


def _flatten(output: Tensor, values_per_anchor: int) -> Tensor:
    """[B, A*K, H, W] -> [B, H*W*A, K]."""
    batch, _, height, width = output.shape
    output = output.view(batch, -1, values_per_anchor, height, width).permute(0, 3, 4, 1, 2)
    return output.reshape(batch, -1, values_per_anchor)


class ClassificationHead(nn.Module):
    def __init__(
        self,
        channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 4,
        norm: str = "none",
        prior_probability: float = 0.01,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.conv = _conv_tower(channels, num_convs, norm)
        self.cls_logits = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        nn.init.normal_(self.cls_logits.weight, std=0.01)
        # Focal-loss prior: start every anchor at probability ``prior_probability`` so the many
        # easy negatives do not swamp the first iterations.
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, features: List[Tensor]) -> Tensor:
        return torch.cat([_flatten(self.cls_logits(self.conv(f)), self.num_classes) for f in features], dim=1)


class RegressionHead(nn.Module):
    def __init__(self, channels: int, num_anchors: int, num_convs: int = 4, norm: str = "none"):
        super().__init__()
        self.conv = _conv_tower(channels, num_convs, norm)
        self.bbox_reg = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        nn.init.normal_(self.bbox_reg.weight, std=0.01)
        nn.init.zeros_(self.bbox_reg.bias)

    def forward(self, features: List[Tensor]) -> Tensor:
        return torch.cat([_flatten(self.bbox_reg(self.conv(f)), 4) for f in features], dim=1)


class RetinaNetHead(nn.Module):
    def __init__(
        self,
        channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 4,
        norm: str = "none",
        prior_probability: float = 0.01,
    ):
        super().__init__()
        self.classification_head = ClassificationHead(channels, num_anchors, num_classes, num_convs, norm, prior_probability)
        self.regression_head = RegressionHead(channels, num_anchors, num_convs, norm)

    def forward(self, features: List[Tensor]) -> Dict[str, Tensor]:
        return {"cls_logits": self.classification_head(features), "bbox_regression": self.regression_head(features)}
