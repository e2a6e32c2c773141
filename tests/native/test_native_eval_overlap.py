"""Evaluation during a native CPU training run: scored in the background, the same metrics as
a synchronous ``eval`` of each checkpoint (tests/test_eval_overlap_e2e.py does the same and
more on CPU XLA)."""

import json

import pytest

from tests.cli_helpers import EVALUATING, train_command
from tests.native.helpers import cli

pytestmark = pytest.mark.native

OVERLAP = ["runtime.device=cpu", "train.steps=40", *EVALUATING]


def test_background_metrics_equal_a_synchronous_eval_on_native_cpu(tmp_path):
    output = tmp_path / "run"
    trained = cli(*train_command(output, *OVERLAP)[1:])
    assert trained.returncode == 0, trained.stderr[-3000:]
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    logged = {row["step"]: row["eval"] for row in rows if "eval" in row}
    assert sorted(logged) == [20, 40] and logged[20]["AR100"] > 0
    assert "step 20: evaluated, scoring " in trained.stdout
    for step in (20, 40):
        evaluated = cli("eval", output / "checkpoints" / f"step_{step:08d}.pt", "--output", tmp_path / str(step))
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        synchronous = json.loads((tmp_path / str(step) / "metrics.json").read_text())
        assert {k: synchronous[k] for k in logged[step]} == logged[step], step
