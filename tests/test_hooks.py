"""The training loop's periodic work, without a device."""

import logging

import pytest

from retinanet_xla.training.hooks import Cadence, CompileWatch, DivergenceCheck, ProfileWindow, Throughput


def test_cadence_logs_checkpoints_and_evaluates_on_schedule():
    cadence = Cadence(first=1, last=12, log_every=4, checkpoint_every=6, eval_every=5, replicas=2)
    plans = {step: cadence.plan(step) for step in range(1, 13)}
    assert [s for s, p in plans.items() if p.log] == [1, 4, 6, 8, 12]  # first, every 4th, and checkpoint steps
    assert [s for s, p in plans.items() if p.checkpoint] == [6, 12]  # and always the last
    assert [s for s, p in plans.items() if p.evaluate] == [5, 10, 12]
    assert [s for s, p in plans.items() if p.decide] == [1, 4, 6, 8, 12]  # replicas agree where the master reads
    assert [s for s, p in plans.items() if p.last] == [12]


def test_cadence_on_one_device_decides_at_every_step_and_resumes_mid_schedule():
    cadence = Cadence(first=7, last=9, log_every=100, checkpoint_every=100, eval_every=0)
    plans = [cadence.plan(step) for step in (7, 8, 9)]
    assert [p.decide for p in plans] == [True, True, True]
    assert [p.log for p in plans] == [True, False, True]  # the resumed run's first step logs
    assert not any(p.evaluate for p in plans)


def test_compile_watch_counts_warmup_and_the_first_evaluation_and_warns_once(caplog):
    count = [3]
    watch = CompileWatch(lambda: count[0])
    assert watch.after_warmup() == 0
    assert watch.warmed_up() == 3

    def evaluate():
        count[0] += 2  # the evaluation graphs

    watch.also_warmup(evaluate)
    assert watch.after_warmup() == 0
    with caplog.at_level(logging.WARNING):
        watch.check(10)
        count[0] += 1
        watch.check(20)
        count[0] += 1
        watch.check(30)
    assert watch.after_warmup() == 2
    warnings = [r.getMessage() for r in caplog.records if "after warm-up" in r.getMessage()]
    assert warnings == ["1 new XLA compilation(s) after warm-up (by step 20): the step graph changed"]


def test_profile_window_starts_and_stops_once_and_closes_an_open_trace():
    events = []
    window = ProfileWindow([3, 4], 10, lambda: events.append("start"), lambda: events.append("stop"))
    closed = []
    for step in range(1, 7):
        window.before(step)
        closed.append(window.after(step))
    window.close()
    assert events == ["start", "stop"] and closed == [False, False, False, True, False, False]

    events.clear()
    cut = ProfileWindow([3, 40], 5, lambda: events.append("start"), lambda: events.append("stop"))
    cut.before(3)
    assert not cut.after(3)
    assert cut.after(5)  # the run's last step closes it
    assert events == ["start", "stop"]

    events.clear()
    failed = ProfileWindow([2, 8], 10, lambda: events.append("start"), lambda: events.append("stop"))
    failed.before(2)
    failed.close()  # the run ended inside the window
    failed.close()
    assert events == ["start", "stop"]
    ProfileWindow(None, 10, lambda: events.append("never"), lambda: events.append("never")).before(1)
    assert "never" not in events


def test_divergence_check_remembers_the_first_non_finite_step():
    check = DivergenceCheck()
    assert check.observe(1, {"loss": 2.0}) and not check.diverged
    assert not check.observe(5, {"loss": float("nan")})
    assert not check.observe(6, {"loss": float("inf")})
    assert check.diverged and check.step == 5


def test_throughput_is_images_per_second_between_log_steps():
    now = [0.0]
    throughput = Throughput(batch_size=8, clock=lambda: now[0])
    assert throughput.rate(1) is None
    now[0] = 2.0
    assert throughput.rate(5) == pytest.approx(4 * 8 / 2.0)


def test_throughput_leaves_out_evaluation_and_checkpoint_time():
    now = [0.0]
    throughput = Throughput(batch_size=8, clock=lambda: now[0])
    throughput.rate(4)
    now[0] = 10.0  # 4 steps of 1 s, then a 6 s evaluation
    throughput.exclude(6.0)
    assert throughput.rate(8) == pytest.approx(4 * 8 / 4.0)
    now[0] = 12.0  # the exclusion was used up by the window it fell in
    assert throughput.rate(10) == pytest.approx(2 * 8 / 2.0)
