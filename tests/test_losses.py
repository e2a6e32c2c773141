import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as torchvision_focal_loss

from retinanet_xla.ops import AnchorMatcher, BoxCoder, DetectionLoss, sigmoid_focal_loss

ANCHORS = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 4.5], [60, 60, 70, 70.0]])
NUM_CLASSES = 3


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.25, 1.5), (-1.0, 2.0)])
def test_focal_loss_equals_torchvision(alpha, gamma):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 100, 5, generator=generator) * 3
    targets = (torch.rand(4, 100, 5, generator=generator) > 0.8).float()
    expected = torchvision_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha, gamma), expected)


def outputs_for(batch, generator=None, scale=1.0):
    generator = generator or torch.Generator().manual_seed(0)
    return {
        "cls_logits": torch.randn(batch, len(ANCHORS), NUM_CLASSES, generator=generator) * scale,
        "bbox_regression": torch.randn(batch, len(ANCHORS), 4, generator=generator) * 0.1 * scale,
    }


def targets(boxes_per_image, max_boxes=3):
    boxes = torch.zeros(len(boxes_per_image), max_boxes, 4)
    labels = torch.full((len(boxes_per_image), max_boxes), -1)
    for image, entries in enumerate(boxes_per_image):
        for slot, (box, label) in enumerate(entries):
            boxes[image, slot] = torch.tensor(box, dtype=torch.float32)
            labels[image, slot] = label
    return boxes, labels, torch.zeros_like(labels, dtype=torch.bool)


def test_loss_equals_hand_computation():
    # Anchor 0 is foreground (class 1, exact box), 2 ignored (IoU 0.45), 1 and 3 background.
    outputs = outputs_for(1)
    boxes, labels, crowd = targets([[([0, 0, 10, 10], 1)]])
    loss = DetectionLoss(
        NUM_CLASSES, matcher=AnchorMatcher(0.5, 0.4), box_loss="smooth_l1", box_loss_beta=0.1, box_loss_weight=2.0
    )
    result = loss(outputs, ANCHORS, boxes, labels, crowd)

    cls_targets = torch.zeros(len(ANCHORS), NUM_CLASSES)
    cls_targets[0, 1] = 1
    per_anchor = torchvision_focal_loss(outputs["cls_logits"][0], cls_targets, reduction="none").sum(dim=1)
    expected_cls = per_anchor[[0, 1, 3]].sum() / 1.0
    expected_box = F.smooth_l1_loss(outputs["bbox_regression"][0, 0], torch.zeros(4), beta=0.1, reduction="sum")
    torch.testing.assert_close(result["cls_loss"], expected_cls)
    torch.testing.assert_close(result["box_loss"], expected_box)
    torch.testing.assert_close(result["loss"], expected_cls + 2.0 * expected_box)
    assert result["num_foreground"].item() == 1 and result["num_background"].item() == 2


def test_ignored_anchors_contribute_nothing():
    boxes, labels, crowd = targets([[([0, 0, 10, 10], 1)]])
    loss = DetectionLoss(NUM_CLASSES, matcher=AnchorMatcher(0.5, 0.4))
    outputs = outputs_for(1)
    changed = {k: v.clone() for k, v in outputs.items()}
    changed["cls_logits"][0, 2] = 50.0  # anchor 2 is ignored
    changed["bbox_regression"][0, 2] = 50.0
    torch.testing.assert_close(
        loss(outputs, ANCHORS, boxes, labels, crowd)["loss"], loss(changed, ANCHORS, boxes, labels, crowd)["loss"]
    )


def test_empty_images_give_zero_box_loss_and_finite_class_loss():
    outputs = outputs_for(2)
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    boxes, labels, crowd = targets([[], []])
    result = DetectionLoss(NUM_CLASSES)(outputs, ANCHORS, boxes, labels, crowd)
    assert result["box_loss"].item() == 0.0
    assert math.isfinite(result["cls_loss"].item()) and result["cls_loss"].item() > 0
    result["loss"].backward()
    assert torch.isfinite(outputs["cls_logits"].grad).all() and (outputs["bbox_regression"].grad == 0).all()


