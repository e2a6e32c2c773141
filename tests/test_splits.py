"""The box budget of a split (data.max_boxes)."""

import pytest

from retinanet_xla.data import (
    DatasetError,
    load_coco,
)
from tests.cli_helpers import ROOT, TINY, run_cli
from tests.coco_files import box, image, write_coco


def test_box_budget_warns_below_one_percent_dropped_and_refuses_above(tmp_path):
    from retinanet_xla.data.splits import check_box_budget

    # Image 1 holds 6 boxes, the 99 others 1 each: 105 boxes.
    boxes = [box(1, [i, i, 5, 5], annotation_id=i + 1) for i in range(6)]
    boxes += [box(n, [1, 1, 5, 5], annotation_id=100 + n) for n in range(2, 101)]
    path, images_dir = write_coco(tmp_path, [image(n) for n in range(1, 101)], boxes)
    dataset = load_coco(path, images_dir)
    assert check_box_budget(dataset, 6) == (6, None)
    assert check_box_budget(dataset, 5) == (
        5,
        f"1 of 100 images in {path} have more than data.max_boxes=5 boxes (up to 6); 1 of 105 boxes (1.0%) are dropped "
        "and their objects count as background: set data.max_boxes to 6 to keep them",
    )
    with pytest.raises(DatasetError) as refused:  # 2 of 105 boxes: over 1%
        check_box_budget(dataset, 4)
    assert str(refused.value) == (
        f"1 of 100 images in {path} have more than data.max_boxes=4 boxes (up to 6); 2 of 105 boxes (1.9%) would be "
        "dropped and their objects trained as background: set data.max_boxes to 6 (or auto), or remove the crowded images"
    )
    assert check_box_budget(dataset, "auto") == (8, None)  # 6, rounded up to a multiple of 8


def test_train_refuses_a_max_boxes_that_drops_objects_before_writing_anything(tmp_path, capsys, monkeypatch):
    overrides = [arg for override in (*TINY, "data.max_boxes=3") for arg in ("--set", override)]
    result = run_cli(capsys, monkeypatch, "train", ROOT / "configs" / "smoke.yaml", "--output", tmp_path / "run", *overrides)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "have more than data.max_boxes=3 boxes (up to 5)" in line
    assert line.endswith(
        "would be dropped and their objects trained as background: set data.max_boxes to 5 (or auto), or remove the crowded images"
    )
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_more_classes_than_the_training_set_has_is_a_warning(tmp_path, caplog):
    from retinanet_xla.config import load_config
    from retinanet_xla.data.splits import dataset_split

    path, images_dir = write_coco(tmp_path, [image(1)], [box(1, [10, 10, 20, 20])])
    config = load_config(
        ROOT / "configs" / "smoke.yaml",
        overrides=[f"data.train.annotations={path}", f"data.train.images={images_dir}", "model.num_classes=5"],
    )
    dataset_split(config, "train", tmp_path)
    assert [record.getMessage() for record in caplog.records] == [
        f"model.num_classes is 5 but {path} has 2 labels with data.label_mapping contiguous: "
        "the other 3 outputs only ever learn background"
    ]
    caplog.clear()
    config.model.num_classes = 2
    dataset_split(config, "train", tmp_path)
    assert not caplog.records
