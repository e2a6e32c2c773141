"""XLA:CPU's convolutions as matrix products (device/xla/cpu_convolution.py): the convolution's
values and gradients exactly, which modules the conversion takes, and that the runtime applies it
on the CPU client only where the setting says so."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retinanet_xla.config import load_config
from retinanet_xla.device.xla.cpu_convolution import XlaCpuConv2d, convolution_as_matmul, use_matmul_convolutions
from retinanet_xla.models import build_model
from tests.cli_helpers import ROOT, TINY


@pytest.mark.parametrize(
    "kernel, stride, padding, bias",
    [(3, 1, 1, True), (3, 2, 1, False), (1, 1, 0, True), (1, 2, 0, False), (3, 1, 0, True), (3, 2, 0, True), (7, 2, 3, False)],
)
def test_convolution_as_matmul_equals_conv2d_with_gradients(kernel, stride, padding, bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 9, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(6, 5, kernel, kernel, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True) if bias else None
    inputs = [x, weight] + ([b] if bias else [])
    expected = F.conv2d(x, weight, b, stride, padding)
    got = convolution_as_matmul(x, weight, b, (stride, stride), (padding, padding))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    for g_got, g_expected in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(g_got, g_expected, rtol=0, atol=1e-12)


def test_plain_convolutions_are_converted_and_the_rest_left_alone():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        nn.Conv2d(8, 8, 3, padding="same"),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(8, 16, 1),
    )
    state = {key: value.clone() for key, value in model.state_dict().items()}
    assert use_matmul_convolutions(model) is model
    assert [type(m).__name__ for m in model] == ["XlaCpuConv2d", "Conv2d", "Conv2d", "Conv2d", "Conv2d", "XlaCpuConv2d"]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())


def test_a_converted_retinanet_computes_what_the_built_one_does():
    """The smoke model at 64x64, batch 2: its last stage's 3x3 convolutions (2x2 pixels, 512
    channels) and every 1x1 run as products; the features agree to rounding."""
    config = load_config(ROOT / "configs" / "smoke.yaml", [*TINY, "model.backbone.weights=null"])
    torch.manual_seed(0)
    built = build_model(config).eval()
    converted = use_matmul_convolutions(build_model(config).eval())
    converted.load_state_dict(built.state_dict())
    convs = [m for m in converted.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is XlaCpuConv2d for m in convs)
    assert not any(type(m) is XlaCpuConv2d for m in build_model(config).modules())  # built plain
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for got, expected in zip(converted.backbone(images), built.backbone(images), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.xla
@pytest.mark.parametrize("enabled", [True, False])
def test_the_xla_runtime_converts_where_it_places_the_model_on_the_cpu_client(enabled):
    from retinanet_xla.device.xla.runtime import XlaRuntime

    config = load_config(ROOT / "configs" / "smoke.yaml", [*TINY, f"runtime.xla_cpu_kernels={str(enabled).lower()}"])
    runtime = XlaRuntime(config.runtime)
    model = runtime.place_model(build_model(config))
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert kinds == ({XlaCpuConv2d} if enabled else {nn.Conv2d})
    assert next(model.parameters()).device.type == "xla"
