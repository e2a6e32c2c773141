import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet_xla.data import (
    Augmentation,
    CategoryMapping,
    DatasetError,
    DetectionDataset,
    EvalSampler,
    TrainSampler,
    build_loader,
    load_coco,
)
from retinanet_xla.data.check import check_dataset
from retinanet_xla.data.image_io import UnreadableImage, read_rgb
from retinanet_xla.data.synthetic import write_synthetic_dataset
from tests.cli_helpers import ROOT, TINY, run_cli

SCRIPT = Path(sys.executable).parent / "retinanet-xla"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=40, num_val=7, seed=5)


def write_coco(tmp_path, images, annotations, categories=({"id": 1, "name": "a"}, {"id": 7, "name": "b"})):
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    for entry in images:
        if entry.get("create", True):
            Image.new("RGB", (entry["width"], entry["height"]), (90, 90, 90)).save(image_dir / entry["file_name"])
    clean = [{k: v for k, v in entry.items() if k != "create"} for entry in images]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": clean, "annotations": annotations, "categories": list(categories)}))
    return path, image_dir


def image(image_id, name=None, width=100, height=80, create=True):
    return {"id": image_id, "file_name": name or f"{image_id}.png", "width": width, "height": height, "create": create}


def box(image_id, bbox, category=1, crowd=0, annotation_id=None):
    return {
        "id": annotation_id or image_id * 100 + len(bbox),
        "image_id": image_id,
        "bbox": bbox,
        "category_id": category,
        "iscrowd": crowd,
    }


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


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_any_image_mode_decodes_to_rgb(tmp_path, mode):
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    Image.new(mode, (12, 9)).save(path)
    decoded = read_rgb(path)
    assert decoded.mode == "RGB" and decoded.size == (12, 9)


def test_exif_orientation_is_honoured(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # white left band
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    decoded = np.asarray(read_rgb(path))
    assert decoded.shape == (40, 20, 3)
    assert decoded[:10].mean() > 200 and decoded[15:].mean() < 50  # the band is now on top


def test_batches_have_fixed_shapes_whatever_the_data(synthetic):
    coco = load_coco(synthetic["train"]["annotations"], synthetic["train"]["images"])
    box_counts = {len(r.boxes) for r in coco.records}
    assert 0 in box_counts and max(box_counts) >= 3  # empty images and crowded ones
    dataset = DetectionDataset(coco.records, coco.mapping, (64, 96), max_boxes=3, augmentation=Augmentation())
    loader = build_loader(dataset, TrainSampler(len(dataset), batch_size=4, seed=1), batch_size=4, num_workers=0)
    shapes = set()
    truncated = 0
    for _, batch in zip(range(12), loader):
        shapes.add(tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items())))
        truncated += int(batch["truncated"].sum())
        labels = batch["labels"]
        assert ((labels >= -1) & (labels < coco.mapping.num_labels)).all()
        assert (batch["boxes"][labels < 0] == 0).all()
    assert len(shapes) == 1
    shape = dict((k, (s, d)) for k, s, d in next(iter(shapes)))
    assert shape["images"] == ((4, 3, 64, 96), torch.uint8)
    assert shape["boxes"] == ((4, 3, 4), torch.float32)
    assert shape["labels"] == ((4, 3), torch.int64)
    assert shape["crowd"] == ((4, 3), torch.bool)
    assert truncated > 0  # images with more than 3 boxes were cut and counted


