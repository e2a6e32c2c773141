import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retinanet_xla.models import ClassifierBody
from retinanet_xla.xla.cpu_pooling import StemMaxPool, is_stem_max_pool, separable_max_pool_3x3_stride_2, use_separable_stem_pools

SHAPES = [(2, 3, 16, 16), (2, 3, 15, 17), (1, 2, 7, 6), (2, 4, 1, 1), (2, 4, 2, 3)]


def _tied_input(shape, seed=0):
    """Post-ReLU values rounded to one decimal: many zeros and many tied maxima, where the
    routing of the gradient is decided by the tie-break."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).relu().round(decimals=1)


def _integer_grad(shape, seed=1):
    # Small integers add exactly in float32 whatever the order, so gradients compare bit for bit.
    return torch.randint(-8, 9, shape, generator=torch.Generator().manual_seed(seed)).float()


def _value_and_grad(pool, x, grad):
    x = x.clone().requires_grad_()
    y = pool(x)
    (grad_x,) = torch.autograd.grad(y, x, grad)
    return y.detach(), grad_x


@pytest.mark.parametrize("shape", SHAPES)
def test_separable_pool_equals_max_pool2d_values_and_gradient_routing(shape):
    x = _tied_input(shape)
    grad = _integer_grad(F.max_pool2d(x, 3, 2, 1).shape)
    expected_y, expected_grad = _value_and_grad(lambda t: F.max_pool2d(t, 3, 2, 1), x, grad)
    y, grad_x = _value_and_grad(separable_max_pool_3x3_stride_2, x, grad)
    assert torch.equal(y, expected_y)
    assert torch.equal(grad_x, expected_grad)


def test_separable_pool_gradient_matches_max_pool2d_for_real_valued_gradients():
    x = _tied_input((2, 8, 20, 20))
    grad = torch.randn(2, 8, 10, 10, generator=torch.Generator().manual_seed(2))
    _, expected = _value_and_grad(lambda t: F.max_pool2d(t, 3, 2, 1), x, grad)
    _, got = _value_and_grad(separable_max_pool_3x3_stride_2, x, grad)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_separable_pool_propagates_nan_like_max_pool2d():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 2] = float("nan")
    assert torch.equal(separable_max_pool_3x3_stride_2(x).isnan(), F.max_pool2d(x, 3, 2, 1).isnan())


@pytest.mark.xla
def test_stem_pool_on_xla_avoids_select_and_scatter_and_matches_eager():
    import torch_xla

    device = torch_xla.device()
    x = _tied_input((2, 4, 12, 10))
    grad = _integer_grad((2, 4, 6, 5))
    expected_y, expected_grad = _value_and_grad(lambda t: F.max_pool2d(t, 3, 2, 1), x, grad)
    x_xla = x.to(device).requires_grad_()
    y = StemMaxPool()(x_xla)
    (grad_x,) = torch.autograd.grad(y, x_xla, grad.to(device))
    hlo = torch_xla._XLAC._get_xla_tensors_hlo([grad_x])
    assert "select-and-scatter" not in hlo
    assert "select-and-scatter" in torch_xla._XLAC._get_xla_tensors_hlo(
        list(torch.autograd.grad(F.max_pool2d(x_xla, 3, 2, 1), x_xla, grad.to(device)))
    )  # the native lowering, which the module exists to avoid
    assert torch.equal(y.cpu(), expected_y)
    assert torch.equal(grad_x.cpu(), expected_grad)


def test_only_the_adapter_puts_the_stem_pool_into_a_resnet_body_and_keys_stay():
    from torchvision import models

    body = ClassifierBody("resnet18", norm="bn")
    assert type(body.maxpool) is nn.MaxPool2d
    use_separable_stem_pools(body)
    assert isinstance(body.maxpool, StemMaxPool)
    reference = {k for k in models.resnet18(weights=None).state_dict() if not k.startswith("fc.")}
    assert set(body.state_dict()) == reference


@pytest.mark.parametrize(
    "module, expected",
    [
        (nn.MaxPool2d(3, 2, 1), True),
        (nn.MaxPool2d((3, 3), (2, 2), (1, 1)), True),
        (nn.MaxPool2d(3, 2, 1, ceil_mode=True), False),
        (nn.MaxPool2d(2, 2), False),
        (nn.MaxPool2d(3, 1, 1), False),
        (nn.MaxPool2d(3, 2, 1, dilation=2), False),
        (nn.AvgPool2d(3, 2, 1), False),
    ],
)
def test_only_the_exact_stem_pool_is_replaced(module, expected):
    assert is_stem_max_pool(module) is expected
