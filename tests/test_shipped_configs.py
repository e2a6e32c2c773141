"""Every file in ``configs/`` runs its own training step: its precision, normalisation, backbone,
loss, matcher and schedule, through the real ``bench`` command on CPU XLA. Only the input size,
the batch and the ImageNet weights file (not downloadable here) are overridden, so a new config
file is covered without anyone remembering to add it."""

import json
import math

import pytest

from tests.cli_helpers import ROOT, run_cli

pytestmark = pytest.mark.xla

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SMALL = ["data.image_size=[64,64]", "train.batch_size=2", "model.backbone.weights=null", "runtime.num_devices=1"]


def test_the_configs_folder_is_not_empty():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_every_shipped_config_trains_two_steps(config, tmp_path, capsys, monkeypatch):
    args = ["bench", str(config), "--steps", "2", "--json", str(tmp_path / "bench.json")]
    for override in SMALL:
        args += ["--set", override]
    result = run_cli(capsys, monkeypatch, *args)
    assert result.exit_code == 0, result.stderr[-3000:]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert math.isfinite(bench["final_loss"]) and bench["final_loss"] > 0
    assert bench["compilations_after_warmup"] == 0
    # The host's time per step call is measured, and on XLA it is tracing only: less than the step.
    assert 0 < bench["trace_seconds"] <= bench["step_seconds"] and bench["trace_seconds_spread"] >= 0
    assert f"host {bench['trace_seconds'] * 1000:.1f} +- " in result.stdout
    assert bench["image_size"] == [64, 64] and bench["batch_size"] == 2  # the overrides reached the step
