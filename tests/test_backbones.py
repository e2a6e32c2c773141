"""Every listed torchvision classifier as the RetinaNet body: five levels at strides 8-128,
ImageNet state dicts from a file, freezing, and one-line errors for a wrong file."""

import pytest
import torch
from torchvision import models

from retinanet_xla.models import BACKBONES, RetinaNet
from retinanet_xla.models.bodies import ClassifierBody

LISTED = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2",
    "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "regnet_y_400mf", "regnet_y_3_2gf", "convnext_tiny",
)  # fmt: skip
# C3-C5 channels of each network, as torchvision builds it.
BODY_CHANNELS = {
    "resnet18": [128, 256, 512],
    "resnet50": [512, 1024, 2048],
    "mobilenet_v2": [32, 96, 1280],
    "efficientnet_b0": [40, 112, 1280],
    "regnet_y_400mf": [104, 208, 440],
    "convnext_tiny": [192, 384, 768],
}


def test_the_listed_networks_are_the_choices():
    assert set(BACKBONES) == set(LISTED)


@pytest.mark.parametrize("name", LISTED)
def test_every_backbone_gives_five_levels_at_strides_8_to_128(name, tmp_path):
    torch.manual_seed(0)
    # Weights of a randomly initialised torchvision classifier, saved as torchvision publishes them.
    classifier = getattr(models, name)(weights=None)
    weights = tmp_path / f"{name}.pth"
    torch.save(classifier.state_dict(), weights)
    model = RetinaNet(num_classes=3, backbone=name, fpn_channels=24, head_convs=1, backbone_weights=weights, freeze_at=0).eval()
    body = model.backbone.body
    if name in BODY_CHANNELS:
        assert body.out_channels == BODY_CHANNELS[name]
    # The file's tensors are now the body's (classifier keys ignored).
    own = body.state_dict()
    for key, value in classifier.state_dict().items():
        if key in own and value.is_floating_point():
            torch.testing.assert_close(own[key], value, msg=key)
    with torch.no_grad():
        features = model.backbone(torch.rand(1, 3, 256, 256))
    assert [tuple(f.shape) for f in features] == [(1, 24, 256 // s, 256 // s) for s in (8, 16, 32, 64, 128)]
    assert [tuple(f.shape[-2:]) for f in features] == list(model.feature_sizes((256, 256)))


def test_a_weights_file_for_another_network_is_refused_in_one_line(tmp_path):
    weights = tmp_path / "resnet18.pth"
    torch.save(models.resnet18(weights=None).state_dict(), weights)
    with pytest.raises(ValueError) as error:
        RetinaNet(backbone="mobilenet_v2", fpn_channels=24, head_convs=1, backbone_weights=weights)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"backbone weights file {weights} does not fit mobilenet_v2: missing features.0.0.weight")
    assert "unexpected conv1.weight" in message


def test_freeze_at_freezes_the_stem_and_the_early_stages_of_any_family():
    body = ClassifierBody("mobilenet_v2", norm="bn")
    body.freeze(3)  # stem, the stride-2/4 stage and the stride-8 stage
    frozen = {path for path, stage in zip(body.block_paths, body.block_stages) if stage < 3}
    assert "features.0" in frozen and len(frozen) < len(body.block_paths)
    for path in body.block_paths:
        block = body.get_submodule(path)
        trainable = any(p.requires_grad for p in block.parameters())
        assert trainable == (path not in frozen), path
        has_batch_norm = any(type(m) is torch.nn.BatchNorm2d for m in block.modules())
        assert has_batch_norm == (path not in frozen), path  # frozen stages: FrozenBatchNorm2d


def test_resnet_freeze_at_matches_detectron2():
    body = ClassifierBody("resnet18", norm="bn")
    body.freeze(2)
    assert [p for p, s in zip(body.block_paths, body.block_stages) if s < 2] == ["conv1", "bn1", "relu", "maxpool", "layer1"]


@pytest.mark.parametrize("norm", ["frozen_bn", "cross_replica_bn", "gn"])
def test_normalisation_choices_apply_to_other_families(norm):
    body = ClassifierBody("efficientnet_b0", norm=norm)
    kinds = {type(m).__name__ for m in body.modules()}
    assert "BatchNorm2d" not in kinds
    expected = {"frozen_bn": "FrozenBatchNorm2d", "cross_replica_bn": "CrossReplicaBatchNorm2d", "gn": "GroupNorm"}[norm]
    assert expected in kinds


def test_convnext_keeps_its_layer_norm_and_rounds_sizes_down():
    model = RetinaNet(num_classes=2, backbone="convnext_tiny", fpn_channels=16, head_convs=1, backbone_norm="frozen_bn").eval()
    assert not any("BatchNorm" in type(m).__name__ for m in model.backbone.body.modules())
    with torch.no_grad():
        features = model.backbone(torch.rand(1, 3, 200, 200))  # not a multiple of 32
    assert [tuple(f.shape[-2:]) for f in features] == list(model.feature_sizes((200, 200)))
