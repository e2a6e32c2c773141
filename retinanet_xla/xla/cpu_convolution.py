"""Convolutions in the forms XLA:CPU runs fast: 1x1 and small-output ones as a matrix product,
depthwise ones as a sum of taps, other grouped ones as one convolution per group.

XLA:CPU runs a convolution with its weights in HWIO order, while PyTorch keeps them in OIHW. So
every step, each weight is transposed for the forward convolution and again for the backward
one, and its gradient is transposed back, by loop fusions that read with a stride of I*H*W
floats. For ResNet's last stage these relayouts cost more than the convolutions: its 3x3
512-to-512 weights have 2.4 million elements, while at 128x128 input its feature maps have 16
pixels per image. A profile of the smoke step put 16% of the execution threads' time into
weight relayouts, two thirds of it for those weights.

A 1x1 convolution (ResNet's bottlenecks, MobileNet's and EfficientNet's expansions and
projections) is always a matrix product (its im2col matrix is the input itself): then only
whole image planes move (N and C swap), where XLA:CPU's convolution moves every element to put
the channels last, for the forward convolution and for both gradients'. ResNet-50's body
(batch 4, 256x256, forward and backward) took 2.73 s with XLA's convolutions and 1.0 s with
these products (0.78 s eager); MobileNetV2's 0.84 s and 0.54 s (0.22 s eager).

Where the output has fewer pixels (over the batch) than channels, the im2col matrix is smaller
than the weight, and the convolution is computed here as ``weight[O, I*kh*kw] @ columns[I*kh*kw,
N*Ho*Wo]``. The weight is used as it is stored, its gradient comes out in the same order, and
only the small im2col matrix moves. The result is the convolution's to rounding.

Grouped convolutions are rewritten too: XLA:CPU runs them as a slow generic loop, so a depthwise
one (one channel per group) becomes a sum of shifted taps and any other one ordinary
convolution per group.

Only on XLA's CPU backend: eager PyTorch (oneDNN) and TPU convolutions have no such cost. So
the model is built with ``nn.Conv2d`` and ``cpu_kernels.use_xla_cpu_kernels`` converts it where
the step is built on XLA:CPU; exports and every other backend see ordinary convolutions.
"""

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _shifted_taps(x: Tensor, kernel_h: int, kernel_w: int, stride, padding) -> List[Tensor]:
    """The zero-padded input at each of the kernel's taps (row-major), strided: ``kernel_h *
    kernel_w`` tensors of the convolution's output size, [N, C, Ho, Wo]."""
    (stride_h, stride_w), (pad_h, pad_w) = stride, padding
    out_h = _output_size(x.shape[-2], kernel_h, stride_h, pad_h)
    out_w = _output_size(x.shape[-1], kernel_w, stride_w, pad_w)
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h)) if pad_h or pad_w else x
    return [
        padded[:, :, i : i + stride_h * (out_h - 1) + 1 : stride_h, j : j + stride_w * (out_w - 1) + 1 : stride_w]
        for i in range(kernel_h)
        for j in range(kernel_w)
    ]


def _with_bias(out: Tensor, bias) -> Tensor:
    return out if bias is None else out + bias[None, :, None, None]


