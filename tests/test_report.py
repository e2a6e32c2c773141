"""``retinanet-xla report`` without a model: the curves of a log, and the one-line refusals."""

import json

import numpy as np
from PIL import Image

from tests.cli_helpers import run_cli


def test_a_run_without_checkpoints_still_gets_its_curves(tmp_path, capsys, monkeypatch):
    rows = [{"step": s, "loss": 5.0 / s, "cls_loss": 1.0 / s, "lr": 0.01, "images_per_second": 20.0 + s} for s in range(1, 9)]
    rows.append({"step": 8, "eval": {"AP": 0.25, "AP50": 0.5, "per_category_AP": {"cat": 0.3, "dog": -1.0}}})
    rows.append({"step": 9, "loss": "nan"})  # a non-finite value is logged as text: left out
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 10, "lo')
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 9, "images_per_second": 12.3456789, "final_loss": 0.41249999}))
    result = run_cli(capsys, monkeypatch, "report", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"wrote {tmp_path / 'report' / 'index.html'}"
    names = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert names == ["ap.png", "images_per_second.png", "index.html", "loss.png", "lr.png"]
    for name in (n for n in names if n.endswith(".png")):
        assert np.asarray(Image.open(tmp_path / "report" / name).convert("L")).std() > 10, name
    page = (tmp_path / "report" / "index.html").read_text()
    assert "No prediction grid: " in page and "no usable checkpoints" in page
    assert "<th>AP cat</th><td>0.300</td>" in page and "<th>AP dog</th><td>n/a</td>" in page
    assert "<th>images_per_second</th><td>12.35</td>" in page and "<th>final_loss</th><td>0.4125</td>" in page


def test_a_damaged_log_and_summary_still_give_a_report_of_what_is_readable(tmp_path, capsys, monkeypatch, caplog):
    """Lines of another shape (a list, NaN and Infinity, wrong types, nesting past any parser)
    are left out with a warning; the rows the run wrote are drawn."""
    good = [json.dumps({"step": s, "loss": 4.0 / s, "cls_loss": 1.0 / s, "lr": 0.01}) for s in range(1, 6)]
    damaged = [
        "[1, 2, 3]",
        '{"step": 6, "loss": NaN}',
        '{"step": 7, "loss": Infinity, "lr": -Infinity}',
        '{"step": "8", "loss": 1.0}',
        '{"step": 9, "loss": {"a": 1}, "lr": [0.1]}',
        '{"step": 10, "eval": "AP 0.5"}',
        '{"step": 11, "eval": {"AP": "0.5"}}',
        '{"step": 12, "eval": {"AP": 0.4, "AP50": 0.6, "per_category_AP": ["cat", 0.3]}}',
        "[" * 100_000 + "]" * 100_000,
        '{"step": true, "loss": 2.0}',
        "null",
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(good[:3] + damaged + good[3:]) + "\n")
    (tmp_path / "summary.json").write_text("[" * 100_000 + "]" * 100_000)
    result = run_cli(capsys, monkeypatch, "report", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "7 line(s) are not rows this program writes; left out of the report" in caplog.text
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<th>AP (step 12)</th><td>0.400</td>" in page  # the one evaluation row of our shape
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "ap.png",
        "images_per_second.png",
        "index.html",
        "loss.png",
        "lr.png",
    ]


def test_a_directory_that_is_not_a_run_is_one_line(tmp_path, capsys, monkeypatch):
    result = run_cli(capsys, monkeypatch, "report", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path}: no metrics.jsonl: not a run directory, or a run that logged nothing yet"


def test_the_report_shows_what_eval_wrote_for_steps_training_did_not_evaluate(tmp_path, capsys, monkeypatch):
    """make demo trains without periodic evaluation, then runs `eval RUN`: its AP is on the page."""
    rows = [{"step": s, "loss": 3.0 / s, "cls_loss": 1.0 / s, "lr": 0.01} for s in range(1, 5)]
    rows.append({"step": 2, "eval": {"AP": 0.1, "AP50": 0.2, "AP75": 0.05, "per_category_AP": {"cat": 0.1}}})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for step, ap in ((2, 0.9), (4, 0.456)):  # step 2: training's own evaluation wins
        (tmp_path / "eval" / f"step_{step:08d}").mkdir(parents=True)
        metrics = {"AP": ap, "AP50": 0.7, "AP75": 0.5, "per_category_AP": {"cat": 0.6}, "step": step, "summary": []}
        (tmp_path / "eval" / f"step_{step:08d}" / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "eval" / "odd").mkdir()
    (tmp_path / "eval" / "odd" / "metrics.json").write_text("{not json")
    result = run_cli(capsys, monkeypatch, "report", tmp_path)
    assert result.exit_code == 0, result.stderr
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<th>AP (step 4)</th><td>0.456</td>" in page and "<th>AP cat</th><td>0.600</td>" in page
    assert (tmp_path / "report" / "ap.png").is_file()
