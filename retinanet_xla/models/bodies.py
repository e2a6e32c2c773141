"""Backbone bodies: a torchvision classification network without its classifier, returning the
stride-8, 16 and 32 feature maps (C3, C4, C5) for the FPN.

The body keeps the network's own module names (``conv1``, ``layer1`` for ResNets; ``features``
for MobileNet, EfficientNet and ConvNeXt; ``stem``, ``trunk_output`` for RegNet), so the
ImageNet ``.pth`` torchvision publishes for the network loads into it, and a torchvision
RetinaNet's ``backbone.body.*`` keys load into ours. Which blocks give C3-C5 is found from the
network itself: the trunk runs once on a small input and the last block at each stride wins.
"""

import io
import math
import re
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torchvision import models

from retinanet_xla import storage
from retinanet_xla.models.norm import convert_batch_norm, freeze_batch_norm

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2")
# name -> (top-level children that form the trunk, children flattened into blocks, classifier key prefixes)
_FEATURES = (("features",), ("features",), ("classifier.",))
FAMILIES: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...]]] = {
    **{name: (("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"), (), ("fc.",)) for name in RESNETS},
    "mobilenet_v2": _FEATURES,
    "mobilenet_v3_large": _FEATURES,
    **{f"efficientnet_b{i}": _FEATURES for i in range(4)},
    "regnet_y_400mf": (("stem", "trunk_output"), ("trunk_output",), ("fc.",)),
    "regnet_y_3_2gf": (("stem", "trunk_output"), ("trunk_output",), ("fc.",)),
    "convnext_tiny": _FEATURES,
}
BACKBONES = tuple(FAMILIES)
# Blocks that form the stem (detectron2's freeze_at 1): ResNet's conv1/bn1/relu/maxpool, else the first.
_STEM_BLOCKS = {name: 4 for name in RESNETS}
_PROBE_SIZE = 64


class ClassifierBody(nn.Module):
    """A torchvision classifier's trunk; ``forward`` returns [C3, C4, C5]."""

    def __init__(self, name: str = "resnet50", norm: str = "frozen_bn"):
        super().__init__()
        if name not in FAMILIES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {name!r}")
        self.name = name
        trunk, flattened, self.classifier_prefixes = FAMILIES[name]
        network = convert_batch_norm(getattr(models, name)(weights=None), norm)
        for child in trunk:
            self.add_module(child, getattr(network, child))
        # Blocks in order, as paths below this module: the unit of stride probing and freezing.
        self.block_paths: List[str] = []
        for child in trunk:
            module = getattr(self, child)
            self.block_paths += [f"{child}.{name}" for name, _ in module.named_children()] if child in flattened else [child]
        strides, channels = self._probe()
        self.feature_blocks = [max(i for i, s in enumerate(strides) if s == stride) for stride in (8, 16, 32)]
        self.out_channels = [channels[i] for i in self.feature_blocks]
        stem = _STEM_BLOCKS.get(name, 1)
        # detectron2's stage numbers: 0 the stem, 1 up to stride 4, then 2, 3, 4 at strides 8, 16, 32.
        self.block_stages = [0 if i < stem else max(1, int(math.log2(s)) - 1) for i, s in enumerate(strides)]
        # ConvNeXt's patchify stem and 2x2 downsampling round sizes down; 3x3/7x7 stride-2
        # convolutions with padding round up.
        self.rounds_down = name.startswith("convnext")

    @torch.no_grad()
    def _probe(self) -> Tuple[List[int], List[int]]:
        """Output stride and channels of every block, from one forward pass in eval mode."""
        was_training = self.training
        self.eval()
        x, strides, channels = torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE), [], []
        for path in self.block_paths:
            x = self.get_submodule(path)(x)
            strides.append(_PROBE_SIZE // x.shape[-1])
            channels.append(x.shape[1])
        self.train(was_training)
        if not {8, 16, 32} <= set(strides):
            raise ValueError(f"{self.name}: no stride-8/16/32 feature maps found (strides {sorted(set(strides))})")
        return strides, channels

    def forward(self, x: Tensor) -> List[Tensor]:
        features = []
        for index, path in enumerate(self.block_paths[: self.feature_blocks[-1] + 1]):
            x = self.get_submodule(path)(x)
            if index in self.feature_blocks:
                features.append(x)
        return features

    def freeze(self, freeze_at: int) -> None:
        """detectron2's ``freeze_at`` for every family: 0 trains everything, 1 freezes the stem,
        k >= 2 also freezes the stages up to stride 2^k (ResNet: ``layer1`` .. ``layer{k-1}``).
        Frozen stages get frozen BatchNorm too."""
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be between 0 and 5, got {freeze_at}")
        for path, stage in zip(self.block_paths, self.block_stages):
            if stage >= freeze_at:
                continue
            block = self.get_submodule(path)
            block.requires_grad_(False)
            parent, _, child = path.rpartition(".")
            setattr(self.get_submodule(parent) if parent else self, child, freeze_batch_norm(block))

    def load_imagenet_weights(self, path: storage.Location) -> None:
        """Load the ImageNet state dict torchvision publishes for this network (the ``.pth`` it
        downloads); classifier keys are ignored. Raises ``ValueError`` naming the network, the
        file and the first mismatched keys."""
        if not storage.is_file(path):
            raise ValueError(f"backbone weights file {path} does not exist")
        try:
            state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
        except Exception as error:  # pickle, zip and weights_only errors all mean "not a state dict"
            # torch's own text runs to several lines and suggests weights_only=False, which would
            # run the file's code: one line naming what was refused, and nothing else.
            named = re.search(r"GLOBAL ([\w.]+)", str(error))
            first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
            reason = f"it names the Python object {named.group(1)}, which is never loaded" if named else first
            raise ValueError(f"backbone weights file {path} is not a PyTorch state dict of tensors ({reason})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"backbone weights file {path} is not a state dict of tensors")
        state = {k: v for k, v in state.items() if not k.startswith(self.classifier_prefixes)}
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
            raise ValueError(f"backbone weights file {path} does not fit {self.name}: {'; '.join(problems)}")
        self.load_state_dict(state, strict=False)
