"""The loop's periodic work, each one object of the same shape (detectron2's hooks, without a
registry): ``after_step(step, plan)`` once a step is launched and the replicas have agreed on
``plan.stop`` and ``plan.diverged``, in the order the loop lists them; ``close()`` however the
loop ends. What each does at a step is in ``plan`` (``hooks.Cadence``); none of them asks which
backend runs.

The order matters and is the loop's: warm-up bookkeeping, then the divergence stop (nothing is
written for a step whose loss is not finite), the log, the checkpoint, the evaluation, and last
the requested stop (after its checkpoint)."""

import logging
from typing import Callable, Dict, List, Optional

from retinanet_xla.device.feed import InputWait, Stopwatch, TimedBatches
from retinanet_xla.errors import RunFailed, RunStopped
from retinanet_xla.inference.scoring import BackgroundScoring, Scored
from retinanet_xla.rundir.checkpoint import host_snapshot
from retinanet_xla.training.flops import Utilisation, step_utilisation
from retinanet_xla.training.hooks import CompileWatch, DivergenceCheck, ProfileWindow, StepPlan, Throughput
from retinanet_xla.training.metrics_log import logged_evaluations
from retinanet_xla.training.setup import TrainingRun

logger = logging.getLogger(__name__)


class TrainingDiverged(RunFailed):
    """The loss became NaN or infinite."""


class TrainingInterrupted(RunStopped):
    """A stop was requested (SIGTERM/SIGINT); a checkpoint for the step reached was saved."""


class PeriodicWork:
    def after_step(self, step: int, plan: StepPlan) -> None:
        """What this work does once ``step`` is launched (nothing, at most steps)."""

    def close(self) -> None:
        """The loop ended (finished, stopped or failed)."""


class WarmUp(PeriodicWork):
    """Step 1's time and compilations (its graphs are warm-up), new compilations after it, and
    the profile window (``runtime.profile_steps``) it opens and closes around steps."""

    def __init__(self, run: TrainingRun, log, first: int, batches: TimedBatches):
        self.run, self.log, self.first, self.batches = run, log, first, batches
        self.clock = Stopwatch()  # the run's wall time, from the loop's start
        self.tensorboard = run.files.local / "tensorboard"
        self.profile = ProfileWindow(
            run.config.runtime.profile_steps if run.replicas.is_master else None,  # one trace per run
            run.config.train.steps,
            lambda: run.runtime.start_profile(self.tensorboard),
            run.runtime.stop_profile,
        )
        self.compiles = CompileWatch(lambda: run.runtime.compilations()["count"])
        self.first_step_seconds = 0.0
        self.warm_clock: Optional[Stopwatch] = None  # from the end of step 1
        self.input_wait: Optional[InputWait] = None

    def before_step(self, step: int) -> None:
        self.profile.before(step)

    def after_step(self, step: int, plan: StepPlan) -> None:
        if self.profile.after(step):
            self.log.message(f"profiled steps {self.profile.first}-{step}: open {self.tensorboard} in TensorBoard's profile tab")
        if step == self.first:
            self.run.runtime.wait()
            self.first_step_seconds = self.clock.seconds()
            compiled = self.compiles.warmed_up()
            self.warm_clock, self.input_wait = Stopwatch(), InputWait(self.run.runtime.device_seconds, self.batches)
            self.log.message(f"step {step} done in {self.first_step_seconds:.1f} s ({compiled} graphs compiled)")
        elif plan.log and self.run.replicas.is_master:
            self.compiles.check(step)

    def close(self) -> None:
        self.profile.close()  # stopped or failed inside the window: keep what was traced


class StepLog(PeriodicWork):
    """The master's values of each log step (``values``, from ``Runtime.on_step_end``), with
    the training rate and utilisation, into the metrics log; the progress bar at every step.
    Built before the input workers start: a CPU measures its peak then (``step_utilisation``;
    the master alone reports)."""

    def __init__(self, run: TrainingRun, log):
        self.run, self.log = run, log
        self.throughput = Throughput(run.config.train.batch_size, Stopwatch().seconds)
        self.utilisation: Optional[Utilisation] = step_utilisation(run.config, run.runtime) if run.replicas.is_master else None
        self.divergence = DivergenceCheck()

    def values(self, step: int, values: Dict[str, float]) -> None:
        if not self.divergence.observe(step, values):
            return  # the replicas agree to stop at this step; nothing non-finite is logged
        rate = self.throughput.rate(step)
        if rate is not None:
            values["images_per_second"] = rate
            report = self.utilisation.report(rate)  # the master's, as this call is
            for key, logged in (("achieved_tflops_per_device", "tflops_per_second_per_device"), ("utilisation", "utilisation")):
                if report[key] is not None:  # None: the model's FLOPs or the device's peak are not known
                    values[logged] = report[key]
        values["truncated_images"] = float(self.run.batches.truncated)
        values["unreadable_images"] = float(self.run.batches.unreadable)
        self.run.losses.setdefault("first", values["loss"])
        self.run.losses["final"] = values["loss"]
        self.log.write(step, values)

    def after_step(self, step: int, plan: StepPlan) -> None:
        self.log.advance(step)

    def close(self) -> None:
        self.log.close()


