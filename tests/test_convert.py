"""``data convert --from yolo|voc``: fixtures written here, broken lines included, through the CLI;
the COCO file written is one ``data check`` accepts, with the boxes expected."""

import json

import pytest
from PIL import Image

from tests.cli_helpers import ROOT, run_cli, set_options


def picture(path, width, height):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (40, 80, 120)).save(path)


def boxes_of(coco, file_name):
    image_id = next(image["id"] for image in coco["images"] if image["file_name"] == file_name)
    return [(a["category_id"], a["bbox"], a["iscrowd"]) for a in coco["annotations"] if a["image_id"] == image_id]


def test_yolo_labels_become_coco_boxes_and_bad_lines_are_named(tmp_path, capsys, monkeypatch):
    root = tmp_path / "yolo"
    picture(root / "images" / "train" / "a.jpg", 200, 100)
    picture(root / "images" / "train" / "b.png", 50, 50)
    picture(root / "images" / "train" / "no-labels.jpg", 30, 30)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text(
        "0 0.5 0.5 0.2 0.4\n"  # a 40x40 box in the middle
        "1 0.1 0.1 0.2 0.2\n"  # touches the corner: x 0-40, y 0-20
        "\n"
        "7 0.5 0.5 0.1 0.1\n"  # no class 7
        "0 0.5 0.5 0.1\n"  # four fields
        "0 0.9 0.5 0.4 0.2\n"  # reaches x = 1.1
        "x 0.5 0.5 0.1 0.1\n"  # not a number
    )
    (root / "labels" / "train" / "b.txt").write_text("1 0.5 0.5 1.0 1.0\n0 0.5 0.5 0 0.3\n")
    (root / "data.yaml").write_text("names: {0: tree, 1: house}\n")
    output = tmp_path / "instances.json"

    result = run_cli(capsys, monkeypatch, "data", "convert", root, "--from", "yolo", "--output", output)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"wrote {output}: 3 images, 3 boxes, 2 categories; images directory {root / 'images'}"
    assert "left out, class outside 0..1: 1 (e.g. labels/train/a.txt:4: class 7)" in lines
    assert "left out, line without exactly 5 fields (class cx cy w h): 1 (e.g. labels/train/a.txt:5: 0 0.5 0.5 0.1)" in lines
    assert "left out, box outside the normalised [0, 1] range: 1 (e.g. labels/train/a.txt:6: 0.9 0.5 0.4 0.2)" in lines
    assert "left out, line that is not numbers: 1 (e.g. labels/train/a.txt:7: x 0.5 0.5 0.1 0.1)" in lines
    assert "left out, box with no width or height: 1 (e.g. labels/train/b.txt:2: 0.5 0.5 0 0.3)" in lines

    coco = json.loads(output.read_text())
    assert coco["categories"] == [{"id": 1, "name": "tree"}, {"id": 2, "name": "house"}]
    assert boxes_of(coco, "train/a.jpg") == [(1, [80.0, 30.0, 40.0, 40.0], 0), (2, [0.0, 0.0, 40.0, 20.0], 0)]
    assert boxes_of(coco, "train/b.png") == [(2, [0.0, 0.0, 50.0, 50.0], 0)]
    assert boxes_of(coco, "train/no-labels.jpg") == []
    check = run_cli(capsys, monkeypatch, "data", "check", output, "--images", root / "images")
    assert check.exit_code == 0 and "no problems found" in check.stdout, check.stdout


