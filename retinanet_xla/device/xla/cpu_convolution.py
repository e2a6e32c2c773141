"""Convolutions that XLA's CPU client runs slowly, as the matrix products it runs fast.

XLA:CPU convolves with the weights in HWIO order and the activations channels last, while
PyTorch keeps OIHW and NCHW: every step each weight and activation is moved into its layout for
the forward convolution and both gradients. Where the convolution itself is small, the moves
cost more than it does: a 1x1 convolution (its im2col matrix is the input), and one whose
output has fewer pixels over the batch than it has channels (ResNet's last stage at the smoke
model's 128x128: 512 channels, 4x4 pixels). Both are ``weight[O, I*kh*kw] @ columns[I*kh*kw,
N*Ho*Wo]`` here, the weight used as stored; the result is the convolution's to rounding.

Only the CPU client needs it, so the model is built with ``nn.Conv2d`` everywhere and the
runtime converts it where it places it (``XlaRuntime.place_model``, ``runtime.xla_cpu_kernels``);
checkpoints and exports see ordinary convolutions. Why it stays: the ``make demo`` model's
training runs 20-25% faster with it (docs/performance.md, "XLA:CPU kernel rewrites").
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def convolution_as_matmul(x: Tensor, weight: Tensor, bias, stride, padding) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` for groups 1 and dilation 1, as one
    matrix product over the im2col matrix."""
    out_channels, _, kernel_h, kernel_w = weight.shape
    (stride_h, stride_w), (pad_h, pad_w) = stride, padding
    out_h = _output_size(x.shape[-2], kernel_h, stride_h, pad_h)
    out_w = _output_size(x.shape[-1], kernel_w, stride_w, pad_w)
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h)) if pad_h or pad_w else x
    taps = [  # the padded input at each tap of the kernel (row-major), strided: [N, I, Ho, Wo]
        padded[:, :, i : i + stride_h * (out_h - 1) + 1 : stride_h, j : j + stride_w * (out_w - 1) + 1 : stride_w]
        for i in range(kernel_h)
        for j in range(kernel_w)
    ]
    batch = x.shape[0]
    # [N, I, kh*kw, Ho*Wo] -> [I*kh*kw, N*Ho*Wo]: rows in the order of the weight's I, kh, kw.
    columns = torch.stack(taps, 2).reshape(batch, -1, out_h * out_w).transpose(0, 1).reshape(-1, batch * out_h * out_w)
    out = torch.mm(weight.reshape(out_channels, -1), columns).reshape(out_channels, batch, out_h, out_w).transpose(0, 1)
    return out if bias is None else out + bias[None, :, None, None]


class XlaCpuConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes 1x1 and small-output convolutions as a matrix product.
    Same parameters and state dict."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias) -> Tensor:
        out_h = _output_size(x.shape[-2], weight.shape[2], self.stride[0], self.padding[0])
        out_w = _output_size(x.shape[-1], weight.shape[3], self.stride[1], self.padding[1])
        pointwise = weight.shape[2:] == (1, 1) and self.padding == (0, 0)
        if pointwise or x.shape[0] * out_h * out_w < weight.shape[0]:
            return convolution_as_matmul(x, weight, bias, self.stride, self.padding)
        return super()._conv_forward(x, weight, bias)


def use_matmul_convolutions(model: nn.Module) -> nn.Module:
    """Every plain ``nn.Conv2d`` of ``model`` (groups 1, dilation 1, zero padding given as
    sizes) becomes an ``XlaCpuConv2d``, in place: parameters, names and hooks stay. Any model
    built from ``nn.Conv2d`` is covered: a new backbone needs nothing here."""
    for module in model.modules():
        if (
            type(module) is nn.Conv2d
            and module.groups == 1
            and module.dilation == (1, 1)
            and module.padding_mode == "zeros"
            and isinstance(module.padding, tuple)
        ):
            module.__class__ = XlaCpuConv2d
    return model
