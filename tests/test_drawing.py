"""Tags drawn by predict and report: inside the picture, off each other where there is room."""

import numpy as np
from PIL import Image

from retinanet_xla.inference.predict import _overlap, _place_tag, beside, draw


def detection(x, y, w, h, label=1, name="thing", score=0.9):
    return {"bbox": [x, y, w, h], "label": label, "category_name": name, "score": score}


def test_a_tag_at_the_top_or_right_edge_stays_inside_the_picture():
    size = (100, 80)
    top_left = _place_tag((0, 0, 30, 30), 40, 12, size, [])
    right = _place_tag((90, 40, 100, 60), 40, 12, size, [])
    bottom = _place_tag((10, 75, 20, 80), 40, 12, size, [])
    for left, top, right_edge, bottom_edge in (top_left, right, bottom):
        assert 0 <= left and right_edge <= 100 and 0 <= top and bottom_edge <= 80
    assert top_left[1] == 0  # no room above: inside the box's top
    assert right[2] == 100  # pushed left from the right edge


def test_tags_of_nearby_boxes_do_not_cover_each_other():
    placed = []
    for box in [(20, 30, 60, 70), (22, 32, 62, 72), (24, 34, 64, 74)]:  # three boxes 2 px apart
        placed.append(_place_tag(box, 40, 12, (100, 100), placed))
    assert not any(_overlap(a, b) for i, a in enumerate(placed) for b in placed[i + 1 :])


def test_drawn_tags_keep_to_the_picture_and_ground_truth_has_no_scores():
    image = Image.new("RGB", (64, 48), (0, 0, 0))
    drawn = np.asarray(draw(image, [detection(0, 0, 20, 20), detection(50, 30, 14, 18, label=2)]))
    assert drawn.shape == (48, 64, 3) and drawn.any()
    both = beside(draw(image, [detection(0, 0, 20, 20)], scores=False), image)
    assert both.size == (64 + 8 + 64, 48)
