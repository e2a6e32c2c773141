"""`retinanet-xla data check` and `data synth` through the CLI."""

import json
import subprocess
import sys
from pathlib import Path

from tests.coco_files import box, image, write_coco

SCRIPT = Path(sys.executable).parent / "retinanet-xla"


def test_data_check_reports_problems_with_exit_code_1(tmp_path):
    path, images_dir = write_coco(tmp_path, [image(1), image(2)], [box(1, [10, 10, 0, 5]), box(2, [1, 1, 5, 5], category=4)])
    (images_dir / "2.png").write_bytes(b"broken")
    result = subprocess.run(
        [str(SCRIPT), "data", "check", str(path), "--images", str(images_dir)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "box with non-positive size: 1" in result.stdout
    assert "annotation with an unknown category: 1" in result.stdout
    assert "unreadable image: 1" in result.stdout


def test_data_synth_and_check_through_the_cli(tmp_path):
    result = subprocess.run(
        [str(SCRIPT), "data", "synth", str(tmp_path), "--images", "12", "--val-images", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    train = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    assert len(train["images"]) == 12 and len(list((tmp_path / "val").iterdir())) == 4
    check = subprocess.run(
        [
            str(SCRIPT),
            "data",
            "check",
            str(tmp_path / "annotations" / "instances_train.json"),
            "--images",
            str(tmp_path / "train"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0 and "no problems found" in check.stdout
    missing = subprocess.run(
        [str(SCRIPT), "data", "check", str(tmp_path / "nope.json"), "--images", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope.json'}: annotation file does not exist"
