"""Property-based: the other files users and exporters hand us (YOLO labels and class lists,
Pascal VOC XML, record indexes, YAML configs), mutated every way they go wrong, through the
real readers. Each either reads cleanly, into data that training can place, or fails with our
one-line error; never another exception. (COCO files: test_data_properties.py.)"""

import copy
import json
import math

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from retinanet_xla.config import load_config
from retinanet_xla.config.loading import all_keys
from retinanet_xla.data import DetectionDataset
from retinanet_xla.data.check import check_dataset
from retinanet_xla.data.coco import load_coco
from retinanet_xla.data.convert import convert
from retinanet_xla.data.records import load_records, write_records
from retinanet_xla.data.synthetic import write_synthetic_dataset
from retinanet_xla.errors import ConfigError, DatasetError, UserError

BUDGET = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

NUMBER_TEXT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["", "0", "1", "0.5", "-0", "1e309", "nan", "inf", "-inf", "0x10", "1,5", "½", "abc"]),
)
ODD_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


def one_line(error: UserError, *names) -> None:
    assert "\n" not in str(error) and str(error).strip(), repr(error)
    if names:
        assert any(str(name) in str(error) for name in names), (str(error), names)


def assert_trainable(annotations, images) -> None:
    """What a converter writes is what training reads: it loads, and its boxes lie inside
    their images with a positive size."""
    try:
        coco = load_coco(annotations, images)
    except DatasetError as error:  # only "no usable boxes in any image" may stop it
        assert "no usable boxes" in str(error), str(error)
        return
    for record in coco.records:
        boxes = record.boxes
        assert np.isfinite(boxes).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= record.width).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= record.height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert check_dataset(str(annotations), str(images), decode=False).lines()


def converts_cleanly_or_in_one_line(source: str, root) -> None:
    output = root / "out.json"
    try:
        conversion = convert(source, root, output)
    except DatasetError as error:
        one_line(error, root)
        return
    assert conversion.lines(output)
    assert_trainable(output, conversion.images_dir)


def picture(path, width=40, height=30):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (120, 60, 30)).save(path)


# --- YOLO ---------------------------------------------------------------------------------

YOLO_LINE = st.one_of(
    st.lists(NUMBER_TEXT, min_size=0, max_size=7).map(" ".join),
    st.tuples(st.integers(-2, 4), *[st.floats(-0.5, 1.5, allow_nan=False)] * 4).map(lambda f: " ".join(map(str, f))),
    ODD_TEXT,
)
CLASS_LIST = st.one_of(
    st.lists(ODD_TEXT, max_size=4).map("\n".join).map(lambda text: ("classes.txt", text.encode("utf-8"))),
    st.binary(max_size=16).map(lambda data: ("classes.txt", data)),
    st.sampled_from(
        [
            "names: [tree, house]",
            "names: {0: tree, 1: house}",
            "names: {1: tree, 2: house}",
            "names: 3",
            "names: [",
            "- a",
            "names: &a [*a]",
            "nc: 2",
            "names: !!python/object/apply:os.system [true]",
        ]
    ).map(lambda text: ("data.yaml", text.encode())),
)


@pytest.fixture(scope="module")
def yolo_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo-images")
    for name in ("a.jpg", "b.png"):
        picture(root / name)
    (root / "c.jpg").write_bytes(b"not a picture")
    return root


@BUDGET
@given(class_list=CLASS_LIST, labels=st.lists(st.lists(YOLO_LINE, max_size=5), min_size=3, max_size=3))
def test_yolo_exports_convert_cleanly_or_fail_in_one_line(tmp_path_factory, yolo_images, class_list, labels):
    root = tmp_path_factory.mktemp("yolo")
    for name in ("a.jpg", "b.png", "c.jpg"):
        (root / "images").mkdir(exist_ok=True)
        (root / "images" / name).write_bytes((yolo_images / name).read_bytes())
    (root / "labels").mkdir()
    for name, lines in zip(("a", "b", "c"), labels):
        (root / "labels" / f"{name}.txt").write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    (root / class_list[0]).write_bytes(class_list[1])
    converts_cleanly_or_in_one_line("yolo", root)


# --- Pascal VOC ---------------------------------------------------------------------------

VOC_FIELD = st.one_of(NUMBER_TEXT, ODD_TEXT.map(lambda text: text.replace("<", "").replace("&", "")))


@st.composite
def voc_xml(draw):
    if draw(st.integers(0, 9)) == 0:  # not even XML
        return draw(st.binary(max_size=40))
    objects = []
    for _ in range(draw(st.integers(0, 3))):
        corners = "".join(f"<{key}>{draw(VOC_FIELD)}</{key}>" for key in ("xmin", "ymin", "xmax", "ymax"))
        bndbox = draw(st.sampled_from([f"<bndbox>{corners}</bndbox>", "", "<bndbox/>"]))
        name = draw(st.sampled_from(["tree", "house", "", " tree "]))
        difficult = draw(st.sampled_from(["", "<difficult>1</difficult>", "<difficult>x</difficult>"]))
        objects.append(f"<object><name>{name}</name>{difficult}{bndbox}</object>")
    filename = draw(st.sampled_from(["a.jpg", "b.png", "c.jpg", "missing.jpg", "../a.jpg", "/etc/hostname", "", "a\x00.jpg"]))
    tag = draw(st.sampled_from([f"<filename>{filename}</filename>", ""]))
    return f"<annotation>{tag}{''.join(objects)}</annotation>".encode("utf-8", "surrogatepass")


