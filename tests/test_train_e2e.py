"""End to end through the real CLI on the CPU XLA device: a tiny model, a few steps."""

import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet_xla.config import load_config
from retinanet_xla.rundir.checkpoint import load_checkpoint, save_checkpoint
from tests.browser import screenshot
from tests.cli_helpers import ROOT, SCRIPT, run_cli, train_command

pytestmark = pytest.mark.xla

STEPS = [
    "train.eval_every=6",
    "train.ema_decay=0.9",
    "train.steps=12",
    "train.log_every=4",
    "train.checkpoint_every=6",
    "runtime.profile_steps=[4,5]",
]


def run_train(output: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``train ... > log.txt``, as a user keeps a run's output: its stdout is that file's text."""
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    log = output.parent / f"{output.name}-log.txt"
    with open(log, "w") as stdout:
        result = subprocess.run(
            train_command(output, *STEPS, *extra), stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout, env=env
        )
    result.stdout = log.read_text()
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output = tmp_path_factory.mktemp("train")
    result = run_train(output)
    return output, result


def test_training_run_succeeds_without_recompiling(trained):
    output, result = trained
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["images"] == 48
    assert summary["compilations_after_warmup"] == 0
    assert 1 <= summary["compilations_total"] <= 3
    assert summary["images_per_second"] > 0 and summary["wall_seconds"] > summary["first_step_seconds"] > 0
    assert summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    assert 0.0 <= summary["device_wait_fraction"] < 1.0
    # Utilisation against this CPU's own matmul, measured in the run: the tiny model's FLOPs
    # at 64 px (about 1/4 of smoke's 4 GFLOP at 128 px, with a smaller FPN and head).
    assert 0.3e9 < summary["train_flops_per_image"] < 1.5e9
    assert summary["peak_source"].startswith("measured: 2048x2048 fp32 matmul on this CPU")
    utilisation = summary["achieved_tflops_per_device"] / summary["peak_tflops_per_device"]
    assert summary["utilisation"] == pytest.approx(utilisation, abs=1e-4)  # reported to 4 decimals
    assert summary["achieved_tflops_per_device"] == pytest.approx(
        summary["images_per_second"] * summary["train_flops_per_image"] / 1e12, rel=0.01
    )
    assert [line for line in result.stderr.splitlines() if "WARNING" in line] == []
    # Output to a file: one plain line per log step in it, and where TensorBoard is.
    plain = [line for line in result.stdout.splitlines() if line.startswith("step ") and "/12  loss " in line]
    assert [line.split("/")[0] for line in plain] == ["step 1", "step 4", "step 6", "step 8", "step 12"]
    assert "ETA 0:" in plain[-2] and " img/s" in plain[-1] and "(cls " in plain[0]
    assert "% of peak)" in plain[-1]
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    rated = [row for row in rows if "images_per_second" in row]
    assert rated and all(0 < row["utilisation"] and row["tflops_per_second_per_device"] > 0 for row in rated)
    assert f"TensorBoard: tensorboard --logdir {output / 'tensorboard'}" in result.stdout


def test_the_profiler_traced_the_configured_steps(trained):
    output, result = trained
    assert f"profiled steps 4-5: open {output / 'tensorboard'}" in result.stdout
    (trace,) = (output / "tensorboard" / "plugins" / "profile").glob("*/*.trace.json.gz")
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    names = [event.get("name", "") for event in events]
    assert names.count("StepMarker") >= 2  # the two traced steps' graph launches
    assert (trace.parent / trace.name.replace(".trace.json.gz", ".xplane.pb")).is_file()  # what TensorBoard opens


def test_the_data_had_varied_sizes_and_empty_images(trained):
    output, _ = trained
    data = json.loads((output / "synthetic" / "annotations" / "instances_train.json").read_text())
    counts = {image["id"]: 0 for image in data["images"]}
    for annotation in data["annotations"]:
        counts[annotation["image_id"]] += 1
    assert 0 in counts.values() and max(counts.values()) >= 4
    assert len({(image["width"], image["height"]) for image in data["images"]}) > 10


def test_outputs_checkpoints_and_logs(trained):
    output, _ = trained
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert checkpoints == ["best.pt", "step_00000006.pt", "step_00000012.pt"]
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "eval" not in line]
    eval_lines = [line for line in lines if "eval" in line]
    assert [line["step"] for line in train_lines] == [1, 4, 6, 8, 12]  # log steps, and checkpoint steps (6)
    assert all({"loss", "cls_loss", "box_loss", "lr", "grad_norm"} <= set(line) for line in train_lines)
    assert [line["step"] for line in eval_lines] == [6, 12]
    assert all(0.0 <= line["eval"]["AP50"] <= 1.0 for line in eval_lines)
    assert all(set(line["eval"]["per_category_AP"]) == {"rectangle", "ellipse", "triangle", "cross"} for line in eval_lines)
    best = load_checkpoint(output / "checkpoints" / "best.pt")
    best_step = max(eval_lines, key=lambda line: line["eval"]["AP"])["step"]
    assert best["step"] == best_step
    assert any((output / "tensorboard").iterdir())
    assert "train:" in (output / "config.yaml").read_text()

    checkpoint = load_checkpoint(output / "checkpoints" / "step_00000012.pt")
    assert checkpoint["step"] == 12
    config = load_config(base=checkpoint["config"])
    assert config.train.steps == 12 and config.data.image_size == [64, 64]
    assert checkpoint["category_mapping"]["category_ids"] == [1, 2, 3, 4]
    earlier = load_checkpoint(output / "checkpoints" / "step_00000006.pt")
    weight = "head.classification_head.cls_logits.weight"
    assert not torch.equal(checkpoint["model"][weight], earlier["model"][weight])  # it trained
    assert len(checkpoint["optimizer"]["momentum_buffers"]) > 0
    # The weight average is saved beside the weights, and differs from them.
    assert set(checkpoint["ema"]) == set(checkpoint["model"])
    assert not torch.equal(checkpoint["ema"][weight], checkpoint["model"][weight])


def test_eval_command_metrics_equal_pycocotools_and_cover_every_image_once(trained, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    output, _ = trained
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    args = [
        str(SCRIPT),
        "eval",
        str(output / "checkpoints" / "step_00000012.pt"),
        "--output",
        str(tmp_path),
        "--set",
        "eval.score_threshold=0.0",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = [line for line in result.stdout.splitlines() if line.startswith(" Average")]
    assert len(summary) == 12
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["weights"] == "ema"
    detections = json.loads((tmp_path / "detections.json").read_text())

    annotations = output / "synthetic" / "annotations" / "instances_val.json"
    gt = COCO(str(annotations))
    evaluator = COCOeval(gt, gt.loadRes(str(tmp_path / "detections.json")), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    for name, value in zip(names, evaluator.stats):
        assert metrics[name] == pytest.approx(value, abs=1e-9), name
    assert summary[0].endswith(f"= {evaluator.stats[0]:0.3f}")

    # 7 images in batches of 4: the last batch is padded; no image dropped or counted twice.
    per_image = {}
    for detection in detections:
        per_image[detection["image_id"]] = per_image.get(detection["image_id"], 0) + 1
    assert sorted(per_image) == sorted(gt.getImgIds()) and metrics["images"] == 7
    assert set(per_image.values()) == {100}  # eval.max_detections, not twice that


def test_predict_draws_and_writes_detections(trained, tmp_path):
    output, _ = trained
    val = output / "synthetic" / "val"
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    args = [
        str(SCRIPT),
        "predict",
        str(output),
        str(val / "000001.jpg"),
        str(val),
        "--output",
        str(tmp_path / "pred"),
        "--score-threshold",
        "0.0",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert len(written["images"]) == 1 + 7  # the file, then the directory's 7 images
    # The file given twice (alone and in its directory) is drawn twice, under two names.
    assert [entry["picture"] for entry in written["images"][:3]] == ["000001.png", "000001-2.png", "000002.png"]
    assert result.stdout.strip().splitlines()[-1].startswith("8 image(s), ")
    for entry in written["images"]:
        assert (tmp_path / "pred" / entry["picture"]).is_file()
        assert 0 < len(entry["detections"]) <= 100
        for detection in entry["detections"]:
            x, y, w, h = detection["bbox"]
            assert 0 <= x and 0 <= y and x + w <= entry["width"] + 1e-3 and y + h <= entry["height"] + 1e-3
            assert detection["category_name"] in {"rectangle", "ellipse", "triangle", "cross"}
    missing = subprocess.run(
        [str(SCRIPT), "predict", str(output), str(tmp_path / "nope.jpg"), "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: {tmp_path / 'nope.jpg'}: no such image or directory"


def eval_and_predict(capsys, monkeypatch, run, output, *overrides):
    """Detections of ``eval RUN`` and ``predict RUN VAL_DIR`` at the same score threshold, per
    val image file name: ``(x, y, w, h, score)`` as each command writes them."""
    settings = [item for override in ("eval.score_threshold=0.0", *overrides) for item in ("--set", override)]
    evaluated = run_cli(capsys, monkeypatch, "eval", run, "--output", output / "eval", *settings)
    assert evaluated.exit_code == 0, evaluated.stderr[-3000:]
    predicted = run_cli(
        capsys,
        monkeypatch,
        "predict",
        run,
        run / "synthetic" / "val",
        "--output",
        output / "pred",
        "--score-threshold",
        "0.0",
        *settings,
    )
    assert predicted.exit_code == 0, predicted.stderr[-3000:]
    names = {
        image["id"]: image["file_name"]
        for image in json.loads((run / "synthetic/annotations/instances_val.json").read_text())["images"]
    }
    from_eval = {}
    for detection in json.loads((output / "eval" / "detections.json").read_text()):
        from_eval.setdefault(names[detection["image_id"]], []).append((*detection["bbox"], detection["score"]))
    written = json.loads((output / "pred" / "detections.json").read_text())
    from_predict = {
        Path(entry["file"]).name: [(*d["bbox"], d["score"]) for d in entry["detections"]] for entry in written["images"]
    }
    return json.loads((output / "eval" / "metrics.json").read_text()), written, from_eval, from_predict


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_eval_and_predict_give_the_same_boxes_and_scores(trained, tmp_path, capsys, monkeypatch, precision):
    """One inference path: the same model, precision and post-processing for both commands."""
    output, _ = trained
    _, _, from_eval, from_predict = eval_and_predict(capsys, monkeypatch, output, tmp_path, f"train.precision={precision}")
    assert len(from_predict) == 7 and sum(map(len, from_predict.values())) > 7
    for name, found in from_predict.items():
        expected = sorted(from_eval.get(name, []))
        assert [row[:4] for row in expected] == [row[:4] for row in sorted(found)], name  # boxes, to the written 0.01 px
        # Scores: eval writes 5 decimals, predict 4, from the same float.
        assert [row[4] for row in sorted(found)] == pytest.approx([row[4] for row in expected], abs=5.1e-5), name


def test_eval_predict_and_export_of_a_run_skip_an_unusable_newest_checkpoint(trained, tmp_path, capsys, monkeypatch, caplog):
    """The rule resume uses: a truncated newest checkpoint is reported and the one before it used."""
    output, _ = trained
    run = tmp_path / "run"
    shutil.copytree(output, run, ignore=shutil.ignore_patterns("tensorboard", "eval", "export"))
    newest = run / "checkpoints" / "step_00000013.pt"
    newest.write_bytes((run / "checkpoints" / "step_00000012.pt").read_bytes()[:5000])  # cut off mid-write
    metrics, written, _, _ = eval_and_predict(capsys, monkeypatch, run, tmp_path)
    valid = str(run / "checkpoints" / "step_00000012.pt")
    assert metrics["checkpoint"] == valid and metrics["step"] == 12
    assert written["checkpoint"] == valid
    exported = run_cli(capsys, monkeypatch, "export", run, "--format", "torchscript")
    assert exported.exit_code == 0, exported.stderr[-3000:]
    skipped = [record.getMessage() for record in caplog.records if "skipping unusable checkpoint" in record.getMessage()]
    assert len(skipped) == 3 and all(str(newest) in message for message in skipped)  # eval, predict, export
    assert (run / "export" / "step_00000012" / "model.torchscript.pt").is_file()


def test_checkpoints_with_forged_fields_or_wrong_shapes_are_one_line_for_eval_predict_and_export(
    trained, tmp_path, capsys, monkeypatch
):
    """A checksum does not make a file ours: something else may have written a valid one."""
    output, _ = trained
    payload = load_checkpoint(output / "checkpoints" / "step_00000012.pt")
    name = "backbone.body.conv1.weight"
    shapes = {**payload, "model": {**payload["model"], name: torch.zeros(3, 3)}}
    shapes.pop("ema", None)
    save_checkpoint(tmp_path / "shapes.pt", shapes)
    save_checkpoint(tmp_path / "forged.pt", {**payload, "config": 5})
    mapping = payload["category_mapping"]
    save_checkpoint(tmp_path / "names.pt", {**payload, "category_mapping": {**mapping, "names": list(mapping["names"].values())}})
    huge = json.loads(json.dumps(payload["config"]))
    huge["model"]["num_classes"] = 10**9  # a head of 20 TB
    save_checkpoint(tmp_path / "classes.pt", {**payload, "config": huge})
    torch.save(payload, tmp_path / "unsummed.pt")  # every field ours, no checksum
    images = output / "synthetic" / "val"
    expected = {
        "shapes.pt": f"its weights do not fit the model its config describes (size mismatch for {name}: copying a param with "
        "shape torch.Size([3, 3]) from checkpoint, the shape in current model is torch.Size([64, 3, 7, 7]).)",
        "forged.pt": "field 'config' is int, not a dict; not a retinanet-xla checkpoint",
        "names.pt": "field 'category_mapping': names must map category ids (as text) to names; not a retinanet-xla checkpoint",
        "classes.pt": "model.num_classes must be in 1..10000, got 1000000000",
        "unsummed.pt": "checkpoint has no sha256 checksum; not a file retinanet-xla wrote",
    }
    for file, message in expected.items():
        for command in (["eval"], ["predict", images, "--output", tmp_path / "predict"], ["export"]):
            result = run_cli(capsys, monkeypatch, command[0], tmp_path / file, *command[1:])
            assert result.exit_code == 2 and "Traceback" not in result.stderr, (command, result.stderr[-3000:])
            last = result.stderr.strip().splitlines()[-1]
            assert last.startswith("error: ") and str(tmp_path / file) in last and last.endswith(message), (command, last)
    # An output that cannot be written is named before the evaluation, not after it.
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    result = run_cli(capsys, monkeypatch, "eval", output, "--output", blocked / "eval")
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1] == (
        f"error: {blocked / 'eval'}: cannot write there (Not a directory)"
    )


def test_eval_and_predict_refuse_a_batch_too_large_for_the_machine_in_one_line(trained, tmp_path, capsys, monkeypatch):
    output, _ = trained
    too_large = ["--set", "data.image_size=[4096,4096]", "--set", "eval.batch_size=512"]
    images = output / "synthetic" / "val"
    for command in (["eval", output, *too_large], ["predict", output, images, "--output", tmp_path / "p", *too_large]):
        result = run_cli(capsys, monkeypatch, *command)
        assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("error: data.image_size [4096, 4096] with 512 image(s) per batch needs at least ")
        assert line.endswith("GiB is available: lower data.image_size or eval.batch_size (--set)")


def test_the_predictor_finds_in_each_images_own_pixels_whatever_form_it_comes_in(trained, tmp_path, monkeypatch, capsys):
    """``retinanet_xla.Predictor`` on a non-square photo, as a path, PIL image, array and tensor:
    the same detections, inside the photo, equal to what ``predict`` writes for it; and the
    README's snippet runs as written."""
    import numpy as np
    from PIL import Image

    from retinanet_xla import Predictor

    output, _ = trained
    val = output / "synthetic" / "val"
    source = Image.open(sorted(val.iterdir())[0]).convert("RGB")
    photo = tmp_path / "photo.jpg"
    source.resize((source.width * 2, source.height)).save(photo, quality=95)  # non-square
    predictor = Predictor.load(output, device="cpu", score_threshold=0.001)  # 12 steps: weak scores
    by_path = predictor(photo)
    pixels = np.array(Image.open(photo).convert("RGB"))
    others = predictor([Image.open(photo), pixels, torch.from_numpy(pixels).permute(2, 0, 1)])
    for found in others:
        np.testing.assert_allclose(found.boxes, by_path.boxes, atol=1e-3)
        assert found.names == by_path.names
    width, height = Image.open(photo).size
    assert len(by_path.boxes) > 0 and (by_path.boxes[:, 2] <= width).all() and (by_path.boxes[:, 3] <= height).all()
    assert set(by_path.names) <= set(predictor.names) == {"rectangle", "ellipse", "triangle", "cross"}
    written = run_cli(
        capsys,
        monkeypatch,
        "predict",
        output,
        photo,
        "--output",
        tmp_path / "p",
        "--score-threshold",
        "0.001",
        "--set",
        "runtime.device=cpu",
    )
    assert written.exit_code == 0, written.stderr[-3000:]
    entries = json.loads((tmp_path / "p" / "detections.json").read_text())["images"][0]["detections"]
    np.testing.assert_allclose([entry["bbox"][0] for entry in entries], by_path.boxes[:, 0], atol=0.01)
    snippet = (ROOT / "README.md").read_text().split("## Python API")[1].split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(output)
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(predictor.names)


def test_predict_says_what_it_could_not_read_and_refuses_nothing_to_read(trained, tmp_path, capsys, monkeypatch):
    output, _ = trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "..jpg").write_bytes((output / "synthetic" / "val" / "000001.jpg").read_bytes())  # a name that was special
    (inputs / "broken.png").write_bytes(b"not a png")
    result = run_cli(capsys, monkeypatch, "predict", output, inputs, "--output", tmp_path / "pred")
    assert result.exit_code == 2 and "Traceback" not in result.stderr  # the input's fault: a user's mistake
    assert result.stdout.strip().splitlines()[-1].startswith("2 image(s), ") and ", 1 unreadable; wrote " in result.stdout
    assert result.stderr.strip().splitlines() == [f"error: unreadable image: {inputs / 'broken.png'}: not a JPEG or PNG image"]
    written = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert [entry.get("picture") for entry in written["images"]] == ["image.png", None]
    assert (tmp_path / "pred" / "image.png").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = run_cli(capsys, monkeypatch, "predict", output, empty, "--output", tmp_path / "none")
    assert nothing.exit_code == 2 and nothing.stderr.strip() == f"error: {empty}: no .jpg/.jpeg/.png images to predict on"
    assert not (tmp_path / "none").exists()


