"""Evaluation scores detections in the annotation file's frame, the one training reads boxes
from (data/frames.py): a split whose JSON describes EXIF-turned photos by their stored pixels,
or describes the images at twice their file's size, scores as the plain split does with the same
checkpoint, through ``retinanet-xla eval``; ``data check`` says what it found."""

import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.cli_helpers import EVALUATING, SCRIPT, set_options, train_command

NATIVE_CPU = ["runtime.device=cpu"]
SAME_FRAME_KEYS = ("AP", "AP50", "AP75", "AR1", "AR10", "AR100")  # area ranges move with a rescale


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("frames") / "run"
    done = subprocess.run(
        train_command(run, *EVALUATING, "train.eval_every=0", "train.steps=30", *NATIVE_CPU),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    annotations, images = run / "synthetic" / "annotations" / "instances_val.json", run / "synthetic" / "val"
    plain = evaluate(run, annotations, images, run / "plain-eval")
    assert plain["AR100"] > 0.1  # the checkpoint finds things: the comparisons below mean something
    return run, json.loads(annotations.read_text()), images, plain


def evaluate(run: Path, annotations: Path, images: Path, output: Path) -> dict:
    command = [str(SCRIPT), "eval", str(run), "--data", str(annotations), "--images", str(images), "--output", str(output)]
    done = subprocess.run(command + set_options([*NATIVE_CPU, "eval.score_threshold=0.001"]), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((output / "metrics.json").read_text())


def data_check(annotations: Path, images: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), "data", "check", str(annotations), "--images", str(images)], capture_output=True, text=True
    )


def turned_split(val: dict, images: Path, target: Path) -> Path:
    """Each image stored turned 90 degrees counter-clockwise, with EXIF orientation 6 (display it
    turned clockwise), and the JSON describing the stored pixels, as cameras and some tools write."""
    target.mkdir()
    data = json.loads(json.dumps(val))
    widths = {}
    for image in data["images"]:
        with Image.open(images / image["file_name"]) as displayed:
            stored = displayed.convert("RGB").transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        image["file_name"] = Path(image["file_name"]).stem + ".png"
        stored.save(target / image["file_name"], exif=exif)  # lossless: decoding gives the same pixels back
        widths[image["id"]] = image["width"]
        image["width"], image["height"] = image["height"], image["width"]
    for annotation in data["annotations"]:
        x, y, w, h = annotation["bbox"]
        width = widths[annotation["image_id"]]
        annotation["bbox"] = [y, width - x - w, h, w]  # a displayed point (X, Y) is stored at (Y, W - X)
    path = target / "instances.json"
    path.write_text(json.dumps(data))
    return path


def doubled_split(val: dict, target: Path) -> Path:
    """The same files, described at twice their size (a JSON written for a larger copy)."""
    target.mkdir()
    data = json.loads(json.dumps(val))
    for image in data["images"]:
        image["width"], image["height"] = 2 * image["width"], 2 * image["height"]
    for annotation in data["annotations"]:
        annotation["bbox"] = [2 * value for value in annotation["bbox"]]
        annotation["area"] = 4 * annotation.get("area", 0)
    path = target / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_exif_turned_photos_described_as_stored_score_as_the_plain_split(trained, tmp_path):
    run, val, images, plain = trained
    annotations = turned_split(val, images, tmp_path / "turned")
    turned = evaluate(run, annotations, tmp_path / "turned", tmp_path / "turned-eval")
    for key in (*SAME_FRAME_KEYS, "APs", "APm", "APl"):  # a turn keeps areas
        assert turned[key] == pytest.approx(plain[key], abs=1e-4), key
    checked = data_check(annotations, tmp_path / "turned")
    assert checked.returncode == 0, checked.stdout
    assert f"{len(val['images'])} image(s) described in the JSON by their stored pixels" in checked.stdout


def test_images_described_at_another_size_score_as_the_plain_split(trained, tmp_path):
    run, val, images, plain = trained
    annotations = doubled_split(val, tmp_path / "doubled")
    doubled = evaluate(run, annotations, images, tmp_path / "doubled-eval")
    for key in SAME_FRAME_KEYS:
        assert doubled[key] == pytest.approx(plain[key], rel=0.02, abs=1e-4), key
    checked = data_check(annotations, images)
    assert checked.returncode == 1  # a JSON that disagrees with its files is a problem to look at
    assert "image size differs from the JSON (boxes rescaled to the file in training and evaluation)" in checked.stdout
