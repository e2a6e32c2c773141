"""Lower bounds of the memory a training step or an inference batch needs, from shapes alone:
the model runs on the ``meta`` device (nothing allocated, no arithmetic), so a config or file
whose sizes cannot fit is refused in one line before anything is built for real, instead of
swapping the host for minutes or dying in the allocator (a 10000x10000 input grew past 7 GiB
before it failed; ``data.max_boxes: 2000000`` asked box_iou for 393 GB).

Every tensor whose size a config or a file sets is here: the images (``data.image_size``, the
batch), the convolutions' outputs, the weights (``model.num_classes``, ``fpn_channels``, ...),
and the matcher's tables ``[batch, anchors, max_boxes]`` (``data.max_boxes``)."""

import copy
from typing import List, Tuple

import torch
from torch import nn

GIB = 2**30


def meta_copy(model: nn.Module) -> nn.Module:
    """``model`` on the meta device: a copy whose tensors are shapes only, made without reading
    or copying the model's own (which may live on an accelerator)."""
    memo = {}
    for parameter in model.parameters():
        memo[id(parameter)] = nn.Parameter(torch.empty_like(parameter, device="meta"), parameter.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    for module in model.modules():  # functions a module holds (a replica group's mean) are shared, not copied
        for value in vars(module).values():
            if callable(value) and not isinstance(value, (nn.Module, torch.Tensor)):
                memo[id(value)] = value
    return copy.deepcopy(model, memo)


def convolution_outputs(meta_model: nn.Module, batch_size: int, image_size: Tuple[int, int]) -> List[int]:
    """The number of values each convolution of a forward pass outputs, in order."""
    outputs: List[int] = []

    def count(module, inputs, output) -> None:
        outputs.append(output.numel())

    # In eval mode: the same shapes, and no cross-replica BatchNorm (no collective, no autocast
    # on the meta device) in a measurement.
    meta_model.eval()
    hooks = [m.register_forward_hook(count) for m in meta_model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            meta_model(torch.zeros(batch_size, 3, *image_size, device="meta"))  # normalised images
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def value_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


def activation_bytes(model: nn.Module, batch_size: int, image_size, precision: str) -> int:
    """What a training step keeps for its backward pass at least: every convolution's output
    (each is a BatchNorm's, an activation's or the next layer's saved input)."""
    return sum(convolution_outputs(meta_copy(model), batch_size, tuple(image_size))) * value_bytes(precision)


def anchor_count(model: nn.Module, image_size: Tuple[int, int]) -> int:
    return int(model.anchors(tuple(image_size)).shape[0])  # a few MB at the largest image_size


def matcher_bytes(batch_size: int, anchors: int, max_boxes: int) -> int:
    """The matcher's IoU and crowd-IoA tables, ``[batch, anchors, max_boxes]`` float32 each."""
    return 2 * 4 * batch_size * anchors * max_boxes


def training_bytes(model: nn.Module, batch_size: int, image_size, precision: str, max_boxes: int) -> Tuple[int, int]:
    """(all of a training step's lower bound, the matcher's part of it): activations, weights
    with their gradients and two optimizer moments, and the matcher's tables."""
    matcher = matcher_bytes(batch_size, anchor_count(model, image_size), max_boxes)
    weights = 4 * 4 * sum(p.numel() for p in model.parameters())
    return activation_bytes(model, batch_size, image_size, precision) + weights + matcher, matcher


def inference_bytes(model: nn.Module, batch_size: int, image_size, precision: str) -> int:
    """An inference batch's lower bound: the weights, the batch of images (as loaded, and
    normalised), and the largest convolution's input and output at once."""
    outputs = convolution_outputs(meta_copy(model), batch_size, tuple(image_size))
    images = batch_size * 3 * image_size[0] * image_size[1] * (1 + 4)
    return 4 * sum(p.numel() for p in model.parameters()) + images + 2 * max(outputs, default=0) * value_bytes(precision)
