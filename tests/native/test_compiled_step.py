"""The whole train step as one torch.compile graph on the CPU, through the real CLI: no graph
break, no recompilation after warm-up, and the losses of the eager step, with either optimizer."""

import json

import pytest

from tests.cli_helpers import train_command
from tests.native.helpers import cli, metrics

pytestmark = pytest.mark.native

STEPS = ["train.steps=4", "train.log_every=1", "train.grad_clip_norm=0.5", "train.ema_decay=0.9", "runtime.device=cpu"]
OPTIMIZERS = {
    "sgd": [],
    "adamw": ["train.optimizer.name=adamw", "train.schedule.base_lr=1.0e-3", "train.optimizer.weight_decay_norm_and_bias=false"],
}


@pytest.fixture(scope="module", params=sorted(OPTIMIZERS))
def runs(request, tmp_path_factory):
    outputs = {}
    for compiled in ("true", "false"):
        output = tmp_path_factory.mktemp(f"{request.param}_compile_{compiled}")
        result = cli(*train_command(output, *STEPS, *OPTIMIZERS[request.param], f"runtime.compile={compiled}")[1:])
        assert result.returncode == 0, result.stderr[-4000:]
        outputs[compiled] = output
    return outputs


def test_the_compiled_step_is_one_graph_compiled_once(runs):
    summary = json.loads((runs["true"] / "summary.json").read_text())
    assert summary["step_graph"] == "compiled"
    assert summary["graph_breaks"] == 0
    assert summary["compilations_total"] == 1 and summary["compilations_after_warmup"] == 0
    assert summary["compile_seconds"] > 0
    eager = json.loads((runs["false"] / "summary.json").read_text())
    assert eager["step_graph"] == "eager" and eager["compilations_total"] == 0


# Inductor fuses and reorders float32 sums, so the compiled step is not the eager one bit for
# bit. Measured here (2-core AMD EPYC, 2026-12-03): the losses of the 4 steps agree to 3.5e-6
# relative, the learning rates exactly. A step that lost something is far outside: without
# the gradient clipping, the eager losses of steps 3 and 4 move by 7.5e-4 and 1.1e-3.
LOSS_TOLERANCE = 1e-4


def test_the_compiled_step_follows_the_eager_step(runs):
    compiled, eager = metrics(runs["true"]), metrics(runs["false"])
    assert sorted(compiled) == sorted(eager) == [1, 2, 3, 4]
    for step in compiled:
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], rel=LOSS_TOLERANCE), step
        assert compiled[step]["lr"] == eager[step]["lr"], step


@pytest.mark.parametrize("runs", ["sgd"], indirect=True)
def test_compiled_evaluation_finds_the_eager_detections_with_one_graph(runs, tmp_path):
    """``runtime.compile`` compiles evaluation's forward pass too: one graph for every batch
    (the last one padded to the same shape), and the detections of the eager forward pass."""
    outputs = {}
    for compiled in ("true", "false"):
        output = tmp_path / f"compile_{compiled}"
        result = cli(
            "eval",
            runs["true"],
            "--output",
            output,
            "--set",
            "runtime.device=cpu",
            "--set",
            f"runtime.compile={compiled}",
            "--set",
            "eval.score_threshold=0.001",  # 4 steps from the prior leave every score near 0.01
        )
        assert result.returncode == 0, result.stderr[-4000:]
        outputs[compiled] = output
    compiled, eager = (json.loads((outputs[c] / "metrics.json").read_text()) for c in ("true", "false"))
    assert compiled["compilations"]["count"] == 1 and compiled["compilations"]["graph_breaks"] == 0
    assert eager["compilations"]["count"] == 0
    assert compiled["AP"] == pytest.approx(eager["AP"], abs=1e-3)
    found = {c: json.loads((outputs[c] / "detections.json").read_text()) for c in ("true", "false")}
    assert len(found["true"]) == len(found["false"]) > 0
    for detection in found["true"]:  # each compiled detection is an eager one, to float32 fusion noise
        assert any(
            (other["image_id"], other["category_id"]) == (detection["image_id"], detection["category_id"])
            and abs(other["score"] - detection["score"]) < 1e-3
            and max(abs(x - y) for x, y in zip(other["bbox"], detection["bbox"])) < 0.05
            for other in found["false"]
        ), detection