def test_normaliser_is_the_global_number_of_positives():
    # Two images, three foreground anchors in all: the sum over the batch divides by 3, not per image.
    boxes, labels, crowd = targets([[([0, 0, 10, 10], 0), ([20, 20, 30, 30], 2)], [([60, 60, 70, 70], 1)]])
    outputs = outputs_for(2)
    result = DetectionLoss(NUM_CLASSES, box_loss="l1")(outputs, ANCHORS, boxes, labels, crowd)
    assert result["num_foreground"].item() == 3
    expected_box = (outputs["bbox_regression"][0, :2].abs().sum() + outputs["bbox_regression"][1, 3].abs().sum()) / 3
    torch.testing.assert_close(result["box_loss"], expected_box)
    # With a replica average that reports twice the positives, the loss halves.
    doubled = DetectionLoss(NUM_CLASSES, box_loss="l1", average_across_replicas=lambda t: t * 2)(
        outputs, ANCHORS, boxes, labels, crowd
    )
    torch.testing.assert_close(doubled["box_loss"], expected_box / 2)


def test_huber_is_beta_times_smooth_l1_and_giou_is_zero_for_perfect_boxes():
    boxes, labels, crowd = targets([[([0, 0, 10, 10], 1), ([20, 20, 30, 30], 0)]])
    outputs = outputs_for(1)
    smooth = DetectionLoss(NUM_CLASSES, box_loss="smooth_l1", box_loss_beta=0.1)(outputs, ANCHORS, boxes, labels, crowd)
    huber = DetectionLoss(NUM_CLASSES, box_loss="huber", box_loss_beta=0.1)(outputs, ANCHORS, boxes, labels, crowd)
    torch.testing.assert_close(huber["box_loss"], 0.1 * smooth["box_loss"])
    perfect = {"cls_logits": outputs["cls_logits"], "bbox_regression": torch.zeros(1, len(ANCHORS), 4)}
    giou = DetectionLoss(NUM_CLASSES, box_loss="giou")(perfect, ANCHORS, boxes, labels, crowd)
    assert giou["box_loss"].abs().item() < 1e-6
    assert DetectionLoss(NUM_CLASSES, box_loss="giou")(outputs, ANCHORS, boxes, labels, crowd)["box_loss"].item() > 0


def test_box_targets_use_the_coder_weights():
    boxes, labels, crowd = targets([[([0, 0, 10, 10], 1)]])
    shifted = torch.tensor([[[1.0, 0, 11, 10]]])  # anchor 0 vs a box shifted by 1 px: dx = 0.1
    outputs = {"cls_logits": torch.zeros(1, len(ANCHORS), NUM_CLASSES), "bbox_regression": torch.zeros(1, len(ANCHORS), 4)}
    loss = DetectionLoss(NUM_CLASSES, box_coder=BoxCoder((10, 10, 5, 5)), box_loss="l1")
    result = loss(outputs, ANCHORS, shifted, labels, crowd)
    torch.testing.assert_close(result["box_loss"], torch.tensor(1.0))  # 10 * 0.1


def test_moving_average_normaliser():
    boxes, labels, crowd = targets([[([0, 0, 10, 10], 1), ([20, 20, 30, 30], 0)]])
    loss = DetectionLoss(NUM_CLASSES, normalizer_momentum=0.9, box_loss="l1")
    outputs = outputs_for(1)
    result = loss(outputs, ANCHORS, boxes, labels, crowd)
    ema = 0.9 * 100 + 0.1 * 2
    assert loss.normalizer_ema.item() == pytest.approx(ema)
    expected = (outputs["bbox_regression"][0, :2].abs().sum()) / ema
    torch.testing.assert_close(result["box_loss"], expected)
    loss.eval()
    loss(outputs, ANCHORS, boxes, labels, crowd)
    assert loss.normalizer_ema.item() == pytest.approx(ema)  # evaluation does not move it


def test_loss_rejects_bad_options():
    with pytest.raises(ValueError, match="box_loss must be one of"):
        DetectionLoss(NUM_CLASSES, box_loss="mse")
    with pytest.raises(ValueError, match="huber"):
        DetectionLoss(NUM_CLASSES, box_loss="huber", box_loss_beta=0.0)
