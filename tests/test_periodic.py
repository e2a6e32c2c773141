"""The loop's periodic work (training/periodic.py), each object on its own, with a run whose
device, checkpoints and scoring are stand-ins: what each does at a step, in which order, and
what it leaves in the run."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from retinanet_xla.config import load_config
from retinanet_xla.errors import EXIT_FAILED, EXIT_INTERRUPTED
from retinanet_xla.inference.scoring import Scored
from retinanet_xla.training.hooks import StepPlan, Throughput
from retinanet_xla.training.periodic import (
    Checkpoints,
    Evaluation,
    StepLog,
    StopWhenAsked,
    StopWhenDiverged,
    TrainingDiverged,
    TrainingInterrupted,
)

ROOT = Path(__file__).resolve().parent.parent


def plan(**flags) -> StepPlan:
    return StepPlan(**{"log": False, "decide": True, "checkpoint": False, "evaluate": False, "last": False, **flags})


class Replicas:
    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world, self.barriers = rank, world, 0

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        self.barriers += 1

    def from_master(self, value: int) -> int:
        return value


class CheckpointFiles:
    def __init__(self, calls):
        self.calls = calls

    def save(self, step, payload):
        self.calls.append(("save", step, payload["step"]))
        return f"checkpoints/step_{step:08d}.pt"

    def save_best(self, payload):
        self.calls.append(("best", payload["step"], payload["best_ap"]))

    def step_path(self, step):
        return f"checkpoints/step_{step:08d}.pt"


def fake_run(tmp_path, calls, replicas=None, **settings):
    config = load_config(ROOT / "configs" / "smoke.yaml", ["runtime.peak_tflops=2.0", *settings.get("overrides", [])])
    return SimpleNamespace(
        config=config,
        replicas=replicas or Replicas(),
        runtime=SimpleNamespace(replicas=replicas or Replicas()),
        checkpoints=CheckpointFiles(calls),
        files=SimpleNamespace(local=tmp_path, push=lambda: calls.append(("upload",))),
        payload=lambda step: {"step": step},
        batches=SimpleNamespace(truncated=3, unreadable=1),
        losses={},
        best_ap=float("-inf"),
        last_eval=None,
        last_checkpoint=None,
        start_step=settings.get("start_step", 0),
        evaluator=settings.get("evaluator"),
    )


class Scorings:
    """What ``Evaluation`` takes from its background scoring: finished results, in order."""

    def __init__(self, calls):
        self.calls, self.done, self.in_flight = calls, [], []

    def running(self):
        return list(self.in_flight)

    def finished(self, wait=False):
        self.calls.append(("take", wait))
        done, self.done = self.done, []
        if wait:
            self.in_flight = []
        return done


def scored(step, ap):
    return Scored(step, {"metrics": {"AP": ap, "AP50": ap + 0.1, "per_category": {}}}, {"step": step})


class Log:
    def __init__(self):
        self.rows, self.evals, self.messages, self.advanced = [], [], [], []

    def write(self, step, values):
        self.rows.append((step, dict(values)))

    def write_eval(self, step, metrics):
        self.evals.append((step, metrics["AP"]))

    def message(self, text):
        self.messages.append(text)

    def advance(self, step):
        self.advanced.append(step)

    def close(self):
        pass


def test_checkpoints_wait_for_scorings_then_upload_logs_then_save_at_checkpoint_and_stop_steps(tmp_path):
    calls = []
    run = fake_run(tmp_path, calls)
    evaluation = SimpleNamespace(take=lambda wait=False: calls.append(("take", wait)))
    throughput = Throughput(4, lambda: 0.0)
    work = Checkpoints(run, evaluation, throughput, run.files.push)
    work.after_step(3, plan())
    assert calls == [] and run.last_checkpoint is None  # not a checkpoint step
    work.after_step(4, plan(checkpoint=True))
    work.after_step(5, plan(stop=True))
    assert calls == [("take", True), ("upload",), ("save", 4, 4), ("take", True), ("upload",), ("save", 5, 5)]
    assert run.last_checkpoint == "checkpoints/step_00000005.pt"
    assert run.replicas.barriers == 2  # the other replicas wait on the host for the master's write


def test_checkpoints_on_another_replica_write_nothing_wait_for_the_master_and_name_its_file(tmp_path):
    calls = []
    run = fake_run(tmp_path, calls, replicas=Replicas(rank=1, world=2))
    evaluation = SimpleNamespace(take=lambda wait=False: calls.append(("take", wait)))
    Checkpoints(run, evaluation, Throughput(4, lambda: 0.0), run.files.push).after_step(4, plan(checkpoint=True))
    assert calls == [("take", True)] and run.replicas.barriers == 1
    assert run.last_checkpoint == "checkpoints/step_00000004.pt"  # what a stop message names on every replica


def test_a_divergence_stops_after_the_pending_scorings_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    calls = []
    run = fake_run(tmp_path, calls)
    run.last_checkpoint = "checkpoints/step_00000010.pt"
    divergence = SimpleNamespace(step=12)
    work = StopWhenDiverged(run, SimpleNamespace(take=lambda wait=False: calls.append(("take", wait))), divergence)
    work.after_step(12, plan(log=True))
    assert calls == []
    with pytest.raises(TrainingDiverged) as raised:
        work.after_step(14, plan(log=True, diverged=True))
    assert str(raised.value) == (
        "the loss is not finite at step 12; stopping (last good checkpoint: checkpoints/step_00000010.pt)"
    )
    assert raised.value.exit_code == EXIT_FAILED and calls == [("take", True)]


def test_a_requested_stop_ends_the_run_with_exit_75_except_at_the_last_step(tmp_path):
    calls = []
    run = fake_run(tmp_path, calls)
    run.last_checkpoint = "checkpoints/step_00000007.pt"
    work = StopWhenAsked(run, SimpleNamespace(take=lambda wait=False: calls.append(("take", wait))), lambda: "by SIGTERM")
    work.after_step(6, plan())
    work.after_step(20, plan(stop=True, last=True))  # the run is over anyway: it ends normally
    assert calls == []
    with pytest.raises(TrainingInterrupted) as raised:
        work.after_step(7, plan(stop=True))
    assert str(raised.value) == (
        "stopped by SIGTERM at step 7; saved checkpoints/step_00000007.pt; run the same command again to resume"
    )
    assert raised.value.exit_code == EXIT_INTERRUPTED and calls == [("take", True)]


def test_the_step_log_writes_finite_values_with_rate_and_utilisation_and_flags_the_first_non_finite(tmp_path):
    run = fake_run(tmp_path, [])
    log, now = Log(), [0.0]
    step_log = StepLog(run, log)
    step_log.throughput = Throughput(run.config.train.batch_size, lambda: now[0])
    step_log.values(1, {"loss": 2.0})
    now[0] = 2.0
    step_log.values(5, {"loss": 1.5})
    step_log.values(9, {"loss": math.nan})
    step_log.values(10, {"loss": math.inf})
    assert [step for step, _ in log.rows] == [1, 5]  # nothing non-finite is logged
    first, fifth = log.rows[0][1], log.rows[1][1]
    assert "images_per_second" not in first  # no rate before a second log step
    rate = 4 * run.config.train.batch_size / 2.0
    assert fifth["images_per_second"] == pytest.approx(rate)
    flops = step_log.utilisation.flops_per_image
    assert fifth["tflops_per_second_per_device"] == pytest.approx(rate * flops / 1e12, rel=1e-4)
    assert fifth["utilisation"] == pytest.approx(rate * flops / 1e12 / 2.0, abs=1e-4)  # runtime.peak_tflops 2.0
    assert fifth["truncated_images"] == 3.0 and fifth["unreadable_images"] == 1.0
    assert run.losses == {"first": 2.0, "final": 1.5}
    assert step_log.divergence.diverged and step_log.divergence.step == 9
    step_log.after_step(10, plan())
    assert log.advanced == [10]


def test_evaluation_logs_every_scoring_and_writes_best_pt_only_for_a_better_ap(tmp_path):
    calls = []
    run = fake_run(tmp_path, calls, overrides=["train.eval_every=10"])
    log = Log()
    evaluation = Evaluation(run, log, compiles=None, throughput=Throughput(4, lambda: 0.0))
    evaluation.scoring = scorings = Scorings(calls)
    scorings.done = [scored(10, 0.2), scored(20, 0.1)]
    evaluation.after_step(21, plan())
    scorings.done, scorings.in_flight = [scored(30, 0.3)], [30]
    evaluation.take(wait=True)
    assert log.evals == [(10, 0.2), (20, 0.1), (30, 0.3)]
    assert [call for call in calls if call[0] == "best"] == [("best", 10, 0.2), ("best", 30, 0.3)]
    assert run.best_ap == 0.3 and run.last_eval == {"AP": 0.3, "AP50": pytest.approx(0.4)}
    assert log.messages == ["waiting for the background scoring of step 30"]


def test_evaluation_redoes_a_lost_evaluation_once_and_never_one_that_was_logged(tmp_path):
    run = fake_run(tmp_path, [], overrides=["train.eval_every=10"], start_step=20, evaluator=object())
    evaluation = Evaluation(run, Log(), compiles=None, throughput=Throughput(4, lambda: 0.0))
    evaluated = []
    evaluation.evaluate = evaluated.append
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "eval": {"AP": 0.1}}\n')
    evaluation.redo_lost()
    assert evaluated == [20]  # step 20's evaluation was never logged
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "eval": {"AP": 0.1}}\n{"step": 20, "eval": {"AP": 0.2}}\n')
    evaluation.redo_lost()
    run.start_step = 25  # not an evaluation step
    evaluation.redo_lost()
    assert evaluated == [20]
