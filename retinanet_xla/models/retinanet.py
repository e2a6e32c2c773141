"""The RetinaNet module: backbone + heads + the anchors they predict against.

``RetinaNet()`` with no arguments is torchvision's ``retinanet_resnet50_fpn`` (v1): ResNet-50,
91 classes, same parameter names and shapes. The model returns raw head outputs; matching and
the loss live in ``retinanet_xla.ops`` and the training step, as torchvision keeps training out of
the model's math.
"""

import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from retinanet_xla.models.backbone import BackboneWithFPN
from retinanet_xla.models.head import RetinaNetHead
from retinanet_xla.ops.anchors import AnchorGenerator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_LEVELS = 5  # P3-P7


def feature_sizes(image_size: Sequence[int], rounds_down: bool = False) -> Tuple[Tuple[int, int], ...]:
    """Spatial sizes of P3-P7 for an input of ``image_size`` (H, W): every stride-2 step maps n
    to ceil(n / 2) (3x3 or 7x7 convolutions with padding, 1x1 downsampling), or to floor(n / 2)
    up to P5 when the body ``rounds_down`` (ConvNeXt's unpadded patchify and 2x2 steps).
    P6 and P7 are padded 3x3 stride-2 convolutions."""
    height, width = image_size
    sizes = []
    for level in range(1, 3 + NUM_LEVELS):
        halve = math.floor if rounds_down and level <= 5 else math.ceil
        height, width = halve(height / 2), halve(width / 2)
        if level >= 3:
            sizes.append((height, width))
    return tuple(sizes)


class RetinaNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 91,
        backbone: str = "resnet50",
        fpn_channels: int = 256,
        head_convs: int = 4,
        head_norm: str = "none",
        backbone_norm: str = "frozen_bn",
        freeze_at: int = 2,
        backbone_weights: Optional[Path] = None,
        anchor_generator: Optional[AnchorGenerator] = None,
        prior_probability: float = 0.01,
        p6_from: str = "p5",
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.anchor_generator = anchor_generator or AnchorGenerator()
        if self.anchor_generator.num_levels != NUM_LEVELS:
            raise ValueError(
                f"anchors must be configured for {NUM_LEVELS} levels (P3-P7), got {self.anchor_generator.num_levels}"
            )
        self.backbone = BackboneWithFPN(backbone, fpn_channels, backbone_norm, freeze_at, backbone_weights, p6_from)
        self.head = RetinaNetHead(
            fpn_channels, self.anchor_generator.num_anchors_per_location, num_classes, head_convs, head_norm, prior_probability
        )
        # Not part of the state dict, so torchvision checkpoints load with strict=True.
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] in 0..255 -> the float input ``forward`` expects. Done on the device
        so the host ships a quarter of the bytes."""
        return (images.float() / 255.0 - self.image_mean) / self.image_std

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        """Normalised images [B, 3, H, W] -> ``cls_logits`` [B, A, C], ``bbox_regression`` [B, A, 4]."""
        return self.head(self.backbone(images))

    def feature_sizes(self, image_size: Sequence[int]) -> Tuple[Tuple[int, int], ...]:
        """Spatial sizes of P3-P7 for an input of ``image_size`` (H, W)."""
        return feature_sizes(image_size, self.backbone.body.rounds_down)

    def anchors(self, image_size: Sequence[int]) -> Tensor:
        """Anchors [A, 4] (CPU, float32) for inputs of ``image_size`` (H, W), in head-output order."""
        return self.anchor_generator.grid_anchors(image_size, self.feature_sizes(image_size))