def test_eval_on_data_whose_categories_differ_from_training_is_one_line(trained, tmp_path, capsys, monkeypatch):
    """The model would score its classes against other ones (AP 0.000) without a word."""
    output, _ = trained
    data = json.loads((output / "synthetic" / "annotations" / "instances_val.json").read_text())
    checkpoint = output / "checkpoints" / "step_00000012.pt"
    renamed = {**data, "categories": [{**c, "name": "dog"} if c["id"] == 3 else c for c in data["categories"]]}
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    args = ["eval", checkpoint, "--images", output / "synthetic" / "val", "--output", tmp_path / "eval", "--data"]
    result = run_cli(capsys, monkeypatch, *args, tmp_path / "renamed.json")
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"error: {tmp_path / 'renamed.json'}: category 3 is 'dog' here but 'triangle' in the training set of {checkpoint} "
        "(1 categories differ)"
    )
    extra = {**data, "categories": [*data["categories"], {"id": 9, "name": "boat"}]}
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    result = run_cli(capsys, monkeypatch, *args, tmp_path / "extra.json")
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"error: model.num_classes is 4 but {tmp_path / 'extra.json'} needs 5 with data.label_mapping contiguous"
    )
    assert not (tmp_path / "eval").exists()


def test_fine_tuning_from_a_run_on_other_classes_then_resuming_ignores_init_from(trained, tmp_path, capsys, monkeypatch):
    """Two of the four shapes, one of them under a new name, started from the trained run."""
    output, _ = trained
    source = json.loads((output / "synthetic" / "annotations" / "instances_train.json").read_text())
    kept = {2: "oval", 4: "cross"}
    subset = {
        "images": source["images"],
        "annotations": [a for a in source["annotations"] if a["category_id"] in kept],
        "categories": [{"id": i, "name": name} for i, name in kept.items()],
    }
    (tmp_path / "subset.json").write_text(json.dumps(subset))
    images = output / "synthetic" / "train"
    settings = [
        f"data.train.annotations={tmp_path / 'subset.json'}",
        f"data.train.images={images}",
        "model.num_classes=2",
        f"model.init_from={output}",
        "model.init_class_map={oval: ellipse, cross: 4}",
        "model.trainable=[backbone, head]",  # a trained BatchNorm: its loaded step counters are all equal
        "train.steps=2",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.eval_every=0",
    ]
    run = tmp_path / "finetune"
    result = run_cli(capsys, monkeypatch, *train_command(run, *settings)[1:])
    assert result.exit_code == 0, result.stderr[-3000:]
    newest = load_checkpoint(output / "checkpoints" / "step_00000012.pt")
    line = next(line for line in result.stdout.splitlines() if line.startswith("init_from "))
    assert line.startswith(f"init_from {output}: loaded ") and line.endswith(
        "classes carried over: oval <- ellipse, cross <- cross"
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["compilations_after_warmup"] == 0 and summary["steps"] == 2
    tuned = load_checkpoint(run / "checkpoints" / "step_00000002.pt")["model"]
    fpn = "backbone.fpn.layer_blocks.0.0.weight"
    assert torch.equal(tuned[fpn], newest["ema"][fpn])  # loaded (from the weight average) and frozen
    body = "backbone.body.layer1.0.conv1.weight"
    assert not torch.equal(tuned[body], newest["ema"][body])
    assert not torch.equal(tuned["head.regression_head.bbox_reg.weight"], newest["ema"]["head.regression_head.bbox_reg.weight"])
    again = run_cli(capsys, monkeypatch, *train_command(run, *settings, "train.steps=3")[1:])
    assert again.exit_code == 0, again.stderr[-3000:]
    assert f"model.init_from {output} ignored: resuming from {run / 'checkpoints' / 'step_00000002.pt'}" in again.stdout


def test_the_run_ends_with_a_report_a_browser_shows(trained, tmp_path):
    output, result = trained
    page = output / "report" / "index.html"
    printed = result.stdout[result.stdout.index("\n{\n") :]  # the summary, after the run's lines
    assert json.loads(printed)["report"] == str(page) and page.is_file()
    for name in ("loss.png", "lr.png", "images_per_second.png", "ap.png", "predictions.png"):
        picture = np.asarray(Image.open(output / "report" / name).convert("L"), dtype=np.float32)
        assert picture.std() > 10, f"{name} is blank"  # lines, text, images: not one colour
    grid = Image.open(output / "report" / "predictions.png")
    assert grid.width == 2 * 256 + 3 * 8 and grid.height > 7 * 64  # ground truth | detections, one row per val image
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 5 and 'src="http' not in text  # self-contained
    assert f"detections of {output / 'checkpoints' / 'step_00000012.pt'}" in text

    shot = screenshot(page, tmp_path / "report.png")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape == (1600, 1280, 3)
    not_white = (pixels.min(axis=2) < 200).mean()
    assert 0.01 < not_white < 0.9 and pixels.std() > 10, (not_white, pixels.std())  # a page with pictures on it (blank: 0)
    if os.environ.get("RETINANET_XLA_REPORT_SCREENSHOT"):  # how docs/images/report.png is made
        shutil.copy(shot, os.environ["RETINANET_XLA_REPORT_SCREENSHOT"])


def test_predict_draws_ground_truth_beside_the_detections(trained, tmp_path, capsys, monkeypatch):
    output, _ = trained
    val = output / "synthetic" / "val"
    annotations = output / "synthetic" / "annotations" / "instances_val.json"
    result = run_cli(capsys, monkeypatch, "predict", output, val, "--output", tmp_path / "pred", "--ground-truth", annotations)
    assert result.exit_code == 0, result.stderr
    written = json.loads((tmp_path / "pred" / "detections.json").read_text())
    boxes_per_file = {}
    coco = json.loads(annotations.read_text())
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    for annotation in coco["annotations"]:
        boxes_per_file[names[annotation["image_id"]]] = boxes_per_file.get(names[annotation["image_id"]], 0) + 1
    for entry in written["images"]:
        assert entry["ground_truth_boxes"] == boxes_per_file.get(Path(entry["file"]).name, 0)
        picture = Image.open(tmp_path / "pred" / entry["picture"])
        assert picture.size == (2 * entry["width"] + 8, entry["height"])  # ground truth | detections


def test_eval_of_a_run_puts_its_metrics_in_the_runs_report(trained, tmp_path, capsys, monkeypatch):
    """As in make demo: a run trained without evaluating, then `eval RUN`: its report shows the AP."""
    output, _ = trained
    run = tmp_path / "run"
    shutil.copytree(output, run, ignore=shutil.ignore_patterns("tensorboard", "eval", "export"))
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(row + "\n" for row in rows if '"eval"' not in row))
    assert "AP (step" not in run_cli(capsys, monkeypatch, "report", run).stdout + (run / "report" / "index.html").read_text()
    evaluated = run_cli(capsys, monkeypatch, "eval", run, "--set", "runtime.device=cpu")
    assert evaluated.exit_code == 0, evaluated.stderr[-3000:]
    metrics = json.loads((run / "eval" / "step_00000012" / "metrics.json").read_text())
    assert f"<th>AP (step 12)</th><td>{metrics['AP']:.3f}</td>" in (run / "report" / "index.html").read_text()
