"""The README's TPU commands, in their CPU-XLA form: the reference recipe ``configs/640-3x.yaml``
(ResNet-50, bf16, cross-replica BatchNorm) trained, evaluated and exported exactly as written
there, from a working directory holding ``coco/`` in the COCO 2017 layout. Only the input size,
batch, step counts and the ImageNet weights file (not downloadable here) are overridden."""

import json
import math

import pytest
import torch

from retinanet_xla.data.synthetic import write_synthetic_dataset
from retinanet_xla.rundir.checkpoint import load_checkpoint
from tests.cli_helpers import ROOT, run_cli

pytestmark = pytest.mark.xla

SMALL = [
    "data.image_size=[64,64]",
    "data.num_workers=1",
    "train.batch_size=2",
    "eval.batch_size=2",
    "model.backbone.weights=null",
    "runtime.num_devices=1",
]
TRAIN = ["train.steps=2", "train.log_every=1", "train.checkpoint_every=2"]


def write_coco_2017(root):
    """The synthetic shapes under the names the config expects (raw category ids 1-4 < 91)."""
    write_synthetic_dataset(root, num_train=6, num_val=3, seed=5)
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}.json").rename(root / "annotations" / f"instances_{split}2017.json")
        (root / split).rename(root / f"{split}2017")


def with_overrides(*args, overrides=SMALL):
    return [*args, *[item for override in overrides for item in ("--set", override)]]


def test_train_eval_and_export_of_the_reference_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_coco_2017(tmp_path / "coco")
    config = str(ROOT / "configs" / "640-3x.yaml")

    train = run_cli(capsys, monkeypatch, *with_overrides("train", config, "--output", "runs/640-3x", overrides=SMALL + TRAIN))
    assert train.exit_code == 0, train.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/640-3x/summary.json").read_text())
    assert summary["steps"] == 2 and summary["compilations_after_warmup"] == 0
    assert math.isfinite(summary["final_loss"])
    state = load_checkpoint(tmp_path / "runs/640-3x/checkpoints/step_00000002.pt")["model"]
    # bf16 compute, float32 weights and BatchNorm statistics (docs/architecture.md, "Precision").
    assert {tensor.dtype for key, tensor in state.items() if not key.endswith("num_batches_tracked")} == {torch.float32}
    assert state["backbone.body.layer2.0.bn1.num_batches_tracked"].item() == 2  # trained, cross-replica BN

    evaluate = run_cli(capsys, monkeypatch, *with_overrides("eval", "runs/640-3x"))
    assert evaluate.exit_code == 0, evaluate.stderr[-3000:]
    assert evaluate.stdout.count(" Average Precision") == 6
    metrics = json.loads(next((tmp_path / "runs/640-3x/eval").glob("*/metrics.json")).read_text())
    assert metrics["images"] == 3 and len(metrics["summary"]) == 12

    export = run_cli(capsys, monkeypatch, "export", "runs/640-3x", "--format", "exported-program")
    assert export.exit_code == 0, export.stderr[-3000:]
    assert list((tmp_path / "runs/640-3x/export").glob("*/*.pt2"))
