import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retinanet_xla.models.bodies import ClassifierBody
from retinanet_xla.xla.cpu_convolution import XlaCpuDepthwiseConv2d
from retinanet_xla.xla.cpu_kernels import use_xla_cpu_kernels
from retinanet_xla.xla.cpu_linear import XlaCpuLinear, linear_with_bias_column, use_xla_cpu_linears
from tests.test_convolution import assert_same_values_and_gradients


@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 4, 5)])
def test_linear_with_bias_column_equals_linear_with_gradients(shape):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(shape, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(6, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True)
    got = linear_with_bias_column(x, weight, bias)
    assert got.shape == (*shape[:-1], 6)
    assert_same_values_and_gradients(got, F.linear(x, weight, bias), [x, weight, bias], generator)


def test_linear_with_bias_column_under_autocast_computes_in_bfloat16_like_linear():
    generator = torch.Generator().manual_seed(4)
    x, weight, bias = (torch.randn(s, generator=generator) for s in ((8, 16), (4, 16), (4,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = linear_with_bias_column(x, weight, bias), F.linear(x, weight, bias)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_only_linears_with_a_bias_are_converted_and_the_state_dict_stays():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8, bias=False), nn.GELU())
    keys = list(model.state_dict())
    use_xla_cpu_linears(model)
    assert [type(m) for m in model] == [XlaCpuLinear, nn.Linear, nn.GELU]
    assert list(model.state_dict()) == keys


def test_convnext_converted_for_xla_cpu_matches_torchvision_forward_and_backward():
    """ConvNeXt's blocks (7x7 depthwise, channels-last LayerNorm and MLP, layer scale) through
    the XLA:CPU adapter give torchvision's features and gradients, in float64."""
    torch.manual_seed(0)
    reference = ClassifierBody("convnext_tiny").double().eval()
    converted = ClassifierBody("convnext_tiny").double().eval()
    converted.load_state_dict(reference.state_dict())
    use_xla_cpu_kernels(converted)
    kinds = {type(m) for m in converted.modules()}
    assert {XlaCpuLinear, XlaCpuDepthwiseConv2d} <= kinds and nn.Linear not in kinds
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    outputs = []
    for body in (reference, converted):
        features = body(x)
        sum(f.pow(2).mean() for f in features).backward()
        grads = [p.grad for p in body.parameters()]
        outputs.append((features, grads))
    (expected, expected_grads), (got, got_grads) = outputs
    for g, e in zip(got + got_grads, expected + expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
