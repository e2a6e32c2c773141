import copy

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


@pytest.mark.xla
def test_convnext_on_xla_cpu_gives_eager_gradients_and_compiles_once():
    """ConvNeXt-T's body on XLA:CPU through the adapter (materialised depthwise results,
    row-product weight gradients at 64x64 / 4 = 16 columns, linear layers with a bias column):
    eager's loss and gradients, and the second step compiles nothing. Stochastic depth is off:
    its random draws differ between the two backends."""
    import torch_xla
    import torch_xla.debug.metrics as metrics
    from torchvision.ops import StochasticDepth

    device = torch_xla.device()
    torch.manual_seed(0)
    eager = ClassifierBody("convnext_tiny").train()
    for module in eager.modules():
        if isinstance(module, StochasticDepth):
            module.p = 0.0
        if hasattr(module, "layer_scale"):  # 1e-6 at initialisation: every block's gradients would be ~0
            module.layer_scale.data.fill_(1.0)
    on_xla = use_xla_cpu_kernels(copy.deepcopy(eager)).to(device)
    x = torch.randn(2, 3, 64, 64)

    def step(body, images):
        body.zero_grad(set_to_none=True)
        loss = sum(f.pow(2).mean() for f in body(images))
        loss.backward()
        return loss

    expected = step(eager, x)
    compiles = []
    for _ in range(2):
        got = step(on_xla, x.to(device))
        torch_xla.sync()
        compiles.append(metrics.metric_data("CompileTime")[0])
    assert compiles[1] == compiles[0]
    torch.testing.assert_close(got.cpu(), expected.detach(), rtol=1e-5, atol=0)
    for (name, p_xla), p_eager in zip(on_xla.named_parameters(), eager.parameters()):
        scale = float(p_eager.grad.abs().max())
        torch.testing.assert_close(p_xla.grad.cpu(), p_eager.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)
