import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retinanet_xla.models import RetinaNet
from retinanet_xla.models.convolution import XlaCpuConv2d, convolution_as_matmul, use_xla_cpu_convolutions


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
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    inputs = [x, weight] + ([b] if bias else [])
    for g_got, g_expected in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(g_got, g_expected, rtol=0, atol=1e-12)


def test_only_plain_convolutions_are_converted_and_the_state_dict_stays():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(8, 8, 3, padding="same"),
    )
    keys = list(model.state_dict())
    use_xla_cpu_convolutions(model)
    assert [type(m) is XlaCpuConv2d for m in model] == [True, False, False, False, False]
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(model[0](x), F.conv2d(x, model[0].weight, model[0].bias, 1, 1))  # off XLA: conv2d itself


def test_retinanet_uses_them_everywhere():
    model = RetinaNet(num_classes=3, backbone="resnet18", fpn_channels=32, head_convs=1, backbone_norm="bn", freeze_at=0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is XlaCpuConv2d for m in convs)


@pytest.mark.xla
def test_on_cpu_xla_small_outputs_become_a_matmul_and_large_ones_stay_convolutions():
    import torch_xla

    device = torch_xla.device()
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 64, 3, padding=1)
    use_xla_cpu_convolutions(conv)
    conv_xla = XlaCpuConv2d(16, 64, 3, padding=1).to(device)
    conv_xla.load_state_dict(conv.state_dict())
    for size, expect_matmul in ((4, True), (16, False)):  # 2*4*4 = 32 < 64 pixels; 2*16*16 = 512
        x = torch.randn(2, 16, size, size)
        y = conv_xla(x.to(device))
        hlo = torch_xla._XLAC._get_xla_tensors_hlo([y])
        assert (" dot(" in hlo) is expect_matmul
        assert (" convolution(" in hlo) is not expect_matmul
        torch.testing.assert_close(y.cpu(), conv(x), rtol=1e-5, atol=1e-5)
