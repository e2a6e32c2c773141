"""Export: the in-graph post-processing equals the host one, and every format, written through
the real CLI, gives the in-package detections."""

import json
import os
import subprocess

import pytest
import torch

from retinanet_xla.config import load_config
from retinanet_xla.data.coco import CategoryMapping
from retinanet_xla.export.detector import fixed_size_detections
from retinanet_xla.export.formats import FORMATS, Exported, run_exported
from retinanet_xla.models import build_model
from retinanet_xla.ops.postprocess import Candidates, PostprocessConfig, filter_detections
from retinanet_xla.rundir.checkpoint import save_checkpoint
from tests.cli_helpers import ROOT, SCRIPT, run_cli


def random_candidates(seed: int, count: int = 300, num_classes: int = 4) -> Candidates:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(count, 2, generator=generator) * 60
    sizes = torch.rand(count, 2, generator=generator) * 30
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1).clamp(0, 64)
    boxes[::17, 2] = boxes[::17, 0]  # some without area
    scores = torch.rand(count, generator=generator).sort(descending=True).values
    return Candidates(boxes, scores, torch.randint(0, num_classes, (count,), generator=generator))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold,per_class,total", [(0.3, 3, 10), (0.05, 100, 50), (0.99, 100, 100)])
def test_in_graph_post_processing_equals_the_host_path(seed, threshold, per_class, total):
    config = PostprocessConfig(
        pre_nms_top_k=300, score_threshold=threshold, nms_iou=0.5, max_detections_per_class=per_class, max_detections=total
    )
    found = random_candidates(seed)
    (expected,) = filter_detections(Candidates(*(t[None] for t in found)), config)
    boxes, scores, labels, count = fixed_size_detections(found, config, num_classes=4)
    assert boxes.shape == (total, 4) and scores.shape == labels.shape == (total,)
    assert int(count) == len(expected.scores) <= total
    torch.testing.assert_close(boxes[:count], expected.boxes)
    torch.testing.assert_close(scores[:count], expected.scores)
    assert torch.equal(labels[:count], expected.labels)
    assert (labels[count:] == -1).all() and (scores[count:] == 0).all() and (boxes[count:] == 0).all()
    if per_class < total:
        assert max(torch.bincount(labels[:count]).tolist()) == per_class  # the cap bit


