"""COCO annotation files read for training and evaluation: every bad value named and dropped, category mappings."""

import numpy as np
import pytest
from PIL import Image

from retinanet_xla.data import (
    CategoryMapping,
    DatasetError,
    load_coco,
)
from retinanet_xla.data.check import check_dataset
from tests.cli_helpers import ROOT, run_cli, set_options
from tests.coco_files import box, image, write_coco


def test_bad_annotations_are_counted_and_dropped(tmp_path):
    path, images_dir = write_coco(
        tmp_path,
        [image(1), image(2, create=False), image(3, name="../escape.png", create=False)],
        [
            box(1, [10, 10, 20, 20]),  # fine
            box(1, [90, 70, 30, 30], annotation_id=2),  # partly outside: clipped to [90, 70, 100, 80]
            box(1, [10, 10, 0, 5], annotation_id=3),  # zero width
            box(1, [200, 10, 5, 5], annotation_id=4),  # entirely outside: degenerate after clipping
            box(1, [10, 10, 5, 5], category=3, annotation_id=5),  # unknown category
            box(9, [10, 10, 5, 5], annotation_id=6),  # unknown image
            box(1, [10, 10, 5], annotation_id=7),  # malformed
            box(1, [5, 5, 50, 50], category=7, crowd=1, annotation_id=8),  # crowd kept as crowd
        ],
    )
    dataset = load_coco(path, images_dir)
    assert [r.image_id for r in dataset.records] == [1]
    record = dataset.records[0]
    np.testing.assert_allclose(record.boxes, [[10, 10, 30, 30], [90, 70, 100, 80], [5, 5, 55, 55]])
    assert record.crowd.tolist() == [False, False, True]
    assert record.category_ids.tolist() == [1, 1, 7]
    assert dict(dataset.problems) == {
        "missing image file": 1,
        "image path outside the images directory": 1,
        "box outside the image (clipped)": 2,
        "box with non-positive size": 1,
        "box degenerate after clipping": 1,
        "annotation with an unknown category": 1,
        "annotation for an unknown or skipped image": 1,
        "malformed bbox": 1,
    }


@pytest.mark.parametrize(
    "content,problem",
    [
        ("[1, 2]", "the top level must be an object"),
        ('{"images": [], "annotations": []}', "missing list 'categories'"),
        ('{"images": [{"id": "x"}], "annotations": [], "categories": [{"id": 1}]}', "integer 'id'"),
        ("{not json", "not valid JSON"),
        ('{"images": [], "annotations": [], "categories": [{"id": 1}, {"id": 1}]}', "category id 1 is listed twice"),
    ],
)
def test_a_file_that_is_not_coco_fails_with_one_line(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError) as error:
        load_coco(path, tmp_path / "images")
    assert str(path) in str(error.value) and problem in str(error.value) and "\n" not in str(error.value)


def test_category_mappings_round_trip():
    contiguous = CategoryMapping("contiguous", [7, 1, 3], {1: "a", 3: "c", 7: "g"})
    assert contiguous.to_labels(np.array([1, 3, 7])).tolist() == [0, 1, 2]
    assert contiguous.to_category_ids(np.array([2, 0])).tolist() == [7, 1]
    assert contiguous.num_labels == 3
    raw = CategoryMapping("raw", [1, 90], {1: "person", 90: "toothbrush"})
    assert raw.to_labels(np.array([90])).tolist() == [90] and raw.num_labels == 91
    assert CategoryMapping.from_dict(contiguous.to_dict()) == contiguous
    with pytest.raises(DatasetError, match="label_mapping"):
        CategoryMapping("sorted", [1], {1: "a"})


def test_an_image_size_beyond_any_image_is_named_and_dropped(tmp_path):
    huge = image(2, create=False)
    huge["width"] = 9.3e18  # found by hypothesis: an int64 overflow in the data worker
    path, images_dir = write_coco(tmp_path, [image(1), huge], [box(1, [10, 10, 20, 20]), box(2, [10, 10, 20, 20])])
    Image.new("RGB", (100, 80)).save(images_dir / "2.png")
    dataset = load_coco(path, images_dir)
    assert dataset.problems["image wider or taller than 2147483647 pixels"] == 1
    assert [record.image_id for record in dataset.records] == [1]


