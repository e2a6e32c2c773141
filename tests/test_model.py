import copy
from functools import partial

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet34
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.models.detection.retinanet import RetinaNetHead as TorchvisionHead
from torchvision.ops.misc import FrozenBatchNorm2d

from retinanet_xla import RetinaNet
from retinanet_xla.models import CrossReplicaBatchNorm2d, RetinaNetHead, set_replica_averaging


@pytest.fixture(scope="module")
def torchvision_model():
    torch.manual_seed(0)
    return retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval()


def test_parameter_names_and_shapes_equal_torchvision(torchvision_model):
    # torchvision without weights builds trainable BatchNorm everywhere (nothing frozen); ours
    # turns frozen stages into FrozenBatchNorm (buffers, no parameters), so compare unfrozen.
    unfrozen = RetinaNet(backbone_norm="bn", freeze_at=0)
    assert {n: p.shape for n, p in unfrozen.named_parameters()} == {n: p.shape for n, p in torchvision_model.named_parameters()}
    # The default frozen-BN model (torchvision's pretrained layout) has the same state-dict entries
    # except num_batches_tracked, which FrozenBatchNorm2d does not keep.
    reference = {k: v.shape for k, v in torchvision_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert {k: v.shape for k, v in RetinaNet().state_dict().items()} == reference


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_torchvision_state_dict_loads_strictly_and_outputs_match(torchvision_model, norm):
    ours = RetinaNet(backbone_norm=norm).eval()
    ours.load_state_dict(torchvision_model.state_dict(), strict=True)
    x = torch.randn(2, 3, 160, 128)
    with torch.no_grad():
        expected = torchvision_model.head(list(torchvision_model.backbone(x).values()))
        actual = ours(x)
    for key in ("cls_logits", "bbox_regression"):
        assert actual[key].shape == expected[key].shape
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-4)
    # ... and ours loads back into torchvision.
    torchvision_copy = retinanet_resnet50_fpn(weights=None, weights_backbone=None)
    torchvision_copy.load_state_dict(ours.state_dict(), strict=False)
    missing = set(torchvision_copy.state_dict()) - set(ours.state_dict())
    assert all(k.endswith("num_batches_tracked") for k in missing)


@pytest.mark.parametrize("image_size", [(64, 64), (100, 75), (33, 129)])
def test_feature_sizes_and_anchor_count_match_the_network(image_size):
    model = RetinaNet(num_classes=2, backbone="resnet18", fpn_channels=32, head_convs=1).eval()
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, *image_size))
        outputs = model(torch.zeros(1, 3, *image_size))
    assert [tuple(f.shape[-2:]) for f in features] == list(model.feature_sizes(image_size))
    assert [f.shape[1] for f in features] == [32] * 5
    assert outputs["cls_logits"].shape == (1, len(model.anchors(image_size)), 2)


def test_classification_prior_and_regression_init():
    model = RetinaNet(num_classes=4, backbone="resnet18", fpn_channels=32, head_convs=2).eval()
    with torch.no_grad():
        probabilities = torch.sigmoid(model(torch.zeros(1, 3, 64, 64))["cls_logits"])
    assert probabilities.mean().item() == pytest.approx(0.01, rel=0.05)


def test_freeze_at_freezes_stem_and_stages_with_frozen_batch_norm():
    model = RetinaNet(backbone="resnet18", fpn_channels=32, head_convs=1, backbone_norm="bn", freeze_at=2)
    body = model.backbone.body
    assert not body.conv1.weight.requires_grad and not any(p.requires_grad for p in body.layer1.parameters())
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer1[0].bn1, FrozenBatchNorm2d)
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert type(body.layer2[0].bn1) is nn.BatchNorm2d
    unfrozen = RetinaNet(backbone="resnet18", fpn_channels=32, head_convs=1, backbone_norm="bn", freeze_at=0).backbone.body
    assert unfrozen.conv1.weight.requires_grad and type(unfrozen.bn1) is nn.BatchNorm2d


def test_group_norm_head_has_torchvision_v2_names():
    ours = RetinaNetHead(64, 9, 5, num_convs=2, norm="gn")
    reference = TorchvisionHead(64, 9, 5, norm_layer=partial(nn.GroupNorm, 32))
    reference.classification_head.conv = reference.classification_head.conv[:2]
    reference.regression_head.conv = reference.regression_head.conv[:2]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_imagenet_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(3)
    classifier = resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(classifier.state_dict(), path)
    model = RetinaNet(backbone="resnet18", fpn_channels=32, head_convs=1, backbone_weights=path)
    torch.testing.assert_close(model.backbone.body.layer3[1].conv2.weight, classifier.layer3[1].conv2.weight)
    torch.testing.assert_close(model.backbone.body.bn1.running_var, classifier.bn1.running_var)


