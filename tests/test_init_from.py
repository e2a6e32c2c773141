"""Starting from a trained detector (``model.init_from``), also one with other classes."""

import math

import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn

from retinanet_xla import RetinaNet
from retinanet_xla.errors import ConfigError
from retinanet_xla.training.init_from import CLASS_OUTPUT, initialize_from

TARGET = ["pedestrian", "car", "dog"]
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "retinanet_resnet50_fpn_coco.pth"
    state = retinanet_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    torch.save(state, path)
    return path, state


def test_a_torchvision_coco_file_loads_into_three_classes_with_the_prior_on_the_output(torchvision_file):
    path, state = torchvision_file
    model = RetinaNet(num_classes=3)
    report = initialize_from(model, path, TARGET, {}, num_anchors=9)
    ours = model.state_dict()
    for name, value in ours.items():
        if name.startswith(CLASS_OUTPUT):
            continue
        assert torch.equal(value, state[name]), name
    assert ours[f"{CLASS_OUTPUT}.bias"].shape == (9 * 3,)
    assert torch.allclose(ours[f"{CLASS_OUTPUT}.bias"], torch.full((27,), PRIOR_BIAS))
    assert report.loaded == len(ours) - 2 and len(report.reinitialised) == 2
    # The file's own 91-class output layer, and the BatchNorm step counters a randomly
    # initialised torchvision model has (ours freezes its BatchNorm, as torchvision's COCO one).
    assert report.unused == 2 + sum(name.endswith("num_batches_tracked") for name in state)
    assert report.line().startswith(f"init_from {path}: loaded {len(ours) - 2} tensors, re-initialised 2 (")


def test_a_class_map_carries_the_named_rows_by_name_or_id(torchvision_file):
    path, state = torchvision_file
    model = RetinaNet(num_classes=3)
    report = initialize_from(model, path, TARGET, {"pedestrian": "person", "dog": "18"}, num_anchors=9)
    weight, bias = model.state_dict()[f"{CLASS_OUTPUT}.weight"], model.state_dict()[f"{CLASS_OUTPUT}.bias"]
    source_weight, source_bias = state[f"{CLASS_OUTPUT}.weight"], state[f"{CLASS_OUTPUT}.bias"]
    for anchor in range(9):
        assert torch.equal(weight[anchor * 3 + 0], source_weight[anchor * 91 + 1])  # person is COCO id 1
        assert torch.equal(bias[anchor * 3 + 2], source_bias[anchor * 91 + 18])  # dog is COCO id 18
        assert bias[anchor * 3 + 1] == pytest.approx(PRIOR_BIAS)  # car: no trained row asked for
    assert report.carried_classes == [("pedestrian", "person"), ("dog", "dog")]
    with pytest.raises(ConfigError, match=r"'unicorn' is neither a class name nor a category id of"):
        initialize_from(RetinaNet(num_classes=3), path, TARGET, {"car": "unicorn"}, num_anchors=9)
    with pytest.raises(ConfigError, match=r"'truck' is not a class of the training set \(pedestrian, car, dog\)"):
        initialize_from(RetinaNet(num_classes=3), path, TARGET, {"truck": "truck"}, num_anchors=9)


def test_a_file_with_another_backbone_names_the_first_mismatch(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(RetinaNet(num_classes=3, backbone="resnet18").state_dict(), path)
    with pytest.raises(ConfigError) as error:
        initialize_from(RetinaNet(num_classes=3), path, TARGET, {}, num_anchors=9)
    assert str(error.value) == (
        f"model.init_from {path}: backbone.body.layer1.0.conv1.weight is shape (64, 64, 3, 3) in the file but "
        "(64, 64, 1, 1) in this model (another backbone, FPN width or head depth?)"
    )


def test_the_shipped_fine_tuning_config_builds_torchvisions_model(torchvision_file):
    """configs/finetune-coco.yaml: every tensor of torchvision's COCO file but the class output
    loads, and its anchors are torchvision's, so the trained box regression means the same."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchors

    from retinanet_xla.config import load_config
    from retinanet_xla.models import build_model
    from tests.cli_helpers import ROOT

    path, state = torchvision_file
    config = load_config(ROOT / "configs" / "finetune-coco.yaml", [f"model.init_from={path}"])
    model = build_model(config)
    report = initialize_from(model, path, TARGET, config.model.init_class_map | {"dog": "dog"}, num_anchors=9)
    assert report.loaded == len(model.state_dict()) - 2 and len(report.reinitialised) == 2
    assert [target for target, _ in report.carried_classes] == ["pedestrian", "car", "dog"]
    sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in (32, 64, 128, 256, 512))
    reference = TorchvisionAnchors(sizes, ((0.5, 1.0, 2.0),) * 5)
    ours = model.anchors((640, 640))
    grids = [torch.zeros(1, 1, h, w) for h, w in model.feature_sizes((640, 640))]
    from torchvision.models.detection.image_list import ImageList

    theirs = reference(ImageList(torch.zeros(1, 3, 640, 640), [(640, 640)]), grids)[0]
    assert torch.equal(ours, theirs)


def test_torchvisions_v2_file_loads_with_its_architecture_and_is_refused_without(tmp_path):
    """v2 computes P6 from C5 and normalises both head towers (docs/models.md)."""
    from torchvision.models.detection import retinanet_resnet50_fpn_v2

    path = tmp_path / "v2.pth"
    state = retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict()
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"backbone.fpn.extra_blocks.p6.weight is shape \(256, 2048, 3, 3\) in the file"):
        initialize_from(RetinaNet(num_classes=3, head_norm="gn"), path, TARGET, {}, num_anchors=9)
    model = RetinaNet(num_classes=3, head_norm="gn", p6_from="c5")
    report = initialize_from(model, path, TARGET, {"car": "car"}, num_anchors=9)
    assert report.loaded == len(model.state_dict()) - 2 and report.carried_classes == [("car", "car")]
    assert torch.equal(model.state_dict()["backbone.fpn.extra_blocks.p6.weight"], state["backbone.fpn.extra_blocks.p6.weight"])
