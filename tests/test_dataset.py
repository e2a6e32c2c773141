"""The detection dataset: an unreadable image replaced and counted (a dataset of them refused),
boxes of a rotated photo."""

import json

import numpy as np
import pytest
from PIL import Image

from retinanet_xla.data import (
    DetectionDataset,
    load_coco,
)
from retinanet_xla.data.check import check_dataset
from retinanet_xla.data.dataset import UNREADABLE_IN_A_ROW
from retinanet_xla.data.image_io import read_rgb
from retinanet_xla.errors import DatasetError
from tests.cli_helpers import ROOT, run_cli, set_options
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


def test_a_dataset_whose_images_all_fail_to_decode_stops_the_run_in_one_line(tmp_path, capsys, monkeypatch):
    """Through the CLI, with the images decoded in a loader worker (torch re-raises a worker's
    error with its traceback in the message): one line, exit 2, and nothing trained on."""
    records = [image(n) for n in range(1, 6)]
    path, images_dir = write_coco(tmp_path, records, [box(n, [10, 10, 20, 20]) for n in range(1, 6)])
    for entry in records:
        (images_dir / entry["file_name"]).write_bytes(b"\x89PNG not really")
    output = tmp_path / "run"
    overrides = [
        f"data.train.annotations={path}",
        f"data.train.images={images_dir}",
        "data.num_workers=1",
        "data.image_size=[64,64]",
        "train.batch_size=2",
        "runtime.device=cpu",
    ]
    result = run_cli(
        capsys,
        monkeypatch,
        "train",
        ROOT / "configs" / "smoke.yaml",
        "--output",
        output,
        *set_options(overrides),
    )
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: none of the dataset's 5 images could be read (the last: {images_dir}/"
    ) and result.stderr.strip().endswith("`retinanet-xla data check` names every problem")
    assert not list((output / "checkpoints").glob("step_*.pt"))


def test_a_sample_gives_up_after_a_run_of_unreadable_images(tmp_path):
    """A broken directory is not searched image by image to its end for every sample."""
    records = [image(n) for n in range(1, UNREADABLE_IN_A_ROW + 3)]  # all but the last broken
    path, images_dir = write_coco(tmp_path, records, [box(n, [10, 10, 20, 20]) for n in range(1, len(records) + 1)])
    for entry in records[:-1]:
        (images_dir / entry["file_name"]).write_bytes(b"broken")
    coco = load_coco(path, images_dir)
    dataset = DetectionDataset(coco.records, coco.mapping, (32, 32), 4)
    assert dataset[(2, 0)]["unreadable"] == UNREADABLE_IN_A_ROW - 1  # the readable one is the 64th tried
    with pytest.raises(DatasetError, match=f"^{UNREADABLE_IN_A_ROW} images in a row could not be read"):
        dataset[(0, 0)]


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_the_annotation_frame_round_trips_boxes_of_every_turn_and_a_rescale(orientation):
    """What training does to the JSON's boxes (``to_image``), evaluation undoes (``to_annotation``)."""
    from retinanet_xla.data.frames import AnnotationFrame, map_boxes
    from retinanet_xla.data.image_io import OrientedImage

    boxes = np.array([[5.0, 10.0, 20.0, 30.0], [0.0, 0.0, 60.0, 40.0]], dtype=np.float32)
    turned = OrientedImage(Image.new("RGB", (40, 60)), orientation, (60, 40))
    rescaled = OrientedImage(Image.new("RGB", (30, 20)), 1, (30, 20))
    for annotated, oriented, how in (((60, 40), turned, "turned"), ((60, 40), rescaled, "rescaled")):
        frame = AnnotationFrame.of(annotated, oriented)
        assert frame.how == how
        on_image = map_boxes(frame.to_image, boxes)
        width, height = oriented.image.size
        assert (on_image[:, :2] >= 0).all() and (on_image[:, 2] <= width).all() and (on_image[:, 3] <= height).all()
        np.testing.assert_allclose(map_boxes(frame.to_annotation, on_image), boxes, atol=1e-4)


def test_an_all_crowd_training_split_is_refused_by_train_and_by_data_check(tmp_path, capsys, monkeypatch):
    """Crowd regions are nothing to learn from: such a split would train on background alone."""
    path, images_dir = write_coco(
        tmp_path, [image(i) for i in range(1, 9)], [box(i, [10, 10, 30, 20], crowd=1) for i in range(1, 9)]
    )
    trained = run_cli(
        capsys,
        monkeypatch,
        "train",
        ROOT / "configs" / "smoke.yaml",
        "--output",
        tmp_path / "run",
        *set_options(
            [f"data.train.annotations={path}", f"data.train.images={images_dir}", "runtime.device=cpu", "train.steps=2"]
        ),
    )
    assert trained.exit_code == 2 and "Traceback" not in trained.stderr
    assert trained.stderr.strip().splitlines()[-1] == (
        f"error: {path}: no usable boxes in any image (run 'retinanet-xla data check' for details): "
        "its 8 box(es) are all crowd regions (iscrowd 1)"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
    checked = run_cli(capsys, monkeypatch, "data", "check", path, "--images", images_dir)
    assert checked.exit_code == 1 and "no usable boxes in any image: 1" in checked.stdout


def test_data_check_on_the_folder_above_the_images_says_where_they_are(tmp_path, capsys, monkeypatch):
    path, images_dir = write_coco(tmp_path, [image(1), image(2)], [box(1, [10, 10, 20, 20])])
    checked = run_cli(capsys, monkeypatch, "data", "check", path, "--images", tmp_path)
    assert checked.exit_code == 1 and "missing image file: 2" in checked.stdout
    assert checked.stdout.strip().splitlines()[-1] == f"the missing images are in {images_dir}: pass --images {images_dir}"