EXPORT_SETTINGS = [
    "data.image_size=[64,64]",
    "data.synthetic.train_images=8",
    "data.synthetic.val_images=3",
    "model.fpn_channels=32",
    "model.head.convs=1",
    "eval.pre_nms_top_k=400",
    "eval.max_detections=30",
    "eval.max_detections_per_class=10",
    "eval.score_threshold=0.0",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained smoke-sized model. Its classifier is widened so that scores spread out like a
    trained model's: at initialisation they all sit near the prior 0.01, and near-ties would
    reorder between runtimes."""
    run = tmp_path_factory.mktemp("export_run")
    config = load_config(ROOT / "configs" / "smoke.yaml", EXPORT_SETTINGS)
    torch.manual_seed(0)
    weights = build_model(config).state_dict()
    weights["head.classification_head.cls_logits.weight"].normal_(0.0, 0.5)
    mapping = CategoryMapping("contiguous", [1, 2, 3, 4], {1: "rectangle", 2: "ellipse", 3: "triangle", 4: "cross"})
    path = run / "checkpoints" / "step_00000001.pt"
    save_checkpoint(path, {"step": 1, "model": weights, "config": config.to_dict(), "category_mapping": mapping.to_dict()})
    return path


@pytest.mark.parametrize("fmt", [*FORMATS[:-1], pytest.param("stablehlo", marks=pytest.mark.xla)])
def test_every_format_matches_the_package_through_the_cli(fmt, checkpoint, tmp_path, capsys, monkeypatch):
    result = run_cli(
        capsys, monkeypatch, "export", checkpoint, "--format", fmt, "--output", tmp_path, "--batch-size", "2", "--check"
    )
    assert result.exit_code == 0, result.stdout + result.stderr[-3000:]
    assert "check on 2 validation image(s): 0 count and 0 label mismatches" in result.stdout
    name = {
        "onnx": "model.onnx",
        "torchscript": "model.torchscript.pt",
        "exported-program": "model.pt2",
        "stablehlo": "stablehlo",
    }[fmt]
    metadata = json.loads((tmp_path / f"{name}.json").read_text())
    assert metadata["inputs"]["images"] == {**metadata["inputs"]["images"], "shape": [2, 3, 64, 64], "dtype": "uint8"}
    assert [c["name"] for c in metadata["categories"]] == ["rectangle", "ellipse", "triangle", "cross"]
    assert metadata["post_processing"]["in_graph"] == (fmt != "stablehlo")
    with_nms = fmt != "stablehlo"
    outputs = run_exported(
        Exported(fmt, tmp_path / name, tmp_path / f"{name}.json", with_nms),
        torch.zeros(2, 3, 64, 64, dtype=torch.uint8),
        torch.tensor([[64, 64], [32, 64]]),
    )
    if with_nms:
        boxes, scores, labels, count = outputs
        assert boxes.shape == (2, 30, 4) and scores.shape == labels.shape == (2, 30) and count.shape == (2,)
        assert (count <= 30).all() and (boxes[1, : int(count[1]), 3] <= 32).all()  # clipped to the content
    else:
        assert [tuple(t.shape) for t in outputs] == [(2, 400, 4), (2, 400), (2, 400)]
        assert (tmp_path / "stablehlo" / "functions").is_dir()  # torch_xla's StableHLO bundle layout


def test_an_unknown_format_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    result = run_cli(capsys, monkeypatch, "export", checkpoint, "--format", "tflite", "--output", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --format tflite: expected one of onnx, torchscript, exported-program, stablehlo"


def test_the_onnxruntime_snippet_in_the_docs_runs(checkpoint, tmp_path, capsys, monkeypatch):
    """docs/export.md's serving code, on an exported model and a validation image."""
    result = run_cli(capsys, monkeypatch, "export", checkpoint, "--format", "onnx", "--output", tmp_path, "--batch-size", "2")
    assert result.exit_code == 0, result.stderr[-3000:]
    text = (ROOT / "docs" / "export.md").read_text()
    snippet = text.split("```python\n")[1].split("```")[0]
    image = _write_image(tmp_path)
    snippet = snippet.replace('"runs/demo/export/step_00000800/model.onnx"', repr(str(tmp_path / "model.onnx")))
    snippet = snippet.replace('"runs/demo/synthetic/val/000001.jpg"', repr(str(image)))
    capsys.readouterr()
    exec(compile(snippet, "docs/export.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert 1 <= len(printed) <= 30
    assert all(line.split()[0] in {"rectangle", "ellipse", "triangle", "cross"} for line in printed)


def _write_image(directory):
    from PIL import Image

    path = directory / "image.jpg"  # not square: the letterbox pads it
    Image.new("RGB", (80, 50), (120, 30, 200)).save(path)
    return path


def test_onnx_export_without_the_export_extra_is_one_line_before_any_work(checkpoint, tmp_path):
    """onnx made unimportable (as in an install without the [export] extra): one line, exit 2,
    nothing written; the other formats need no extra."""
    missing = tmp_path / "site"
    (missing / "onnx").mkdir(parents=True)
    (missing / "onnx" / "__init__.py").write_text("raise ImportError('No module named onnx')\n")
    env = {**os.environ, "PYTHONPATH": f"{missing}{os.pathsep}{ROOT}", "PJRT_DEVICE": "CPU"}
    command = [str(SCRIPT), "export", str(checkpoint), "--format", "onnx", "--output", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        result.stderr.strip()
        == "error: export --format onnx needs onnx, which is not installed: pip install 'retinanet-xla[export]'"
    )
    assert not (tmp_path / "out").exists()