def test_wrong_weights_file_gives_one_line_error(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(resnet34().state_dict(), path)
    with pytest.raises(ValueError) as error:
        RetinaNet(backbone="resnet18", fpn_channels=32, head_convs=1, backbone_weights=path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "resnet18" in message and "unexpected layer1.2" in message
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a PyTorch state dict"):
        RetinaNet(backbone="resnet18", fpn_channels=32, head_convs=1, backbone_weights=garbage)
    with pytest.raises(ValueError, match="does not exist"):
        RetinaNet(backbone="resnet18", fpn_channels=32, head_convs=1, backbone_weights=tmp_path / "missing.pth")


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_weights_file_that_would_run_code_is_refused_in_one_line_without_advice_to_run_it(tmp_path, capsys):
    path = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": _RunsCode()}, path)
    with pytest.raises(ValueError) as error:
        RetinaNet(backbone="resnet18", fpn_channels=32, head_convs=1, backbone_weights=path)
    assert str(error.value) == (
        f"backbone weights file {path} is not a PyTorch state dict of tensors "
        "(it names the Python object print, which is never loaded)"
    )
    assert "this ran" not in capsys.readouterr().out


def test_cross_replica_batch_norm_uses_global_statistics():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 3 + 1
    reference = nn.BatchNorm2d(8).train()
    expected = reference(x)
    halves = x[:2], x[2:]
    moments = [torch.stack([h.mean(dim=(0, 2, 3)), (h * h).mean(dim=(0, 2, 3))]) for h in halves]
    layer = CrossReplicaBatchNorm2d(8).train()
    layer.average_across_replicas, layer.num_replicas = (lambda local: (moments[0] + moments[1]) / 2), 2
    torch.testing.assert_close(layer(halves[0]), expected[:2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    # Unbiased with the global count (2 replicas x 50 values per channel), as BatchNorm over 100.
    torch.testing.assert_close(layer.running_var, reference.running_var, rtol=1e-5, atol=1e-5)
    plain = CrossReplicaBatchNorm2d(8).train()
    torch.testing.assert_close(plain(x), expected)  # one replica: exactly BatchNorm2d


def test_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backbone must be one of resnet18, resnet34, "):
        RetinaNet(backbone="resnet42")
    with pytest.raises(ValueError, match="norm must be one of"):
        RetinaNet(backbone="resnet18", backbone_norm="layer")
    with pytest.raises(ValueError, match="freeze_at"):
        RetinaNet(backbone="resnet18", freeze_at=7)


@pytest.mark.parametrize("norm", ["frozen_bn", "bn", "cross_replica_bn", "gn"])
@pytest.mark.parametrize("head_norm", ["none", "gn"])
def test_bf16_autocast_keeps_statistics_float32_and_outputs_close(norm, head_norm):
    """Under bf16 autocast every normalisation computes its statistics in float32 and keeps its
    buffers float32; the outputs stay within bfloat16's rounding of the float32 forward."""
    torch.manual_seed(0)
    model = RetinaNet(
        num_classes=3, backbone="resnet18", fpn_channels=32, head_convs=1, head_norm=head_norm, backbone_norm=norm, freeze_at=0
    ).train()
    if norm == "cross_replica_bn":
        set_replica_averaging(model, lambda moments: moments * 1.0, 1)  # the replica path, one replica
    images = model.normalize(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    reference = copy.deepcopy(model)
    expected = reference(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images)
    for key in ("cls_logits", "bbox_regression"):
        # bfloat16 rounds to 2^-9 relative at each of about 20 layers; BatchNorm over the 8
        # values per channel of layer4 (batch 2, 2x2) magnifies it. Measured 0.2% (logits) and
        # 0.9-4% (box regression, the most with trained BatchNorm) of the outputs' norm.
        error = float(((outputs[key].float() - expected[key]).norm() / expected[key].norm()).detach())
        assert error < 0.1, (key, error)
    buffers = {name: value for name, value in model.named_buffers() if value.is_floating_point()}
    assert buffers and all(value.dtype == torch.float32 and torch.isfinite(value).all() for value in buffers.values())
    for name, value in reference.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(buffers[name], value, rtol=2e-2, atol=2e-2)
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())


def test_torchvision_v2_loads_with_p6_from_c5_and_group_norm_heads_and_outputs_match():
    """retinanet_resnet50_fpn_v2: P6 from C5 (``model.p6_from: c5``) and GroupNorm in both head
    towers (``model.head.norm: gn``); the same outputs from the same weights."""
    from torchvision.models.detection import retinanet_resnet50_fpn_v2

    torch.manual_seed(0)
    reference = retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None).eval()
    ours = RetinaNet(backbone_norm="bn", head_norm="gn", p6_from="c5").eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 160, 128)
    with torch.no_grad():
        expected = reference.head(list(reference.backbone(x).values()))
        actual = ours(x)
    for key in ("cls_logits", "bbox_regression"):
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="p6_from must be p5 or c5"):
        RetinaNet(backbone="resnet18", p6_from="p4")
