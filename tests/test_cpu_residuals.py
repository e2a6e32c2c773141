import copy

import pytest
import torch
from torch import nn
from torchvision.models import efficientnet, mobilenetv2, resnet

from retinanet_xla.models.bodies import ClassifierBody
from retinanet_xla.xla.cpu_kernels import use_xla_cpu_kernels
from retinanet_xla.xla.cpu_residuals import RESIDUAL_BLOCKS, MaterializedOutput, use_materialized_residual_blocks


@pytest.mark.parametrize(
    "name, block",
    [("resnet50", resnet.Bottleneck), ("mobilenet_v2", mobilenetv2.InvertedResidual), ("efficientnet_b0", efficientnet.MBConv)],
)
def test_every_residual_block_is_converted_once_and_the_state_dict_stays(name, block):
    body = ClassifierBody(name, norm="bn")
    keys = list(body.state_dict())
    count = sum(type(m) is block for m in body.modules())
    use_materialized_residual_blocks(body)
    use_materialized_residual_blocks(body)  # again: no second layer of conversion
    converted = [m for m in body.modules() if isinstance(m, MaterializedOutput)]
    assert count > 0 and len(converted) == count
    assert all(
        type(m).__name__ == f"XlaCpu{block.__name__}" and type(m).__bases__ == (MaterializedOutput, block) for m in converted
    )
    assert not any(type(m) in RESIDUAL_BLOCKS for m in body.modules())
    assert list(body.state_dict()) == keys


def test_a_converted_resnet_gives_the_same_features_and_gradients_exactly():
    """Materialising each block's output changes no value: ResNet-18's features and every
    parameter's gradient, in float64, are bit for bit those of the unconverted body."""
    torch.manual_seed(0)
    reference = ClassifierBody("resnet18", norm="bn").double().train()
    converted = copy.deepcopy(reference)
    use_materialized_residual_blocks(converted)
    assert isinstance(converted.layer2[1], MaterializedOutput)
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)  # 40 columns: rows of 16 do not follow the image's rows
    results = []
    for body in (reference, converted):
        features = body(x)
        sum((f * torch.linspace(-1, 1, f.shape[-1], dtype=f.dtype)).pow(2).mean() for f in features).backward()
        results.append((features, [p.grad for p in body.parameters()]))
    (expected, expected_grads), (got, got_grads) = results
    for g, e in zip(got + got_grads, expected + expected_grads):
        assert torch.equal(g, e)


def test_the_adapter_materialises_residual_blocks_but_leaves_other_modules():
    model = nn.Sequential(resnet.BasicBlock(8, 8), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    use_xla_cpu_kernels(model)
    assert type(model[0]).__name__ == "XlaCpuBasicBlock"
    assert type(model[1]).__name__ == "XlaCpuConv2d" and type(model[2]) is nn.ReLU
