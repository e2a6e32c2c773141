import numpy as np
import pytest
from PIL import Image, ImageDraw

from retinanet_xla.data import NO_AUGMENTATION, Augmentation, letterbox, random_resized_crop
from retinanet_xla.data.transforms import hflip

BOXES = np.array([[10, 20, 60, 50], [100, 10, 180, 110], [30, 90, 45, 130]], dtype=np.float32)


def drawn_image(width=200, height=140):
    """White rectangles (the boxes) on black: alignment can be read off the pixels."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for x1, y1, x2, y2 in BOXES:
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=(255, 255, 255))
    return image


def assert_boxes_on_pixels(canvas, boxes, margin=2, check_outside=True):
    """Inside every box (shrunk by ``margin``) is bright; the canvas outside all boxes is dark
    (unless slivers of dropped boxes may remain: ``check_outside=False``)."""
    grey = canvas.astype(np.float32).mean(axis=2)
    covered = np.zeros(grey.shape, dtype=bool)
    for x1, y1, x2, y2 in boxes:
        inner = grey[int(np.ceil(y1)) + margin : int(y2) - margin, int(np.ceil(x1)) + margin : int(x2) - margin]
        if inner.size:
            assert inner.min() > 150, f"box {x1, y1, x2, y2} is not on its rectangle"
        covered[max(int(y1) - margin, 0) : int(np.ceil(y2)) + margin, max(int(x1) - margin, 0) : int(np.ceil(x2)) + margin] = True
    if check_outside:
        assert grey[~covered].max() < 100, "bright pixels outside every box"


@pytest.mark.parametrize("seed", range(12))
def test_train_transform_keeps_boxes_on_their_pixels(seed):
    augmentation = Augmentation(
        scale_min=0.5, scale_max=2.0, hflip_probability=0.5, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05
    )
    canvas, boxes, keep = random_resized_crop(drawn_image(), BOXES, (128, 160), augmentation, np.random.default_rng(seed))
    assert canvas.shape == (128, 160, 3) and canvas.dtype == np.uint8
    assert len(boxes) == len(keep) and (boxes[:, 2:] > boxes[:, :2]).all()
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= 160).all() and (boxes[:, [1, 3]] <= 128).all()
    assert_boxes_on_pixels(canvas, boxes)


def test_boxes_cropped_away_or_too_small_are_dropped():
    # Scale 2 of a 200x140 image into 64x64: the crop shows a small part of it.
    augmentation = Augmentation(
        scale_min=2.0, scale_max=2.0, hflip_probability=0.0, brightness=0, contrast=0, saturation=0, hue=0, min_box_size=4
    )
    kept_counts = set()
    for seed in range(20):
        canvas, boxes, keep = random_resized_crop(drawn_image(), BOXES, (64, 64), augmentation, np.random.default_rng(seed))
        assert ((boxes[:, 2] - boxes[:, 0] >= 4) & (boxes[:, 3] - boxes[:, 1] >= 4)).all()
        assert_boxes_on_pixels(canvas, boxes, check_outside=False)
        kept_counts.add(len(keep))
    assert min(kept_counts) < len(BOXES)


def test_flip_twice_is_the_identity():
    image = drawn_image()
    once_image, once_boxes = hflip(image, BOXES)
    assert not np.array_equal(np.asarray(once_image), np.asarray(image))
    assert_boxes_on_pixels(np.asarray(once_image), once_boxes)
    twice_image, twice_boxes = hflip(once_image, once_boxes)
    assert np.array_equal(np.asarray(twice_image), np.asarray(image))
    np.testing.assert_array_equal(twice_boxes, BOXES)


@pytest.mark.parametrize("size", [(200, 140), (90, 300), (640, 480)])
def test_letterbox_and_inverse_map_boxes_back_within_one_pixel(size):
    width, height = size
    boxes = BOXES * np.array([width / 200, height / 140] * 2, dtype=np.float32)
    image = Image.new("RGB", size)
    canvas, scaled, scale = letterbox(image, boxes, (128, 128))
    assert canvas.shape == (128, 128, 3)
    assert scale == pytest.approx(min(128 / height, 128 / width))
    np.testing.assert_allclose(scaled / scale, boxes, atol=1.0)
    # Content is top-left; the padding (bottom or right) stays black.
    content_w, content_h = round(width * scale), round(height * scale)
    assert content_w == 128 or content_h == 128


def test_letterbox_keeps_pixels_aligned():
    canvas, boxes, _ = letterbox(drawn_image(), BOXES, (100, 100))
    assert_boxes_on_pixels(canvas, boxes, margin=2)


def test_no_augmentation_is_the_letterbox():
    image = drawn_image()
    canvas, boxes, keep = random_resized_crop(image, BOXES, (128, 128), NO_AUGMENTATION, np.random.default_rng(0))
    expected, expected_boxes, _ = letterbox(image, BOXES, (128, 128))
    np.testing.assert_allclose(boxes, expected_boxes, atol=1e-4)
    assert np.abs(canvas.astype(int) - expected.astype(int)).max() <= 1
    assert keep.tolist() == [0, 1, 2]


def test_augmentation_validation():
    with pytest.raises(ValueError, match="scale_min"):
        Augmentation(scale_min=2.0, scale_max=1.0)
    with pytest.raises(ValueError, match="hue"):
        Augmentation(hue=0.9)