def test_voc_xml_becomes_coco_with_difficult_objects_as_crowd(tmp_path, capsys, monkeypatch):
    root = tmp_path / "VOC2007"
    picture(root / "JPEGImages" / "000001.jpg", 100, 80)
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "000001.xml").write_text(
        """<annotation><filename>000001.jpg</filename><size><width>999</width><height>999</height></size>
        <object><name>dog</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>50</xmax><ymax>60</ymax></bndbox></object>
        <object><name>cat</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>100</xmax><ymax>80</ymax></bndbox></object>
        <object><name>cat</name><bndbox><xmin>60</xmin><ymin>10</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object>
        <object><name>dog</name><bndbox><xmin>5</xmin><ymin>5</ymin></bndbox></object>
        <object><name>dog</name><bndbox><xmin>nan</xmin><ymin>5</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>
        </annotation>"""
    )
    (root / "Annotations" / "000002.xml").write_text("<annotation><filename>missing.jpg</filename></annotation>")
    (root / "Annotations" / "broken.xml").write_text("<annotation><object>")
    (root / "Annotations" / "directory.xml").mkdir()
    picture(tmp_path / "outside.jpg", 10, 10)
    (root / "Annotations" / "escape.xml").write_text("<annotation><filename>../../outside.jpg</filename></annotation>")
    output = tmp_path / "voc.json"

    result = run_cli(capsys, monkeypatch, "data", "convert", root, "--from", "voc", "--output", output)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"wrote {output}: 1 images, 2 boxes, 2 categories; images directory {root / 'JPEGImages'}"
    assert "left out, bndbox outside the image or inverted: 1 (e.g. 000001.xml object 3: 60 10 40 30)" in lines
    assert (
        "left out, object without a numeric bndbox: 2 (e.g. 000001.xml object 4; 000001.xml object 5: nan 5.0 9.0 9.0)" in lines
    )
    assert "left out, image missing or unreadable: 1 (e.g. 000002.xml -> missing.jpg)" in lines
    assert any(line.startswith("left out, annotation file that is not XML: 1 (e.g. broken.xml: ") for line in lines)
    assert "left out, annotation file that cannot be read: 1 (e.g. directory.xml: Is a directory)" in lines
    assert "left out, image path outside the images directory: 1 (e.g. escape.xml -> '../../outside.jpg')" in lines
    coco = json.loads(output.read_text())
    assert coco["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert coco["images"][0]["width"] == 100  # the pixels' size, not the XML's <size>
    assert boxes_of(coco, "000001.jpg") == [(2, [10.0, 20.0, 40.0, 40.0], 0), (1, [0.0, 0.0, 100.0, 80.0], 1)]
    check = run_cli(capsys, monkeypatch, "data", "check", output, "--images", root / "JPEGImages")
    assert check.exit_code == 0 and "(1 crowd)" in check.stdout, check.stdout


@pytest.mark.parametrize(
    "source, layout, message",
    [
        ("yolo", {"images/a.jpg": None}, "no classes.txt or data.yaml naming the YOLO classes"),
        ("yolo", {"data.yaml": "names: 3\n", "images/a.jpg": None}, "data.yaml: 'names' must be a list of class names"),
        ("yolo", {"classes.txt": b"caf\xe9\n", "images/a.jpg": None}, "classes.txt: not UTF-8 text (byte 3)"),
        ("voc", {"JPEGImages/a.jpg": None}, "Annotations: Pascal VOC directory does not exist"),
        ("labelme", {}, "--from labelme: expected one of coco, yolo, voc"),
    ],
)
def test_a_dataset_that_is_not_the_format_is_one_line(tmp_path, capsys, monkeypatch, source, layout, message):
    for name, text in layout.items():
        if text is None:
            picture(tmp_path / name, 8, 8)
        elif isinstance(text, bytes):
            (tmp_path / name).write_bytes(text)
        else:
            (tmp_path / name).write_text(text)
    result = run_cli(capsys, monkeypatch, "data", "convert", tmp_path, "--from", source, "--output", tmp_path / "out.json")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out.json").exists()


def yolo_split(root, split, count, layout="ultralytics"):
    images, labels = (
        (root / "images" / split, root / "labels" / split)
        if layout == "ultralytics"
        else (root / split / "images", root / split / "labels")
    )
    for number in range(count):
        picture(images / f"{split}{number}.jpg", 64, 64)
        labels.mkdir(parents=True, exist_ok=True)
        (labels / f"{split}{number}.txt").write_text(f"{number % 2} 0.5 0.5 0.4 0.3\n")


@pytest.mark.parametrize("layout", ["ultralytics", "roboflow"])
def test_yolo_train_and_val_splits_become_two_coco_files_that_train_and_evaluate(tmp_path, capsys, monkeypatch, layout):
    root = tmp_path / "yolo"
    yolo_split(root, "train", 6, layout)
    yolo_split(root, "val", 2, layout)
    (root / "classes.txt").write_text("tree\nhouse\n")
    merged = run_cli(capsys, monkeypatch, "data", "convert", root, "--from", "yolo", "--output", tmp_path / "all.json")
    assert merged.exit_code == 2 and merged.stderr.strip() == (
        f"error: {root}: holds the splits train, val: convert each to its own COCO file with --split NAME (--split all merges them)"
    )
    files = {}
    for split, role in (("train", "train"), ("val", "val")):
        files[split] = tmp_path / f"{split}.json"
        result = run_cli(
            capsys, monkeypatch, "data", "convert", root, "--from", "yolo", "--split", split, "--output", files[split]
        )
        assert result.exit_code == 0, result.stderr
        images_dir = root / "images" / split if layout == "ultralytics" else root / split / "images"
        assert result.stdout.strip().splitlines()[-1] == (
            f"use it with: --set data.{role}.annotations={files[split]} --set data.{role}.images={images_dir}"
        )
        coco = json.loads(files[split].read_text())
        assert sorted(entry["file_name"] for entry in coco["images"]) == [
            f"{split}{n}.jpg" for n in range(6 if split == "train" else 2)
        ]
    run = tmp_path / "run"
    settings = [
        f"data.train.annotations={files['train']}",
        f"data.train.images={root / 'images' / 'train' if layout == 'ultralytics' else root / 'train' / 'images'}",
        f"data.val.annotations={files['val']}",
        f"data.val.images={root / 'images' / 'val' if layout == 'ultralytics' else root / 'val' / 'images'}",
        "model.num_classes=2",
        "data.image_size=[64,64]",
        "data.num_workers=0",
        "train.batch_size=2",
        "eval.batch_size=2",
        "train.steps=2",
        "runtime.device=cpu",
    ]
    trained = run_cli(
        capsys,
        monkeypatch,
        "train",
        ROOT / "configs" / "smoke.yaml",
        "--output",
        run,
        *set_options(settings),
    )
    assert trained.exit_code == 0, trained.stderr[-3000:]
    evaluated = run_cli(capsys, monkeypatch, "eval", run, "--set", "runtime.device=cpu")
    assert evaluated.exit_code == 0, evaluated.stderr[-3000:]
    metrics = json.loads(next((run / "eval").glob("*/metrics.json")).read_text())
    assert metrics["images"] == 2 and set(metrics["per_category_AP"]) == {"tree", "house"}