class Evaluation(PeriodicWork):
    """``train.eval_every``: every replica predicts its shard; the master hands the detections
    to a background scoring process and training goes on. The metrics land at a later step
    boundary (``take``), into the log and, for a new best AP, ``best.pt`` (the evaluated
    step's state, copied to the host when it was evaluated)."""

    def __init__(self, run: TrainingRun, log, compiles: CompileWatch, throughput: Throughput):
        self.run, self.log, self.compiles, self.throughput = run, log, compiles, throughput
        self.scoring: Optional[BackgroundScoring] = None  # the master's
        self.evaluated = False  # an evaluation ran: its graphs are compiled

    def start(self) -> None:
        if self.run.evaluator is not None and self.run.replicas.is_master:
            self.scoring = self.run.evaluator.background_scoring()
            self.scoring.start()  # reads the ground truth while step 1 compiles

    def after_step(self, step: int, plan: StepPlan) -> None:
        paused = Stopwatch()
        self.take()
        if plan.evaluate:
            self.evaluate(step)
        self.throughput.exclude(paused.seconds())

    def redo_lost(self) -> None:
        """A run killed while the evaluation of its last checkpoint's step was being scored
        never logged it, and the resumed loop starts after that step: the restored state is
        that step's, so it is evaluated again now (once: a logged evaluation is not redone)."""
        step, c = self.run.start_step, self.run.config.train
        if self.run.evaluator is None or step == 0 or (step % c.eval_every and step != c.steps):
            return
        lost = self.run.replicas.is_master and step not in logged_evaluations(self.run.files.local / "metrics.jsonl")
        if self.run.replicas.from_master(int(lost)) == 1:  # every replica evaluates its shard
            self.evaluate(step)

    def evaluate(self, step: int) -> None:
        if self.evaluated:
            self._predict(step)
        else:  # compiling the evaluation graphs is warm-up too
            self.evaluated = True
            self.compiles.also_warmup(lambda: self._predict(step))

    def _predict(self, step: int) -> None:
        detections = self.run.evaluator.predict(self.run.step_fn.state.inference_model)
        if detections is None:  # not the master
            return
        self.log.message(f"step {step}: evaluated, scoring {len(detections)} detections in the background")
        self._record(self.scoring.submit(step, detections, host_snapshot(self.run.payload(step))))

    def take(self, wait: bool = False) -> None:
        """The master's finished scorings, logged (``wait``: every one in flight)."""
        if self.scoring is None:
            return
        running = self.scoring.running() if wait else []
        if running:  # says why the run pauses here
            self.log.message(f"waiting for the background scoring of step {', '.join(map(str, running))}")
        self._record(self.scoring.finished(wait=wait))

    def _record(self, scored: List[Scored]) -> None:
        for done in scored:
            metrics = done.result["metrics"]
            self.log.write_eval(done.step, metrics)
            self.run.last_eval = {k: v for k, v in metrics.items() if isinstance(v, float)}
            if metrics["AP"] > self.run.best_ap:
                self.run.best_ap = metrics["AP"]
                self.run.checkpoints.save_best({**done.context, "best_ap": self.run.best_ap})

    def close(self) -> None:
        if self.scoring is not None:
            self.scoring.close()  # only a failed run leaves scorings here


class Checkpoints(PeriodicWork):
    """``train.checkpoint_every``, the last step and a stop: the master writes (every replica
    holds the same weights), after the logs it uploads (a checkpoint in a bucket means its logs
    are there too) and every scoring in flight (its best AP is in the checkpoint); the others
    wait for it on the host, not inside the next step's all-reduce."""

    def __init__(self, run: TrainingRun, evaluation: Evaluation, throughput: Throughput, upload_logs: Callable[[], None]):
        self.run, self.evaluation, self.throughput, self.upload_logs = run, evaluation, throughput, upload_logs

    def after_step(self, step: int, plan: StepPlan) -> None:
        if not (plan.checkpoint or plan.stop):
            return
        paused = Stopwatch()
        self.evaluation.take(wait=True)
        if self.run.replicas.is_master:
            self.upload_logs()
            self.run.last_checkpoint = self.run.checkpoints.save(step, self.run.payload(step))
        self.run.replicas.barrier()
        if not self.run.replicas.is_master:  # written by the master by now: every replica can name it
            self.run.last_checkpoint = self.run.checkpoints.step_path(step)
        self.throughput.exclude(paused.seconds())


class StopWhenDiverged(PeriodicWork):
    """A log step whose values were not all finite, on any replica: every replica stops, with
    the evaluations before it logged and no checkpoint of it written."""

    def __init__(self, run: TrainingRun, evaluation: Evaluation, divergence: DivergenceCheck):
        self.run, self.evaluation, self.divergence = run, evaluation, divergence

    def after_step(self, step: int, plan: StepPlan) -> None:
        if plan.diverged:
            self.evaluation.take(wait=True)  # the evaluations before it stand
            raise TrainingDiverged(
                f"the loss is not finite at step {self.divergence.step or step}; stopping "
                f"(last good checkpoint: {self.run.last_checkpoint or 'none'})"
            )


class StopWhenAsked(PeriodicWork):
    """SIGTERM/SIGINT or the STOP file (``PreemptionGuard``), on any replica: every replica
    stops after the step's checkpoint, with every scoring in flight logged."""

    def __init__(self, run: TrainingRun, evaluation: Evaluation, reason: Callable[[], Optional[str]]):
        self.run, self.evaluation, self.reason = run, evaluation, reason

    def after_step(self, step: int, plan: StepPlan) -> None:
        if plan.stop and not plan.last:
            self.evaluation.take(wait=True)  # nothing scored is lost by the stop
            raise TrainingInterrupted(
                f"stopped {self.reason() or 'because another replica was asked to'} at step {step}; "
                f"saved {self.run.last_checkpoint}; run the same command again to resume"
            )