def test_worker_processes_give_the_same_batches(synthetic):
    coco = load_coco(synthetic["train"]["annotations"], synthetic["train"]["images"])
    dataset = DetectionDataset(coco.records, coco.mapping, (64, 64), 8, Augmentation())

    def first_batches(workers):
        loader = build_loader(dataset, TrainSampler(len(dataset), 2, seed=3), 2, num_workers=workers)
        return [b for _, b in zip(range(3), loader)]

    for a, b in zip(first_batches(0), first_batches(2)):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_starting_a_loader_leaves_the_global_rng_alone(synthetic):
    """Replica threads share torch's global RNG; a loader drawing from it while another replica
    initialises its model under the seed would give that replica different weights."""
    coco = load_coco(synthetic["train"]["annotations"], synthetic["train"]["images"])
    dataset = DetectionDataset(coco.records, coco.mapping, (64, 64), 8, Augmentation())
    loader = build_loader(dataset, TrainSampler(len(dataset), 2, seed=3), 2, num_workers=1)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    next(iter(loader))
    assert torch.equal(torch.rand(4), expected)


# Run in its own process: the signals must come from a process that is not the worker's parent,
# and the interpreter's exit (where multiprocessing ends leftover workers) is part of the test.
SIGNALLED_LOADER = """
import multiprocessing, sys
from retinanet_xla.data import Augmentation, DetectionDataset, TrainSampler, build_loader, load_coco
coco = load_coco(sys.argv[1], sys.argv[2])
dataset = DetectionDataset(coco.records, coco.mapping, (64, 64), 8, Augmentation())
batches = iter(build_loader(dataset, TrainSampler(len(dataset), 2, seed=3), 2, num_workers=1))
next(batches)
(worker,) = multiprocessing.active_children()
print(worker.pid, flush=True)
sys.stdin.readline()  # the test signals the worker now
print("alive", worker.is_alive(), flush=True)
print("batches", sum(next(batches)["images"].shape == (2, 3, 64, 64) for _ in range(20)), flush=True)
# The persistent iterator is still referenced: the interpreter's exit must end the worker.
"""