@BUDGET
@given(files=st.lists(voc_xml(), min_size=1, max_size=3))
def test_voc_annotations_convert_cleanly_or_fail_in_one_line(tmp_path_factory, yolo_images, files):
    root = tmp_path_factory.mktemp("voc")
    for name in ("a.jpg", "b.png", "c.jpg"):
        (root / "JPEGImages").mkdir(exist_ok=True)
        (root / "JPEGImages" / name).write_bytes((yolo_images / name).read_bytes())
    (root / "Annotations").mkdir()
    for number, data in enumerate(files):
        (root / "Annotations" / f"{number}.xml").write_bytes(data)
    converts_cleanly_or_in_one_line("voc", root)


# --- record indexes -----------------------------------------------------------------------

ODD_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "0", "../x.rxr", "/etc/passwd", "a/b", "records-00000-of-00001.rxr"]),
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(st.sampled_from(["shard", "offset", "name"]), st.integers(0, 3), max_size=2),
)
RECORD_PATHS = [
    ("records", "format"),
    ("records", "version"),
    ("records", "shards"),
    ("records", "shards", 0),
    ("records", "shards", 0, "name"),
    ("images", 0),
    ("images", 0, "id"),
    ("images", 0, "record"),
    ("images", 1, "record", "shard"),
    ("images", 1, "record", "offset"),
    ("images", 2, "record", "length"),
    ("images", 2, "record", "crc32"),
    ("annotations", 0, "image_id"),
    ("records",),
]


def set_at(data, path, value):
    for key in path[:-1]:
        if isinstance(data, dict) and key in data or isinstance(data, list) and isinstance(key, int) and key < len(data):
            data = data[key]
        else:
            return
    if isinstance(data, dict) or isinstance(data, list) and isinstance(path[-1], int) and path[-1] < len(data):
        data[path[-1]] = value


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    paths = write_synthetic_dataset(root / "synth", num_train=4, num_val=1, seed=3, min_size=40, max_size=64)["train"]
    prefix = root / "records"
    write_records(paths["annotations"], paths["images"], prefix, shards=1)
    return prefix


@BUDGET
@given(
    changes=st.lists(st.tuples(st.sampled_from(RECORD_PATHS), ODD_VALUE), min_size=1, max_size=3),
    flip=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_record_indexes_and_shards_load_cleanly_or_fail_in_one_line(tmp_path_factory, records, changes, flip):
    root = tmp_path_factory.mktemp("mutated-records")
    meta = json.loads(records.with_suffix(".json").read_text())
    mutated = copy.deepcopy(meta)
    for path, value in changes:
        set_at(mutated, path, value)
    shard = records.parent / meta["records"]["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    if flip is not None:
        data[flip % len(data)] ^= 0xFF  # a bit rot: the image's CRC-32 catches it
    (root / shard.name).write_bytes(bytes(data))
    (root / "records.json").write_text(json.dumps(mutated, allow_nan=True))
    try:
        coco = load_records(root / "records")
        samples = DetectionDataset(coco.records, coco.mapping, (32, 32), max_boxes=8)
        for index in range(len(coco.records)):
            sample = samples[(index, 0)]
            assert np.isfinite(sample["boxes"]).all() and math.isfinite(float(sample["scale"]))
    except DatasetError as error:
        one_line(error)


# --- configs ------------------------------------------------------------------------------

KEYS = all_keys()
YAML_VALUE = st.one_of(
    ODD_VALUE,
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-3, 5000), st.floats(-1, 2)), max_size=3),
    st.sampled_from(["[128, 128]", "{a: 1}", "&x [*x]", "!!binary aGk=", "!!python/name:os.system", "1e400"]),
)


@st.composite
def config_text(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=60))  # whatever an editor saved
    tree: dict = {}
    for _ in range(draw(st.integers(1, 5))):
        key = draw(st.sampled_from(KEYS + ["data.nope", "trian.steps", "extends"]))
        value = draw(YAML_VALUE)
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[leaf] = value
    text = yaml.safe_dump(tree, allow_unicode=True)
    # Values given as raw YAML (anchors, tags) rather than as the strings safe_dump quotes.
    for raw in ("&x [*x]", "!!binary aGk=", "!!python/name:os.system", "1e400", "[128, 128]", "{a: 1}"):
        text = text.replace(f"'{raw}'", raw)
    return text


@BUDGET
@given(
    text=config_text(),
    overrides=st.lists(st.sampled_from(KEYS).flatmap(lambda k: NUMBER_TEXT.map(lambda v: f"{k}={v}")), max_size=2),
)
def test_configs_load_cleanly_or_fail_in_one_line(tmp_path_factory, text, overrides):
    path = tmp_path_factory.mktemp("config") / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        config = load_config(path, overrides)
    except ConfigError as error:
        one_line(error)
        assert len(str(error)) < 2000
        return
    assert config.to_dict()  # a config that loads also saves
