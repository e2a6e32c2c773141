"""The training step's memory bound (training/memory.py): the meta-device count is what a real
forward pass produces, and an input size and batch that cannot fit are one line before any step."""

import torch
from torch import nn

from retinanet_xla.config import load_config
from retinanet_xla.device.runtime import host_memory_bytes
from retinanet_xla.models import build_model
from retinanet_xla.models.footprint import activation_bytes
from tests.cli_helpers import ROOT, TINY, run_cli, set_options


def test_the_meta_count_is_the_real_forward_pass_convolution_outputs():
    config = load_config(ROOT / "configs" / "smoke.yaml", [*TINY, "model.backbone.weights=null"])
    model = build_model(config)
    outputs = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: outputs.append(o.numel())) for m in model.modules() if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        model(torch.zeros(2, 3, 96, 64))
    for hook in hooks:
        hook.remove()
    assert activation_bytes(model, 2, (96, 64), "fp32") == 4 * sum(outputs) > 0
    assert activation_bytes(model, 2, (96, 64), "bf16") == 2 * sum(outputs)
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model itself is left alone


def test_host_memory_is_read_from_meminfo_and_shared(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   16777216 kB\n")
    assert host_memory_bytes(1, meminfo) == 16 * 2**30 and host_memory_bytes(4, meminfo) == 4 * 2**30
    assert host_memory_bytes(1, tmp_path / "none") is None


def test_an_input_too_large_for_the_machine_is_refused_before_the_first_step(tmp_path, capsys, monkeypatch):
    overrides = ["data.image_size=[4096,4096]", "train.batch_size=64", "runtime.device=cpu", "model.backbone.weights=null"]
    result = run_cli(
        capsys,
        monkeypatch,
        "train",
        ROOT / "configs" / "smoke.yaml",
        "--output",
        tmp_path / "run",
        *set_options(overrides),
    )
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: data.image_size [4096, 4096] with 64 image(s) per replica needs at least ")
    assert line.endswith("GiB is available to each replica: lower data.image_size or train.batch_size")
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_a_max_boxes_whose_matcher_tables_cannot_fit_is_refused_before_the_first_step(tmp_path, capsys, monkeypatch):
    """The anchor matcher compares every anchor with every box slot: [batch, anchors, max_boxes]."""
    overrides = ["data.max_boxes=100000", "train.batch_size=64", "runtime.device=cpu", "data.synthetic.train_images=64"]
    result = run_cli(
        capsys, monkeypatch, "train", ROOT / "configs" / "smoke.yaml", "--output", tmp_path / "run", *set_options(overrides)
    )
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: data.max_boxes 100000 with 64 image(s) of [128, 128] per replica needs at least ")
    anchors = (16**2 + 8**2 + 4**2 + 2**2 + 1) * 9  # P3-P7 at 128 px, 9 anchors a place
    assert f"GiB for the training step ({2 * 4 * 64 * anchors * 100000 / 2**30:.1f} GiB of it the anchor matcher's" in line
    assert line.endswith("lower data.max_boxes (or drop the images with that many boxes), data.image_size or train.batch_size")
    assert not (tmp_path / "run" / "checkpoints").exists()
