"""Evaluation during training, scored in a background process while training goes on, through
the real CLI on CPU XLA: the metrics of every evaluation land once, equal to a synchronous
evaluation of the same checkpoint; a stop while a scoring is pending loses nothing; a scoring
process that dies is replaced and its work done in the training process."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest

from retinanet_xla.rundir.checkpoint import load_checkpoint
from tests.cli_helpers import EVALUATING, SCRIPT, train_command

pytestmark = pytest.mark.xla

ENV = {**os.environ, "PJRT_DEVICE": "CPU"}
OVERLAP = ["train.steps=60", *EVALUATING]


def eval_rows(output: Path) -> List[Dict]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "eval" in row]


def start(output: Path, log: Path, *extra: str) -> subprocess.Popen:
    """``train ... > log``: plain lines, one per log step, read by the test as they come."""
    with open(log, "w") as stdout:
        return subprocess.Popen(
            train_command(output, *OVERLAP, *extra), stdout=stdout, stderr=subprocess.PIPE, text=True, env=ENV
        )


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{text!r} never appeared in {log}"
        time.sleep(0.005)


def scoring_workers(ancestor: int) -> List[int]:
    """The processes under ``ancestor`` started by multiprocessing's spawn (the scorer; the
    data loader's workers are forked and the run uses none here)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found = []
    for pid in parents:
        chain, node = [], pid
        while node in parents and node != ancestor:
            chain.append(node)
            node = parents[node]
        if node == ancestor:
            try:
                if b"spawn_main" in (Path("/proc") / str(pid) / "cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def overlapped(tmp_path_factory):
    output = tmp_path_factory.mktemp("overlap")
    log = output.parent / "overlap-log.txt"
    process = start(output, log)
    _, stderr = process.communicate(timeout=900)
    return output, process.returncode, log.read_text(), stderr


def test_every_evaluation_lands_once_while_training_goes_on(overlapped):
    output, code, stdout, stderr = overlapped
    assert code == 0, stderr[-3000:]
    assert [row["step"] for row in eval_rows(output)] == [20, 40, 60]
    for step in (20, 40, 60):
        assert f"step {step}: evaluated, scoring " in stdout and f"step {step}: eval AP " in stdout
    summary = json.loads((output / "summary.json").read_text())
    assert summary["eval"] == {k: v for k, v in eval_rows(output)[-1]["eval"].items() if k != "per_category_AP"}
    assert "WARNING" not in stderr


def test_background_metrics_equal_a_synchronous_eval_of_each_checkpoint(overlapped, tmp_path):
    output, code, _, stderr = overlapped
    assert code == 0, stderr[-3000:]
    rows = {row["step"]: row["eval"] for row in eval_rows(output)}
    assert rows[20]["AR100"] > 0  # detections to score at every evaluation: equality means something
    for step in (20, 40, 60):
        result = subprocess.run(
            [str(SCRIPT), "eval", str(output / "checkpoints" / f"step_{step:08d}.pt"), "--output", str(tmp_path / str(step))],
            capture_output=True,
            text=True,
            timeout=600,
            env=ENV,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        synchronous = json.loads((tmp_path / str(step) / "metrics.json").read_text())
        assert {k: synchronous[k] for k in rows[step]} == rows[step], step


def test_best_checkpoint_holds_the_weights_of_the_best_evaluated_step(overlapped):
    output, code, _, stderr = overlapped
    assert code == 0, stderr[-3000:]
    rows = {row["step"]: row["eval"]["AP"] for row in eval_rows(output)}
    best_step = max(rows, key=lambda step: (rows[step], -step))  # the first of equals: only a higher AP replaces
    best = load_checkpoint(output / "checkpoints" / "best.pt")
    same_step = load_checkpoint(output / "checkpoints" / f"step_{best_step:08d}.pt")
    assert best["step"] == best_step and best["best_ap"] == rows[best_step]
    assert all((best["model"][k] == v).all() for k, v in same_step["model"].items())


def test_a_stop_while_a_scoring_is_pending_loses_nothing_and_resumes_without_repeats(tmp_path):
    output, log = tmp_path / "run", tmp_path / "log.txt"
    # 400 validation images: a scoring of seconds, against the next step's tenth of a second.
    process = start(output, log, "data.synthetic.val_images=400")
    wait_for_line(log, "step 20: evaluated, scoring ", process)  # handed to the scorer; its AP not yet logged
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "waiting for the background scoring of step 20" in log.read_text()  # it was pending at the stop
    stopped_rows = eval_rows(output)
    assert [row["step"] for row in stopped_rows] == [20]  # scored before the run ended
    (stopped_at,) = [p for p in (output / "checkpoints").glob("step_*.pt") if p.name != "step_00000020.pt"] or [
        output / "checkpoints" / "step_00000020.pt"
    ]
    assert load_checkpoint(stopped_at)["best_ap"] == stopped_rows[0]["eval"]["AP"]

    resumed = start(output, tmp_path / "resumed.txt", "data.synthetic.val_images=400")
    _, stderr = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, stderr[-3000:]
    rows = eval_rows(output)
    assert [row["step"] for row in rows] == [20, 40, 60]  # none twice, none lost
    assert rows[0] == stopped_rows[0]


def test_a_scoring_process_that_dies_is_replaced_and_nothing_is_lost(tmp_path):
    output, log = tmp_path / "run", tmp_path / "log.txt"
    process = start(output, log, "data.num_workers=0")
    wait_for_line(log, "step 20: evaluated, scoring ", process)
    deadline = time.monotonic() + 60
    while not (workers := scoring_workers(process.pid)):
        assert time.monotonic() < deadline and process.poll() is None, "no scoring process found"
        time.sleep(0.01)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]
    assert [row["step"] for row in eval_rows(output)] == [20, 40, 60]
    died = [line for line in stderr.splitlines() if "the background scoring process died" in line]
    # The scoring it held (step 20) or the next one it could not take (step 40), done here;
    # the worker started after it scores the rest.
    assert len(died) == 1 and ("evaluation of step 20 " in died[0] or "evaluation of step 40 " in died[0]), stderr[-3000:]


def test_a_kill_while_the_checkpoints_evaluation_is_scored_is_evaluated_again_on_resume(tmp_path):
    output, log = tmp_path / "run", tmp_path / "log.txt"
    process = start(output, log, "data.synthetic.val_images=400", "data.num_workers=0")
    wait_for_line(log, "step 20: evaluated, scoring ", process)  # checkpoint 20 is saved before its evaluation
    workers = scoring_workers(process.pid)
    process.kill()
    process.communicate(timeout=60)
    assert eval_rows(output) == []  # its scoring never landed
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() for pid in workers):  # the orphaned scorer ends too
        assert time.monotonic() < deadline, f"scoring process(es) {workers} outlived the killed run"
        time.sleep(0.1)

    resumed_log = tmp_path / "resumed.txt"
    resumed = start(output, resumed_log, "data.synthetic.val_images=400", "data.num_workers=0")
    _, stderr = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "resuming from" in stderr and "(step 20)" in stderr
    assert "step 20: evaluated, scoring " in resumed_log.read_text()
    assert [row["step"] for row in eval_rows(output)] == [20, 40, 60]