def convolution_as_matmul(x: Tensor, weight: Tensor, bias, stride, padding) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` for groups 1 and dilation 1, as one
    matrix product over the im2col matrix."""
    out_channels, _, kernel_h, kernel_w = weight.shape
    taps = _shifted_taps(x, kernel_h, kernel_w, stride, padding)
    batch, _, out_h, out_w = taps[0].shape
    # [N, I, kh*kw, Ho*Wo] -> [I*kh*kw, N*Ho*Wo]: rows in the order of the weight's I, kh, kw.
    columns = torch.stack(taps, 2).reshape(batch, -1, out_h * out_w).transpose(0, 1).reshape(-1, batch * out_h * out_w)
    out = torch.mm(weight.reshape(out_channels, -1), columns)
    return _with_bias(out.reshape(out_channels, batch, out_h, out_w).transpose(0, 1), bias)


def _sum_of_taps(x: Tensor, weight: Tensor, stride, padding) -> Tensor:
    kernel_h, kernel_w = weight.shape[2:]
    out = None
    for k, tap in enumerate(_shifted_taps(x, kernel_h, kernel_w, stride, padding)):
        term = tap * weight[None, :, 0, k // kernel_w, k % kernel_w, None, None]
        out = term if out is None else out + term
    return out


def _spread(grad: Tensor, stride, height: int, width: int) -> Tensor:
    """``grad`` with ``stride - 1`` zeros after each row and column, cut or zero-padded to
    ``height`` x ``width``: the output gradient on the stride-1 grid of window positions."""
    for dim, step in ((3, stride[1]), (2, stride[0])):
        if step > 1:
            size = list(grad.shape)
            size[dim] *= step
            grad = torch.stack([grad] + [torch.zeros_like(grad)] * (step - 1), dim + 1).reshape(size)
    grad = grad[:, :, :height, :width]
    return F.pad(grad, (0, width - grad.shape[3], 0, height - grad.shape[2]))


def _weight_gradient_by_taps(x: Tensor, grad: Tensor, kernel, stride, padding) -> Tensor:
    """A depthwise convolution's weight gradient, [C, kh*kw]: per tap, the output gradient
    times the tap's input slice, summed over the batch and the image."""
    taps = _shifted_taps(x, kernel[0], kernel[1], stride, padding)
    return torch.stack([(grad * tap).sum((0, 2, 3)) for tap in taps], 1)


def _weight_gradient_by_rows(x: Tensor, grad: Tensor, kernel, padding) -> Tensor:
    """The same at stride 1, as one batched matrix product per kernel row. For kernel row i,
    channel c: ``P[x', x] = sum over images and rows y of input[y + i, x'] * grad[y, x]`` (a
    product over the batch and the output's rows, the padded input's columns x' against the
    output's columns x); tap (i, j) is the sum of P's j-th diagonal (x' = x + j), read as a
    strided slice of P flattened."""
    (kernel_h, kernel_w), (pad_h, pad_w) = kernel, padding
    batch, channels, out_h, out_w = grad.shape
    dtype = torch.promote_types(x.dtype, grad.dtype)
    padded = F.pad(x.to(dtype), (pad_w, pad_w, pad_h, pad_h))
    width = padded.shape[3]  # out_w + kernel_w - 1
    with torch.autocast(device_type=x.device.type, enabled=False):
        grad_rows = grad.to(dtype).transpose(0, 1).reshape(channels, batch * out_h, out_w)
        span = out_w * (out_w + 1)  # one diagonal: out_w elements, out_w + 1 apart
        rows = []
        for i in range(kernel_h):
            input_rows = padded[:, :, i : i + out_h].transpose(0, 1).reshape(channels, batch * out_h, width)
            products = torch.bmm(input_rows.transpose(1, 2), grad_rows).reshape(channels, width * out_w)
            # Diagonal j starts at j * out_w and steps out_w + 1, so the last one (j = kernel_w -
            # 1) ends out_w elements past the end: pad by that much.
            products = F.pad(products, (0, out_w))
            taps = [
                products[:, j * out_w : j * out_w + span].reshape(channels, out_w, out_w + 1)[:, :, 0].sum(1)
                for j in range(kernel_w)
            ]
            rows.append(torch.stack(taps, 1))
    return torch.cat(rows, 1)


def _depthwise_weight_gradient(x: Tensor, grad: Tensor, kernel, stride, padding) -> Tensor:
    """A depthwise convolution's weight gradient, [C, kh*kw]. The per-tap sums read the
    gradient and the input once per tap: 49 passes for ConvNeXt's 7x7 kernels, where at stride
    1 and 16 output columns or more the products per kernel row are faster. XLA:CPU, batch 4,
    7x7 alone: 96 channels at 64x64 113 -> 36 ms, 192 at 32x32 21 -> 19 ms, 384 at 16x16 11.2
    -> 8.6 ms, but 768 at 8x8 4.4 -> 7.3 ms; ConvNeXt-T's body, forward and backward at
    256x256, 1,420-1,451 -> 1,337-1,449 ms (fastest of 5: 1,413-1,425 -> 1,315-1,341 ms). For
    3x3 kernels they are not: MobileNetV2's body 351-357 -> 374-377 ms."""
    rows_pay = kernel[0] * kernel[1] >= 49 and tuple(stride) == (1, 1) and grad.shape[3] >= 16
    if rows_pay:
        return _weight_gradient_by_rows(x, grad, kernel, padding)
    return _weight_gradient_by_taps(x, grad, kernel, stride, padding)


class _DepthwiseTaps(torch.autograd.Function):
    """A depthwise convolution as a sum of taps, whose input gradient is a sum of taps too.

    Autograd's gradient of the forward's strided slices is one zero-padded copy per tap,
    summed: XLA:CPU fuses that sum but tests every tap's bounds at every element. Here it is
    the transposed convolution written as a forward one: the output gradient spread to the
    stride-1 grid and correlated with the flipped kernel. A 3x3 depthwise convolution's
    forward and backward (144 channels, 64x64, batch 4) took 78 -> 60 ms at stride 1 and 38 ->
    24 ms at stride 2 (eager 11-16 ms); MobileNetV2's body 519 -> 403 ms, EfficientNet-B0's
    870 -> 593 ms."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, stride, padding) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return _sum_of_taps(x, weight, stride, padding)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        (kernel_h, kernel_w), (pad_h, pad_w) = weight.shape[2:], ctx.padding
        grad_weight = _depthwise_weight_gradient(x, grad, (kernel_h, kernel_w), ctx.stride, ctx.padding).reshape(weight.shape)
        height, width = x.shape[2] + 2 * pad_h, x.shape[3] + 2 * pad_w  # the padded input's
        spread = _spread(grad, ctx.stride, height - kernel_h + 1, width - kernel_w + 1)
        grad_padded = _sum_of_taps(spread, weight.flip(2, 3), (1, 1), (kernel_h - 1, kernel_w - 1))
        return grad_padded[:, :, pad_h : pad_h + x.shape[2], pad_w : pad_w + x.shape[3]], grad_weight, None, None


def materialized(x: Tensor) -> Tensor:
    """``x``, computed once. XLA:CPU fuses a producer made of cheap elementwise ops (slices,
    products, sums) into every consumer, so a depthwise convolution's sum of taps is recomputed
    by each fusion that reads it: by LayerNorm's mean, variance, normalisation and gradient
    fusions in ConvNeXt (6 times), by BatchNorm and the gradient's reductions elsewhere. XLA:CPU
    drops optimisation barriers before fusing, but never fuses into a matrix product's operands:
    so ``x`` goes through a product with the identity, exact (the products by 0 and 1 are
    exact), with autocast off so it stays in ``x``'s dtype. Its gradient goes through the same
    product, so the incoming gradient is computed once too. Forward and backward, batch 4,
    256x256: ConvNeXt-T's body 2.88 -> 1.89 s, EfficientNet-B0's 590 -> 545 ms, MobileNetV2's
    384-398 -> 357-379 ms.

    The product runs over rows of 16 elements of ``x`` flattened (one 64-byte cache line in
    float32; a reshape of a row-major array, so nothing moves), or over its last dimension
    where the size is not a multiple of 16: its cost grows with the row's length, and a
    128-wide image row made it 2 to 4 times slower (a 4x96x128x128 tensor: 12.2-12.4 ms against
    3.3-4.1 ms for rows of 16, XLA:CPU). A non-finite element makes its whole row NaN (inf
    times 0); such a step is already a diverged one."""
    width = 16 if x.numel() % 16 == 0 else x.shape[-1]
    with torch.autocast(device_type=x.device.type, enabled=False):
        identity = torch.eye(width, dtype=x.dtype, device=x.device)
        return torch.mm(x.reshape(-1, width), identity).reshape(x.shape)


def depthwise_as_taps(x: Tensor, weight: Tensor, bias, stride, padding) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, groups=C)`` for a depthwise convolution
    (one filter per channel, dilation 1) as a sum over the kernel's taps of shifted input slices
    times each channel's tap weight: elementwise work that XLA fuses into one loop. Its input
    gradient is computed the same way (``_DepthwiseTaps``). The result and its gradient are
    ``materialized``."""
    return materialized(_with_bias(_DepthwiseTaps.apply(x, weight, tuple(stride), tuple(padding)), bias))


def grouped_as_convolutions(x: Tensor, weight: Tensor, bias, stride, padding, groups: int) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, groups=groups)`` (dilation 1) as one
    ordinary convolution per group, concatenated. XLA:CPU runs a grouped convolution as a slow
    generic loop; its ordinary convolutions are fast even on a group's few channels. Forward
    and backward, XLA:CPU, batch 4, against a batched matrix product over the groups' im2col
    columns (the form used before): ResNeXt's first stage (128 channels in 32 groups, 64x64)
    140 -> 64 ms, RegNetY-3.2GF's first (72 in 3, 64x64) 82 -> 23 ms and third (576 in 24,
    16x16) 44 -> 17 ms (eager 14-38 ms)."""
    pieces = zip(x.chunk(groups, 1), weight.chunk(groups, 0))
    out = torch.cat([F.conv2d(part, part_weight, None, stride, padding) for part, part_weight in pieces], 1)
    return _with_bias(out, bias)


class XlaCpuGroupedConv2d(nn.Conv2d):
    """``nn.Conv2d`` with groups of several channels, computed by ``grouped_as_convolutions`` (for
    XLA:CPU only). Same parameters and state dict."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias) -> Tensor:
        return grouped_as_convolutions(x, weight, bias, self.stride, self.padding, self.groups)


class XlaCpuDepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` with one filter per channel, computed by ``depthwise_as_taps`` (for XLA:CPU
    only, whose grouped convolution is slow: docs/models.md). Same parameters and state dict."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias) -> Tensor:
        return depthwise_as_taps(x, weight, bias, self.stride, self.padding)


class XlaCpuConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes 1x1 and small-output convolutions as a matrix product (for
    XLA:CPU only: ``use_xla_cpu_convolutions``). Same parameters and state dict."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias) -> Tensor:
        out_h = _output_size(x.shape[-2], weight.shape[2], self.stride[0], self.padding[0])
        out_w = _output_size(x.shape[-1], weight.shape[3], self.stride[1], self.padding[1])
        pointwise = weight.shape[2:] == (1, 1) and self.padding == (0, 0)
        if pointwise or x.shape[0] * out_h * out_w < weight.shape[0]:
            return convolution_as_matmul(x, weight, bias, self.stride, self.padding)
        return super()._conv_forward(x, weight, bias)


def use_xla_cpu_convolutions(model: nn.Module) -> None:
    """Make every plain ``nn.Conv2d`` of ``model`` an ``XlaCpuConv2d``, every depthwise one an
    ``XlaCpuDepthwiseConv2d`` and every other grouped one an ``XlaCpuGroupedConv2d`` (in place:
    parameters, names and hooks stay). Dilated and non-zero-padded ones stay as they are."""
    for module in model.modules():
        plain = (
            type(module) is nn.Conv2d
            and module.dilation == (1, 1)
            and module.padding_mode == "zeros"
            and isinstance(module.padding, tuple)
        )
        if plain and module.groups == 1:
            module.__class__ = XlaCpuConv2d
        elif plain and module.groups == module.in_channels == module.out_channels:
            module.__class__ = XlaCpuDepthwiseConv2d
        elif plain and module.groups > 1:
            module.__class__ = XlaCpuGroupedConv2d