def test_values_that_crashed_training_or_were_trained_on_wrongly_are_named_and_dropped(tmp_path):
    """Each of these passed ``data check`` or ended in a traceback before."""
    half = image(3, create=False)
    half["width"] = 0.5  # int(0.5) == 0: a division by zero in a data worker after step 1
    path, images_dir = write_coco(
        tmp_path,
        [image(1), image(2), half, image(4, name="4a.png"), image(4, name="4b.png")],
        [
            box(1, [10, 10, 20, 20]),
            box(1, [30, 30, 20, 20], crowd="0"),  # a string: truthy, it counted as crowd
            box(2, [10, 10, 20, 20], annotation_id=7) | {"image_id": [2]},
            box(2, [10, 10, 20, 20], annotation_id=8) | {"category_id": [1]},
            box(2, [5, 5, 10, 10], crowd=True),
            box(4, [10, 10, 20, 20]),
        ],
    )
    Image.new("RGB", (100, 80)).save(images_dir / "3.png")
    dataset = load_coco(path, images_dir)
    assert dataset.problems == {
        "image without a width and height of at least 1 pixel": 1,
        "duplicate image id (every image with it skipped)": 2,
        "iscrowd that is not 0 or 1": 1,
        "annotation without an integer image_id and category_id": 2,
        "annotation for an unknown or skipped image": 1,  # image 4's box: whose image is it?
    }
    records = {record.image_id: record for record in dataset.records}
    assert sorted(records) == [1, 2]
    assert records[1].crowd.tolist() == [False] and records[2].crowd.tolist() == [True]
    assert "id 4: 4a.png" in dataset.examples["duplicate image id (every image with it skipped)"][0]


def test_annotations_nested_beyond_any_parser_are_one_line(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError) as error:
        load_coco(path, tmp_path)
    assert str(error.value) == f"{path}: nested too deeply to be an annotation file"


def test_duplicate_annotation_ids_and_ids_beyond_int64_are_named(tmp_path):
    path, images_dir = write_coco(
        tmp_path,
        [image(1), image(2**70, name="huge.png")],
        [box(1, [10, 10, 20, 20], annotation_id=5), box(1, [40, 40, 20, 20], annotation_id=5), box(2**70, [1, 1, 9, 9])],
    )
    dataset = load_coco(path, images_dir)
    assert dataset.problems == {
        "duplicate annotation id (evaluation numbers them anew)": 2,
        f"image id outside 0..{2**63 - 1} (skipped)": 1,
        "annotation for an unknown or skipped image": 1,
    }
    assert [record.image_id for record in dataset.records] == [1] and len(dataset.records[0].boxes) == 2


def test_a_dataset_without_boxes_is_refused_for_training_and_reported_by_check(tmp_path):
    from retinanet_xla.config import load_config
    from retinanet_xla.data.splits import dataset_split

    path, images_dir = write_coco(tmp_path, [image(1), image(2)], [])
    config = load_config(overrides=[f"data.train.annotations={path}", f"data.train.images={images_dir}"])
    with pytest.raises(DatasetError, match=r"instances.json: no usable boxes in any image \(run 'retinanet-xla data check'"):
        dataset_split(config, "train", tmp_path)
    report = check_dataset(path, images_dir)
    assert not report.ok and "no usable boxes in any image: 1" in "\n".join(report.lines())


def test_symlink_loops_and_overlong_file_names_are_missing_images_not_tracebacks(tmp_path, capsys, monkeypatch):
    long_name = "x" * 300 + ".png"  # longer than a file name may be (255 bytes on ext4)
    path, images_dir = write_coco(
        tmp_path,
        [image(1), image(2, "loop", create=False), image(3, long_name, create=False), image(4, "spin/a.png", create=False)],
        [box(n, [1, 1, 10, 10]) for n in range(1, 5)],
    )
    (images_dir / "loop").symlink_to("loop-back")
    (images_dir / "loop-back").symlink_to("loop")
    (images_dir / "spin").symlink_to("spin")
    result = run_cli(capsys, monkeypatch, "data", "check", path, "--images", images_dir)
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.stderr
    assert (
        f"missing image file: 3 (e.g. {images_dir / 'loop'}; {images_dir / long_name}; {images_dir / 'spin' / 'a.png'})"
        in result.stdout
    )
    assert result.stdout.startswith(f"{path}: 1 usable images")


def test_categories_sharing_a_name_are_refused_by_train_and_data_check_in_one_line(tmp_path, capsys, monkeypatch):
    """Counted and scored by name, four categories called "same" would be one class."""
    categories = [{"id": i, "name": "same" if i % 2 else f"other{i}"} for i in range(1, 9)]
    path, images_dir = write_coco(tmp_path, [image(1)], [box(1, [10, 10, 20, 20], category=i) for i in range(1, 9)], categories)
    expected = (
        f"error: {path}: categories [1, 3, 5, 7] share the name 'same': per-category counts and AP, and "
        "model.init_from's class matching, go by name; give each category its own name"
    )
    checked = run_cli(capsys, monkeypatch, "data", "check", path, "--images", images_dir)
    assert checked.exit_code == 2 and checked.stderr.strip() == expected
    overrides = [f"data.train.annotations={path}", f"data.train.images={images_dir}", "runtime.device=cpu", "train.steps=2"]
    trained = run_cli(
        capsys, monkeypatch, "train", ROOT / "configs" / "smoke.yaml", "--output", tmp_path / "run", *set_options(overrides)
    )
    assert trained.exit_code == 2 and trained.stderr.strip().splitlines()[-1] == expected
