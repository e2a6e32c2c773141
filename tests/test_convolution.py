import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retinanet_xla.models import RetinaNet
from retinanet_xla.xla.cpu_convolution import (
    XlaCpuConv2d,
    XlaCpuDepthwiseConv2d,
    XlaCpuGroupedConv2d,
    _weight_gradient_by_rows,
    _weight_gradient_by_taps,
    convolution_as_matmul,
    depthwise_as_taps,
    grouped_as_convolutions,
    materialized,
    use_xla_cpu_convolutions,
)
from retinanet_xla.xla.cpu_kernels import use_xla_cpu_kernels
from retinanet_xla.xla.cpu_pooling import StemMaxPool


def assert_same_values_and_gradients(got, expected, inputs, generator):
    """``got`` equals ``expected`` in float64, and so do their gradients for one random output
    gradient, with respect to each of ``inputs``."""
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    for g_got, g_expected in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(g_got, g_expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kernel, stride, padding, bias",
    [(3, 1, 1, True), (3, 2, 1, False), (1, 1, 0, True), (1, 2, 0, False), (3, 1, 0, True), (3, 2, 0, True)],
)
def test_convolution_as_matmul_equals_conv2d_with_gradients(kernel, stride, padding, bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 9, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(6, 5, kernel, kernel, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True) if bias else None
    expected = F.conv2d(x, weight, b, stride, padding)
    got = convolution_as_matmul(x, weight, b, (stride, stride), (padding, padding))
    assert_same_values_and_gradients(got, expected, [x, weight] + ([b] if bias else []), generator)


@pytest.mark.parametrize(
    "kernel, stride, padding, bias",
    [(3, 1, 1, False), (3, 2, 1, True), (5, 2, 2, False), (5, 1, 2, True), (7, 1, 3, False), (3, 2, 0, True)],
)
def test_depthwise_as_taps_equals_grouped_conv2d_with_gradients(kernel, stride, padding, bias):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 11, 9, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(6, 1, kernel, kernel, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True) if bias else None
    expected = F.conv2d(x, weight, b, stride, padding, groups=6)
    got = depthwise_as_taps(x, weight, b, (stride, stride), (padding, padding))
    assert_same_values_and_gradients(got, expected, [x, weight] + ([b] if bias else []), generator)


@pytest.mark.parametrize("kernel, padding, width", [(7, 3, 20), (3, 1, 16), (5, 2, 3), (3, 0, 17), (1, 0, 4)])
def test_both_depthwise_weight_gradients_equal_conv2d_weight(kernel, padding, width):
    """The per-tap sums and the per-row products (stride 1), which depthwise_as_taps picks
    between by the kernel's size and the output's width, against torch's own weight gradient,
    in float64."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 6, width, dtype=torch.float64, generator=generator)
    out_h, out_w = 6 + 2 * padding - kernel + 1, width + 2 * padding - kernel + 1
    grad = torch.randn(2, 5, out_h, out_w, dtype=torch.float64, generator=generator)
    expected = torch.nn.grad.conv2d_weight(x, (5, 1, kernel, kernel), grad, 1, padding, 1, 5).reshape(5, -1)
    by_rows = _weight_gradient_by_rows(x, grad, (kernel, kernel), (padding, padding))
    by_taps = _weight_gradient_by_taps(x, grad, (kernel, kernel), (1, 1), (padding, padding))
    torch.testing.assert_close(by_rows, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(by_taps, expected, rtol=0, atol=1e-12)


def test_depthwise_as_taps_on_a_wide_input_equals_grouped_conv2d_with_gradients():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 5, 21, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(6, 1, 7, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True)
    expected = F.conv2d(x, weight, b, 1, 3, groups=6)
    got = depthwise_as_taps(x, weight, b, (1, 1), (3, 3))
    assert got.shape[3] >= 16  # the per-row products
    assert_same_values_and_gradients(got, expected, [x, weight, b], generator)


def test_materialized_is_exactly_its_input_with_its_gradient_and_keeps_its_dtype_under_autocast():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    got = materialized(x)
    assert torch.equal(got, x)
    grad = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], grad)
    single = torch.randn(4, 9, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = materialized(single)
    assert kept.dtype == torch.float32 and torch.equal(kept, single)
    # 2 * 4 * 6 * 10 elements: the product runs over rows of 16, across the image's rows of 10.
    rows_of_16 = torch.randn(2, 4, 6, 10, dtype=torch.float64, generator=generator, requires_grad=True)
    grad = torch.randn(rows_of_16.shape, dtype=torch.float64, generator=generator)
    got = materialized(rows_of_16)
    assert torch.equal(got, rows_of_16) and torch.equal(torch.autograd.grad(got, rows_of_16, grad)[0], grad)


@pytest.mark.parametrize(
    "groups, kernel, stride, padding, bias", [(2, 3, 1, 1, False), (3, 3, 2, 1, True), (6, 1, 1, 0, True), (2, 3, 2, 0, False)]
)
def test_grouped_as_convolutions_equals_grouped_conv2d_with_gradients(groups, kernel, stride, padding, bias):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 11, 9, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(12, 6 // groups, kernel, kernel, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, generator=generator, requires_grad=True) if bias else None
    expected = F.conv2d(x, weight, b, stride, padding, groups=groups)
    got = grouped_as_convolutions(x, weight, b, (stride, stride), (padding, padding), groups)
    assert_same_values_and_gradients(got, expected, [x, weight] + ([b] if bias else []), generator)


def test_only_plain_and_grouped_convolutions_are_converted_and_the_state_dict_stays():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(8, 8, 3, padding="same"),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
    )
    keys = list(model.state_dict())
    use_xla_cpu_convolutions(model)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["XlaCpuConv2d", "XlaCpuGroupedConv2d", "Conv2d", "Conv2d", "Conv2d", "XlaCpuDepthwiseConv2d"]
    assert type(model[1]) is XlaCpuGroupedConv2d and type(model[5]) is XlaCpuDepthwiseConv2d
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(model[0](x), F.conv2d(x, model[0].weight, model[0].bias, 1, 1))  # 50 pixels > 8 channels: conv2d


def test_the_model_has_plain_modules_and_the_adapter_converts_them():
    """RetinaNet is torchvision's modules on every backend; only the XLA:CPU adapter (applied
    where a step is built on XLA:CPU) swaps in the kernels, keeping the state dict."""
    model = RetinaNet(num_classes=3, backbone="resnet18", fpn_channels=32, head_convs=1, backbone_norm="bn", freeze_at=0)
    kinds = {type(m) for m in model.modules()}
    assert XlaCpuConv2d not in kinds and StemMaxPool not in kinds and "XlaCpu" not in repr(model)
    assert type(model.backbone.body.maxpool) is nn.MaxPool2d
    keys = list(model.state_dict())
    assert use_xla_cpu_kernels(model) is model
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is XlaCpuConv2d for m in convs)
    assert type(model.backbone.body.maxpool) is StemMaxPool
    assert list(model.state_dict()) == keys


@pytest.mark.xla
def test_on_cpu_xla_1x1_and_small_outputs_become_a_matmul_and_large_ones_stay_convolutions():
    import torch_xla

    device = torch_xla.device()
    torch.manual_seed(0)
    # 2*4*4 = 32 < 64 pixels: a product; 2*16*16 = 512 pixels: a convolution unless it is 1x1.
    for kernel, padding, size, expect_matmul in ((3, 1, 4, True), (3, 1, 16, False), (1, 0, 16, True)):
        conv = nn.Conv2d(16, 64, kernel, padding=padding)
        conv_xla = XlaCpuConv2d(16, 64, kernel, padding=padding).to(device)
        conv_xla.load_state_dict(conv.state_dict())
        x = torch.randn(2, 16, size, size)
        y = conv_xla(x.to(device))
        hlo = torch_xla._XLAC._get_xla_tensors_hlo([y])
        assert (" dot(" in hlo) is expect_matmul
        assert (" convolution(" in hlo) is not expect_matmul
        torch.testing.assert_close(y.cpu(), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.xla
def test_the_train_step_built_on_xla_cpu_uses_the_cpu_kernels():
    """build_train_step places the model through the runtime: on XLA:CPU its step has layer4's
    convolutions as matrix products and no select-and-scatter; the model built by build_model
    alone stays torchvision's."""
    import torch_xla

    from retinanet_xla.config import load_config
    from retinanet_xla.models import build_model
    from retinanet_xla.training.build import build_train_step
    from retinanet_xla.xla.runtime import Runtime
    from tests.cli_helpers import ROOT, TINY

    config = load_config(ROOT / "configs" / "smoke.yaml", TINY)
    assert not any(isinstance(m, (XlaCpuConv2d, StemMaxPool)) for m in build_model(config).modules())
    runtime = Runtime("xla")
    assert runtime.is_xla_cpu
    step = build_train_step(config, runtime)
    assert isinstance(step.model.backbone.body.maxpool, StemMaxPool)
    assert isinstance(step.model.backbone.body.layer4[1].conv2, XlaCpuConv2d)
    assert type(step.model.backbone.body.layer3[0]).__name__ == "XlaCpuBasicBlock"  # cpu_residuals
    batch = {
        "images": torch.zeros(4, 3, 64, 64, dtype=torch.uint8, device=runtime.device),
        "boxes": torch.tensor([[[4.0, 4.0, 30.0, 30.0]] * 4] * 4, device=runtime.device),
        "labels": torch.zeros(4, 4, dtype=torch.int64, device=runtime.device),
        "crowd": torch.zeros(4, 4, dtype=torch.bool, device=runtime.device),
    }
    outputs = step.trace(batch)  # the traced graph (a call would replay it after the first)
    hlo = torch_xla._XLAC._get_xla_tensors_hlo([outputs["loss"], *step.optimizer.params])
    assert "select-and-scatter" not in hlo
    assert " dot(" in hlo  # layer4 at 2x2 pixels x 4 images < 512 channels: a matrix product
    runtime.sync()  # leave no pending graph