def test_loader_workers_outlive_stop_signals_from_other_processes(synthetic):
    """A TPU VM preemption or a Ctrl-C signals every process. The workers must keep feeding
    their replica until it has agreed to stop and saved; the process must still exit."""
    import os
    import signal

    train = synthetic["train"]
    script = subprocess.Popen(
        [sys.executable, "-c", SIGNALLED_LOADER, str(train["annotations"]), str(train["images"])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        worker = int(script.stdout.readline())
        os.kill(worker, signal.SIGTERM)
        os.kill(worker, signal.SIGINT)
        out, err = script.communicate("go\n", timeout=60)  # more than the prefetched batches, then exit
    finally:
        script.kill()
    assert script.returncode == 0, err[-2000:]
    assert out.split("\n")[:2] == ["alive True", "batches 20"], err[-2000:]


def test_train_sharding_is_disjoint_and_resumable():
    replicas = [TrainSampler(50, batch_size=4, num_replicas=3, rank=r, seed=7) for r in range(3)]
    per_epoch = replicas[0].batches_per_epoch * 4
    assert replicas[0].batches_per_epoch == 4  # 50 // 12; the remainder of 2 is dropped
    epoch0 = [[k[0] for _, k in zip(range(per_epoch), iter(s))] for s in replicas]
    flat = sum(epoch0, [])
    assert len(flat) == len(set(flat)) == 48
    # Next epoch: a different order (different images dropped).
    stream = iter(replicas[0])
    keys = [next(stream) for _ in range(2 * per_epoch)]
    assert [k[0] for k in keys[:per_epoch]] != [k[0] for k in keys[per_epoch:]]
    # Resuming at batch 5 continues the same stream, augmentation seeds included.
    resumed = iter(TrainSampler(50, batch_size=4, num_replicas=3, rank=0, seed=7, start_batch=5))
    assert [next(resumed) for _ in range(8)] == keys[20:28]
    # Different replicas draw different augmentation seeds.
    assert next(iter(replicas[0]))[1] != next(iter(replicas[1]))[1]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainSampler(5, batch_size=4, num_replicas=2)


def test_eval_sharding_covers_every_image_once_and_pads(synthetic):
    samplers = [EvalSampler(7, batch_size=2, num_replicas=2, rank=r) for r in range(2)]
    keys = [[k for k, _ in s] for s in samplers]
    assert len(keys[0]) == len(keys[1]) == 4  # two global batches of 4 for 7 images
    real = [k for k in keys[0] + keys[1] if k >= 0]
    assert sorted(real) == list(range(7))
    coco = load_coco(synthetic["val"]["annotations"], synthetic["val"]["images"])
    dataset = DetectionDataset(coco.records, coco.mapping, (64, 64), 5)
    batches = list(build_loader(dataset, samplers[1], 2, num_workers=0))
    assert batches[-1]["valid"].tolist() == [True, False]
    assert batches[-1]["image_id"][1].item() == -1 and batches[-1]["images"][1].sum().item() == 0
    # Eval samples record how to map predictions back to original pixels.
    record = coco.records[keys[1][0]]
    first = batches[0]
    assert first["image_id"][0].item() == record.image_id
    assert first["original_size"][0].tolist() == [record.height, record.width]
    assert first["scale"][0].item() == pytest.approx(min(64 / record.height, 64 / record.width))


def test_unreadable_image_is_replaced_and_counted(tmp_path):
    path, images_dir = write_coco(tmp_path, [image(1), image(2)], [box(2, [10, 10, 20, 20])])
    (images_dir / "1.png").write_bytes(b"this is not a png")
    coco = load_coco(path, images_dir)
    dataset = DetectionDataset(coco.records, coco.mapping, (32, 32), 4)
    sample = dataset[(0, 0)]
    assert sample["unreadable"] == 1 and sample["image_id"] == 2


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


def test_synthetic_dataset_is_deterministic(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", 6, 2, seed=3)
    b = write_synthetic_dataset(tmp_path / "b", 6, 2, seed=3)
    assert a["train"]["annotations"].read_text() == b["train"]["annotations"].read_text()
    assert (a["train"]["images"] / "000001.jpg").read_bytes() == (b["train"]["images"] / "000001.jpg").read_bytes()


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


def test_a_dataset_without_boxes_is_refused_for_training_and_reported_by_check(tmp_path):
    from retinanet_xla.config import load_config
    from retinanet_xla.data.splits import dataset_split

    path, images_dir = write_coco(tmp_path, [image(1), image(2)], [])
    config = load_config(overrides=[f"data.train.annotations={path}", f"data.train.images={images_dir}"])
    with pytest.raises(DatasetError, match=r"instances.json: no usable boxes in any image \(run 'retinanet-xla data check'"):
        dataset_split(config, "train", tmp_path)
    report = check_dataset(path, images_dir)
    assert not report.ok and "no usable boxes in any image: 1" in "\n".join(report.lines())


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


def test_only_jpeg_and_png_are_decoded_whatever_the_file_name(tmp_path):
    disguised = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(disguised, format="BMP")
    with pytest.raises(UnreadableImage, match=r"photo.jpg: not a JPEG or PNG image"):
        read_rgb(disguised)
    eps = tmp_path / "vector.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(UnreadableImage, match="not a JPEG or PNG image"):
        read_rgb(eps)


def test_the_pixel_count_is_refused_from_the_header_before_decoding(tmp_path, monkeypatch):
    from retinanet_xla.data import image_io

    path = tmp_path / "large.png"
    Image.new("L", (300, 200)).save(path)
    monkeypatch.setattr(image_io, "MAX_PIXELS", 50_000)
    with pytest.raises(UnreadableImage, match=r"large.png: 300x200 pixels, more than the 50,000 allowed \(data.max_pixels\)"):
        read_rgb(path)
    assert read_rgb(path, max_pixels=60_000).size == (300, 200)  # the config's limit wins
    with pytest.raises(UnreadableImage, match=r"more than the 59,999 allowed"):
        read_rgb(path, max_pixels=59_999)


def test_sixteen_bit_png_keeps_its_top_byte(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 256, 65535, 40000]], dtype=np.uint16)).save(path)
    assert np.asarray(read_rgb(path))[0, :, 0].tolist() == [0, 1, 255, 156]


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
