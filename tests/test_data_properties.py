"""Property-based: a small valid COCO file, mutated every way a hand-edited or converted file
goes wrong (wrong types, odd values, missing and duplicated fields), never makes ``data check``
or dataset loading raise anything but our one-line ``DatasetError``, and every image that gets
through is one whose boxes training can place."""

import copy
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retinanet_xla.data import DetectionDataset
from retinanet_xla.data.check import check_dataset
from retinanet_xla.data.coco import load_coco
from retinanet_xla.data.synthetic import write_synthetic_dataset
from retinanet_xla.data.transforms import Augmentation
from retinanet_xla.errors import DatasetError

ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "0", "1", "abc", "../x.jpg", "/etc/passwd", "000001.jpg"]),
    st.lists(st.integers(min_value=-2, max_value=50), max_size=5),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=4, max_size=4),
    st.dictionaries(st.sampled_from(["id", "x"]), st.integers(0, 3), max_size=2),
)
FIELDS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox", "iscrowd", "area"),
    "categories": ("id", "name"),
}


@st.composite
def mutation(draw):
    kind = draw(st.sampled_from(["set", "delete", "duplicate", "replace_section", "replace_entry"]))
    # Annotations most often: a bad image or category entry makes the whole file structurally
    # invalid (one error), a bad box only drops that box, and there is more to check after it.
    section = draw(st.sampled_from(("annotations", "annotations", "annotations", "images", "categories")))
    return kind, section, draw(st.integers(0, 30)), draw(st.sampled_from(FIELDS[section])), draw(ODD_VALUES)


def mutate(data: dict, mutations) -> dict:
    data = copy.deepcopy(data)
    for kind, section, index, key, value in mutations:
        entries = data.get(section)
        if kind == "replace_section":
            data[section] = value
            continue
        if not isinstance(entries, list) or not entries:
            continue
        entry = entries[index % len(entries)]
        if kind == "replace_entry":
            entries[index % len(entries)] = value
        elif not isinstance(entry, dict):
            continue
        elif kind == "set":
            entry[key] = value
        elif kind == "delete":
            entry.pop(key, None)
        elif kind == "duplicate":
            entries.append(copy.deepcopy(entry))
    return data


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    paths = write_synthetic_dataset(root, num_train=6, num_val=1, seed=4, min_size=40, max_size=64)["train"]
    return json.loads(paths["annotations"].read_text()), paths["images"], root


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation(), min_size=1, max_size=4))
def test_mutated_coco_files_load_cleanly_or_fail_in_one_line(dataset, mutations):
    original, images, root = dataset
    annotations = root / "mutated.json"
    # allow_nan: a NaN or Infinity in a file is what json.dumps writes and json.loads reads.
    annotations.write_text(json.dumps(mutate(original, mutations), allow_nan=True))
    try:
        coco = load_coco(annotations, images)
        report = check_dataset(str(annotations), str(images), decode=True)
    except DatasetError as error:
        assert "\n" not in str(error) and str(error).startswith(str(annotations))
        return
    assert report.lines()  # the report itself never fails
    for record in coco.records:
        boxes = record.boxes
        assert boxes.dtype == np.float32 and boxes.shape == (len(record.category_ids), 4)
        assert np.isfinite(boxes).all() and record.width >= 1 and record.height >= 1
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= record.width).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= record.height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert set(record.category_ids.tolist()) <= set(coco.mapping.category_ids)
    if not coco.records:
        return
    # What training sees: every sample, through the augmentation, has finite boxes inside the
    # input and labels the model has.
    samples = DetectionDataset(coco.records, coco.mapping, (32, 32), max_boxes=8, augmentation=Augmentation())
    for index in range(len(coco.records)):
        sample = samples[(index, index)]
        real = sample["labels"] >= 0
        assert np.isfinite(sample["boxes"]).all()
        assert (sample["boxes"][real] >= 0).all() and (sample["boxes"][real] <= 32).all()
        assert (sample["labels"][real] < coco.mapping.num_labels).all()
        assert math.isfinite(float(sample["scale"]))
