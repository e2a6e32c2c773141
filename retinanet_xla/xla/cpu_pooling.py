"""ResNet's stem max pool (3x3 window, stride 2, padding 1) in a form XLA:CPU runs fast.

XLA lowers the gradient of ``max_pool2d`` to ``select-and-scatter``, which XLA:CPU runs as a
scalar loop: measured on the smoke model's stem (8x64x64x64), forward and backward took 51 ms on
CPU XLA against 14 ms eager, the largest single gap in the step. A 3x3 max is separable: a 3-wide
max along the width, then along the height. Each 1-D pass keeps which of its three taps won, and
its gradient is a few selects, pads and an interleave, all element-wise, which XLA fuses (23 ms).

The result is ``max_pool2d``'s exactly, and so is the gradient's routing: PyTorch sends each
window's gradient to the first maximum in row-major order; the width pass keeps the first
maximum of each row and the height pass the first row holding the window's maximum, which is
the same element. Only the order in which overlapping windows' gradients are summed can differ
(last bits). Only on XLA:CPU (``cpu_kernels.use_xla_cpu_kernels`` swaps it in where the step
is built): oneDNN's kernel is faster eagerly, TPUs have a native select-and-scatter, and the
model itself, and so every export, keeps torchvision's ``nn.MaxPool2d``.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _taps(x: Tensor, dim: int, outputs: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The three taps (2a, 2a+1, 2a+2) of each window along ``dim``, which holds 2*outputs + 2
    elements: a reshape into pairs and slices, not strided gathers."""
    shape = list(x.shape)
    shape[dim : dim + 1] = [outputs + 1, 2]
    pairs = x.reshape(shape)
    even, odd = pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)
    return even.narrow(dim, 0, outputs), odd.narrow(dim, 0, outputs), even.narrow(dim, 1, outputs)


def _pad_along(x: Tensor, dim: int, before: int, after: int) -> Tensor:
    return F.pad(x, [0, 0] * (x.dim() - dim - 1) + [before, after])


class _WindowMax1d(torch.autograd.Function):
    """Max over windows of 3 at stride 2 along ``dim`` of an input padded to 2*outputs + 2."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int) -> Tensor:
        first, second, third = _taps(x, dim, x.shape[dim] // 2 - 1)
        # Strictly greater keeps the first maximum; NaN wins, as in max_pool2d.
        second_wins = (second > first) | torch.isnan(second)
        best = torch.where(second_wins, second, first)
        third_wins = (third > best) | torch.isnan(third)
        ctx.save_for_backward(second_wins, third_wins)
        ctx.dim = dim
        return torch.where(third_wins, third, best)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None]:
        second_wins, third_wins = ctx.saved_tensors
        dim = ctx.dim
        zero = grad.new_zeros(())
        to_third = torch.where(third_wins, grad, zero)
        rest = torch.where(third_wins, zero, grad)
        to_second = torch.where(second_wins, rest, zero)
        to_first = torch.where(second_wins, zero, rest)
        # Even positions 2a get window a's first tap and window a-1's third; odd ones the second.
        even = _pad_along(to_first, dim, 0, 1) + _pad_along(to_third, dim, 1, 0)
        odd = _pad_along(to_second, dim, 0, 1)
        shape = list(grad.shape)
        shape[dim] = 2 * grad.shape[dim] + 2
        return torch.stack([even, odd], dim + 1).reshape(shape), None


def separable_max_pool_3x3_stride_2(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 3, stride=2, padding=1)`` on an NCHW tensor, as two 1-D passes."""
    height, width = x.shape[-2:]
    out_h, out_w = (height - 1) // 2 + 1, (width - 1) // 2 + 1
    padded = F.pad(x, (1, 1 + 2 * out_w - width, 1, 1 + 2 * out_h - height), value=float("-inf"))
    return _WindowMax1d.apply(_WindowMax1d.apply(padded, x.dim() - 1), x.dim() - 2)


class StemMaxPool(nn.Module):
    """Drop-in for ResNet's ``nn.MaxPool2d(3, 2, 1)``, computed as two separable passes."""

    def forward(self, x: Tensor) -> Tensor:
        return separable_max_pool_3x3_stride_2(x)


def use_separable_stem_pools(model: nn.Module) -> None:
    """Replace every ``nn.MaxPool2d(3, 2, 1)`` below ``model`` with ``StemMaxPool`` (in place;
    pools have no parameters, so the state dict stays)."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if is_stem_max_pool(child):
                setattr(parent, name, StemMaxPool())


def is_stem_max_pool(module: nn.Module) -> bool:
    """Whether ``StemMaxPool`` computes exactly what ``module`` does."""
    return (
        isinstance(module, nn.MaxPool2d)
        and _pair(module.kernel_size) == (3, 3)
        and _pair(module.stride) == (2, 2)
        and _pair(module.padding) == (1, 1)
        and _pair(module.dilation) == (1, 1)
        and not module.ceil_mode
        and not module.return_indices
    )


def _pair(value) -> Tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)
