"""ResNet body + FPN, laid out with torchvision's parameter names.

``backbone.body.*`` is torchvision's ResNet without ``avgpool``/``fc`` and
``backbone.fpn.*`` is torchvision's ``FeaturePyramidNetwork`` with ``LastLevelP6P7``, so a
torchvision RetinaNet state dict loads into ours with ``strict=True``.
"""

from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet

from retinanet_xla.models.norm import freeze_batch_norm, norm_layer

RESNET_DEPTHS = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101, 152: resnet.resnet152}
STAGES = ("layer1", "layer2", "layer3", "layer4")


class ResNetBody(nn.Module):
    """torchvision's ResNet up to ``layer4``; returns C3, C4, C5 (strides 8, 16, 32)."""

    def __init__(self, depth: int = 50, norm: str = "frozen_bn"):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}")
        net = RESNET_DEPTHS[depth](weights=None, norm_layer=norm_layer(norm))
        self.depth = depth
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if depth >= 50 else 1
        self.out_channels = [128 * expansion, 256 * expansion, 512 * expansion]

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]

    def freeze(self, freeze_at: int) -> None:
        """detectron2's ``freeze_at``: 0 trains everything, 1 freezes the stem, k >= 2 also
        freezes ``layer1`` .. ``layer{k-1}``. Frozen stages get frozen BatchNorm too."""
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be between 0 and 5, got {freeze_at}")
        frozen = [self.conv1, self.bn1] if freeze_at >= 1 else []
        frozen += [getattr(self, stage) for stage in STAGES[: max(freeze_at - 1, 0)]]
        for module in frozen:
            module.requires_grad_(False)
        if freeze_at >= 1:
            self.bn1 = freeze_batch_norm(self.bn1)
        for stage in STAGES[: max(freeze_at - 1, 0)]:
            setattr(self, stage, freeze_batch_norm(getattr(self, stage)))

    def load_imagenet_weights(self, path: Path) -> None:
        """Load a torchvision ImageNet ResNet state dict (the ``.pth`` torchvision downloads);
        ``fc.*`` is ignored. Raises ``ValueError`` naming the file and first mismatched keys."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"backbone weights file {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle, zip and weights_only errors all mean "not a state dict"
            raise ValueError(f"backbone weights file {path} is not a PyTorch state dict: {error}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"backbone weights file {path} is not a state dict of tensors")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.state_dict()
        # A frozen BatchNorm has no num_batches_tracked; an ImageNet file does.
        state = {k: v for k, v in state.items() if k in own or not k.endswith("num_batches_tracked")}
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
        wrong_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                problems.append(f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
        if problems:
            raise ValueError(f"backbone weights file {path} does not fit resnet{self.depth}: {'; '.join(problems)}")
        self.load_state_dict(state, strict=False)


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
    """P6 = conv(P5, stride 2), P7 = conv(relu(P6), stride 2): torchvision v1 and the TF recipe."""

    def __init__(self, channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)

    def forward(self, p5: Tensor) -> List[Tensor]:
        p6 = self.p6(p5)
        return [p6, self.p7(F.relu(p6))]


class FeaturePyramid(nn.Module):
    """Top-down FPN over C3-C5 plus P6/P7, parameter names as torchvision's
    ``FeaturePyramidNetwork`` (``inner_blocks.i.0``, ``layer_blocks.i.0``, ``extra_blocks.p6``)."""

    def __init__(self, in_channels: Sequence[int], channels: int = 256):
        super().__init__()
        self.inner_blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, channels, 1)) for c in in_channels)
        self.layer_blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1)) for _ in in_channels)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.constant_(module.bias, 0)
        self.extra_blocks = LastLevelP6P7(channels)

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        last_inner = self.inner_blocks[-1](features[-1])
        outputs = [self.layer_blocks[-1](last_inner)]
        for index in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[index](features[index])
            top_down = upsample_nearest(last_inner, lateral.shape[-2:])
            last_inner = lateral + top_down
            outputs.insert(0, self.layer_blocks[index](last_inner))
        return outputs + self.extra_blocks(outputs[-1])


class ResNetFPN(nn.Module):
    """The RetinaNet backbone: five feature maps P3-P7 with ``out_channels`` channels each."""

    def __init__(
        self,
        depth: int = 50,
        channels: int = 256,
        norm: str = "frozen_bn",
        freeze_at: int = 2,
        weights: Optional[Path] = None,
    ):
        super().__init__()
        self.body = ResNetBody(depth, norm)
        if weights is not None:
            self.body.load_imagenet_weights(weights)
        self.body.freeze(freeze_at)
        self.fpn = FeaturePyramid(self.body.out_channels, channels)
        self.out_channels = channels

    def forward(self, images: Tensor) -> List[Tensor]:
        return self.fpn(self.body(images))
