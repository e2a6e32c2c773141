import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.ops import box_iou as torchvision_box_iou

from retinanet_xla.ops import AnchorMatcher, BoxCoder, box_iou
from retinanet_xla.ops.matcher import BACKGROUND, FOREGROUND, IGNORE


def random_boxes(n, generator, size=100.0):
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_box_iou_equals_torchvision_and_is_batched():
    generator = torch.Generator().manual_seed(0)
    a, b = random_boxes(7, generator), random_boxes(5, generator)
    torch.testing.assert_close(box_iou(a, b), torchvision_box_iou(a, b))
    batched = box_iou(torch.stack([a, a]), torch.stack([b, b.flip(0)]))
    torch.testing.assert_close(batched[1], torchvision_box_iou(a, b.flip(0)))


def test_box_iou_with_zero_area_padding_is_zero_not_nan():
    iou = box_iou(torch.tensor([[0.0, 0, 10, 10]]), torch.zeros(1, 4))
    assert iou.item() == 0.0


def test_box_coder_round_trip_and_torchvision_encoding():
    generator = torch.Generator().manual_seed(1)
    anchors, boxes = random_boxes(50, generator), random_boxes(50, generator)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        coder = BoxCoder(weights)
        deltas = coder.encode(boxes, anchors)
        torch.testing.assert_close(deltas, TorchvisionBoxCoder(weights).encode_single(boxes, anchors))
        torch.testing.assert_close(coder.decode(deltas, anchors), boxes, rtol=1e-5, atol=1e-4)


def test_box_coder_decode_clamps_huge_scales():
    decoded = BoxCoder().decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    assert torch.isfinite(decoded).all()
    assert decoded[0, 2].item() == pytest.approx(5.0 + 5.0 * 1000 / 16)


def match(anchors, boxes, labels, crowd=None, **kwargs):
    boxes = torch.tensor(boxes, dtype=torch.float32).view(1, -1, 4)
    labels = torch.tensor(labels).view(1, -1)
    crowd = torch.zeros_like(labels, dtype=torch.bool) if crowd is None else torch.tensor(crowd).view(1, -1)
    return AnchorMatcher(**kwargs)(torch.tensor(anchors, dtype=torch.float32), boxes, labels, crowd)


ANCHORS = [
    [0, 0, 10, 10],  # IoU 1.0 with box 0
    [0, 0, 10, 8],  # IoU 0.8 with box 0
    [0, 0, 10, 4.5],  # IoU 0.45 with box 0: between the thresholds
    [0, 0, 10, 3],  # IoU 0.3 with box 0: background
    [50, 50, 60, 60],  # nothing near: background
]


def test_matcher_thresholds():
    result = match(ANCHORS, [[0, 0, 10, 10]], [2], positive_threshold=0.5, negative_threshold=0.4)
    assert result.state[0].tolist() == [FOREGROUND, FOREGROUND, IGNORE, BACKGROUND, BACKGROUND]
    assert result.matched_index[0, :2].tolist() == [0, 0]
    # Equal thresholds (the TF recipe): nothing is ignored.
    result = match(ANCHORS, [[0, 0, 10, 10]], [2], positive_threshold=0.5, negative_threshold=0.5)
    assert result.state[0].tolist() == [FOREGROUND, FOREGROUND, BACKGROUND, BACKGROUND, BACKGROUND]


def test_low_quality_match_gives_every_box_its_best_anchor_with_ties():
    anchors = [[0, 0, 10, 10], [100, 0, 110, 10], [200, 0, 210, 10]]
    # Box 0 overlaps anchors 0 and 1 equally (IoU 1/3 each); box 1 overlaps anchor 2 a little.
    boxes = [[5, 0, 105, 10], [205, 0, 230, 10]]
    result = match(anchors, boxes, [0, 1])
    assert result.state[0].tolist() == [FOREGROUND, FOREGROUND, FOREGROUND]
    assert result.matched_index[0].tolist() == [0, 0, 1]
    result = match(anchors, boxes, [0, 1], allow_low_quality_matches=False)
    assert result.state[0].tolist() == [BACKGROUND, BACKGROUND, BACKGROUND]


def test_padded_slots_are_never_matched():
    # Slot 1 is padding (label -1) with a box that would overlap anchor 4 perfectly.
    result = match(ANCHORS, [[0, 0, 10, 10], [50, 50, 60, 60]], [0, -1])
    assert result.state[0, 4].item() == BACKGROUND
    assert (result.matched_index[0, :2] == 0).all()


def test_empty_image_is_all_background():
    result = match(ANCHORS, [[0, 0, 0, 0], [0, 0, 0, 0]], [-1, -1])
    assert result.state[0].tolist() == [BACKGROUND] * 5
    assert (result.max_iou == -1).all()


def test_crowd_boxes_only_cause_ignores():
    anchors = [[0, 0, 10, 10], [2, 2, 8, 8], [40, 40, 50, 50], [80, 80, 90, 90]]
    # Box 0 is a large crowd region covering anchors 0-2 entirely (IoU tiny, IoA 1); box 1 is real.
    result = match(anchors, [[0, 0, 60, 60], [80, 80, 90, 90]], [1, 0], crowd=[True, False])
    assert result.state[0].tolist() == [IGNORE, IGNORE, IGNORE, FOREGROUND]
    assert result.matched_index[0, 3].item() == 1
    # A crowd box alone never creates a foreground, even through low-quality matching.
    result = match(anchors, [[0, 0, 10, 10]], [1], crowd=[True])
    assert FOREGROUND not in result.state[0].tolist()


def test_matcher_is_batched_per_image():
    boxes = torch.tensor([[[0, 0, 10, 10.0]], [[50, 50, 60, 60.0]]])
    labels = torch.tensor([[0], [0]])
    result = AnchorMatcher()(torch.tensor(ANCHORS, dtype=torch.float32), boxes, labels, torch.zeros(2, 1, dtype=torch.bool))
    assert result.state[0, 0].item() == FOREGROUND and result.state[0, 4].item() == BACKGROUND
    assert result.state[1, 0].item() == BACKGROUND and result.state[1, 4].item() == FOREGROUND
