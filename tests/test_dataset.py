"""The detection dataset: an unreadable image replaced and counted, boxes of a rotated photo."""

import json

import numpy as np
import pytest
from PIL import Image

from retinanet_xla.data import (
    DetectionDataset,
    load_coco,
)
from retinanet_xla.data.check import check_dataset
from retinanet_xla.data.image_io import read_rgb
from tests.coco_files import box, image, write_coco


def test_unreadable_image_is_replaced_and_counted(tmp_path):
    path, images_dir = write_coco(tmp_path, [image(1), image(2)], [box(2, [10, 10, 20, 20])])
    (images_dir / "1.png").write_bytes(b"this is not a png")
    coco = load_coco(path, images_dir)
    dataset = DetectionDataset(coco.records, coco.mapping, (32, 32), 4)
    sample = dataset[(0, 0)]
    assert sample["unreadable"] == 1 and sample["image_id"] == 2


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_boxes_of_an_exif_rotated_photo_turn_with_its_pixels(tmp_path, orientation):
    """A phone photo stored sideways, annotated in its stored pixels (the JSON gives the stored
    size): after EXIF orientation the box must cover the same object, not be stretched."""
    stored = Image.new("RGB", (60, 40), (0, 0, 0))
    stored.paste((255, 0, 0), (5, 10, 20, 30))  # the object: x 5-20, y 10-30 in stored pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "photo.png", exif=exif)
    annotations = {
        "images": [{"id": 1, "file_name": "photo.png", "width": 60, "height": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 10, 15, 20], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(annotations))
    coco = load_coco(tmp_path / "instances.json", tmp_path)
    sample = DetectionDataset(coco.records, coco.mapping, (60, 60), max_boxes=2)[0]
    box = sample["boxes"][0] / sample["scale"]  # back in the displayed photo's pixels
    displayed = np.asarray(read_rgb(tmp_path / "photo.png"))
    assert displayed.shape[:2] == (60, 40)  # turned on its side
    ys, xs = np.nonzero(displayed[:, :, 0] > 128)
    np.testing.assert_allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=0.01)
    assert check_dataset(tmp_path / "instances.json", tmp_path).ok  # the stored size is a valid size
