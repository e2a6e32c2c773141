"""``retinanet-xla train``: build everything from the config, resume if a checkpoint exists,
then one loop over steps.

Periodic work (logging, checkpoints, evaluation) happens at step boundaries; values reach the
host only at log steps (``Runtime.on_step_end``), so the host does not wait for the device on
the other steps. With several replicas, this is one replica's loop (docs/tpu.md).
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from rich.console import Console

from retinanet_xla import storage
from retinanet_xla.config import Config, save_config
from retinanet_xla.data.splits import check_box_budget, dataset_split
from retinanet_xla.device.feed import InputWait, Stopwatch, TimedBatches
from retinanet_xla.device.runtime import Runtime
from retinanet_xla.distributed.preemption import PreemptionGuard, stop_file
from retinanet_xla.errors import CheckpointError, RunFailed, RunStopped
from retinanet_xla.inference.evaluator import Evaluator
from retinanet_xla.inference.scoring import BackgroundScoring, Scored
from retinanet_xla.rundir.checkpoint import host_snapshot, inference_weights, load_checkpoint
from retinanet_xla.rundir.directory import CheckpointDirectory
from retinanet_xla.storage import Location, StagedDirectory
from retinanet_xla.training.batches import train_batches
from retinanet_xla.training.build import build_train_step
from retinanet_xla.training.flops import Utilisation, step_utilisation
from retinanet_xla.training.hooks import Cadence, CompileWatch, DivergenceCheck, ProfileWindow, Throughput
from retinanet_xla.training.init_from import initialize_from
from retinanet_xla.training.metrics_log import MetricsLog, SilentLog, logged_evaluations
from retinanet_xla.training.summary import timing_summary

logger = logging.getLogger(__name__)
# What a checkpoint needs beyond what any checkpoint has (rundir.checkpoint.REQUIRED_KEYS) for
# training to continue exactly where it stopped.
RESUME_KEYS = ("optimizer", "loss", "torch_rng_state")
# The run's files that are not checkpoints. In a bucket they are written locally and uploaded
# after each checkpoint and at the end (``storage.StagedDirectory``): object stores cannot append.
STAGED_LOGS = ("metrics.jsonl", "tensorboard", "config.yaml", "summary.json")


class TrainingDiverged(RunFailed):
    """The loss became NaN or infinite."""


class TrainingInterrupted(RunStopped):
    """A stop was requested (SIGTERM/SIGINT); a checkpoint for the step reached was saved."""


class Trainer:
    """One replica's training loop (the only one, on a single device)."""

    def __init__(
        self, config: Config, runtime: Runtime, output_dir: Location, resume: bool = True, console: Optional[Console] = None
    ):
        self.config, self.runtime, self.output_dir = config, runtime, storage.location(output_dir)
        self.replicas = replicas = runtime.replicas
        self.run_files = StagedDirectory(self.output_dir)  # logs, config, summary; local when the output is
        local = self.run_files.local
        local.mkdir(parents=True, exist_ok=True)
        self.coco = dataset_split(config, "train", local)
        _, truncated = check_box_budget(self.coco, config.data.max_boxes)  # before anything is written
        if replicas.is_master:
            save_config(config, local / "config.yaml")
            if truncated:
                logger.warning(truncated)
        self.checkpoints = CheckpointDirectory(self.output_dir, config.train.keep_checkpoints)

        self.init_report: Optional[str] = None  # what model.init_from did, for the start of the log
        found = self._resume_point() if resume else None
        self.step_fn = build_train_step(config, runtime, self._initializer(found))
        self.start_step, self.best_ap = 0, float("-inf")
        if found is not None:
            self._restore(*found)

        self.counters = train_batches(config, self.coco, replicas, start_batch=self.start_step)
        self.num_images = len(self.coco.records)

        self.evaluator = None
        self.scoring: Optional[BackgroundScoring] = None  # the master's, while the loop runs
        if config.train.eval_every > 0:  # every replica evaluates its shard of the split
            val = dataset_split(config, "val", local)
            val.mapping = self.coco.mapping  # detections are written with the training set's ids
            self.evaluator = Evaluator(config, val, runtime, show_progress=False)

        self.console = console
        self.first_loss: Optional[float] = None
        self.last_loss: Optional[float] = None
        self.last_eval: Optional[Dict[str, float]] = None
        self.divergence = DivergenceCheck()
        self.last_checkpoint: Optional[Location] = None

    # -- state -------------------------------------------------------------------------------

    def _payload(self, step: int) -> Dict:
        s = self.step_fn
        return {
            "step": step,
            "model": s.model.state_dict(),
            "optimizer": s.optimizer.state_dict(),
            "loss": s.loss_fn.state_dict(),
            **({"ema": s.ema.model.state_dict()} if s.ema is not None else {}),
            "best_ap": self.best_ap,
            "torch_rng_state": torch.get_rng_state(),
            "config": self.config.to_dict(),
            "category_mapping": self.coco.mapping.to_dict(),
        }

    def _initializer(self, resuming: Optional[tuple]) -> Optional[Callable]:
        """``model.init_from`` for a fresh run; a run that resumes has its own weights."""
        source = self.config.model.init_from
        if source is None:
            return None
        if resuming is not None:
            self.init_report = f"model.init_from {source} ignored: resuming from {resuming[0]}"
            return None
        names = [self.coco.mapping.names.get(i, str(i)) for i in self.coco.mapping.category_ids]
        if self.coco.mapping.mode == "raw":  # label = category id: slots without a category are unnamed
            by_id = dict(zip(self.coco.mapping.category_ids, names))
            names = [by_id.get(label, f"(no category {label})") for label in range(self.config.model.num_classes)]

        def initialize(model) -> None:
            anchors = model.anchor_generator.num_anchors_per_location
            self.init_report = initialize_from(
                model, storage.location(source), names, self.config.model.init_class_map, anchors
            ).line()

        return initialize

    def _resume_point(self) -> Optional[Tuple[Location, Dict]]:
        """The newest valid checkpoint, as replica 0 sees it: every replica resumes from the one
        step it chose (two hosts listing a bucket a moment apart could otherwise disagree)."""
        found = self.checkpoints.newest_valid() if self.replicas.is_master else None
        if self.replicas.world == 1:
            return found
        step = self.replicas.from_master(found[1]["step"] if found else -1)
        if step < 0:
            return None
        if found is None:
            path = self.checkpoints.step_path(step)
            found = path, load_checkpoint(path)
        return found

    def _restore(self, path: Location, payload: Dict) -> None:
        missing = [key for key in RESUME_KEYS if key not in payload]
        if missing:
            raise CheckpointError(
                f"{path}: lacks {', '.join(missing)}, which resuming needs; use --no-resume with another --output"
            )
        s = self.step_fn
        try:
            s.model.load_state_dict(payload["model"])
            s.optimizer.load_state_dict(payload["optimizer"])
            s.loss_fn.load_state_dict(payload["loss"])
            if s.ema is not None:
                s.ema.model.load_state_dict(inference_weights(payload))
        except (RuntimeError, ValueError, KeyError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise CheckpointError(
                f"{path}: does not fit this config ({first_line}); use --no-resume or another --output"
            ) from None
        s.step.copy_(torch.tensor(payload["step"], dtype=torch.int64))
        torch.set_rng_state(payload["torch_rng_state"])
        self.start_step, self.best_ap = payload["step"], payload.get("best_ap", float("-inf"))
        self.last_checkpoint = path
        restored = [*s.model.state_dict().values(), *s.loss_fn.state_dict().values(), *s.optimizer.state_tensors(), s.step]
        restored += list(s.ema.model.state_dict().values()) if s.ema is not None else []
        self.runtime.prepare_state(restored)  # before the first step
        logger.info("resuming from %s (step %d)", path, self.start_step)

    def _save(self, step: int) -> None:
        """The master writes (every replica holds the same weights); the others wait for it
        on the host, not inside the next step's all-reduce."""
        if self.replicas.is_master:
            self._upload_logs()  # first: a checkpoint in the bucket means its logs are there too
            self.last_checkpoint = self.checkpoints.save(step, self._payload(step))
        self.replicas.barrier()

    def _upload_logs(self) -> None:
        """The staged logs to the bucket (nothing to do for a local output)."""
        if self.replicas.is_master:
            self.run_files.push()

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> Dict:
        c, runtime, replicas = self.config.train, self.runtime, self.replicas
        loop = self._start_loop()
        try:
            with PreemptionGuard(stop_file(self.run_files.local)) as guard:
                self._redo_lost_evaluation(loop)
                for step in range(loop.first, c.steps + 1):
                    loop.profile.before(step)
                    outputs = self.step_fn(next(loop.batches))
                    plan = loop.cadence.plan(step)
                    stop_requested = plan.decide and guard.requested
                    if replicas.is_master and (plan.log or stop_requested):
                        runtime.on_step_end(lambda values, s=step: self._on_values(s, values, loop), outputs)
                    runtime.end_step()
                    stop, diverged = replicas.agree([stop_requested, self.divergence.diverged]) if plan.decide else (False, False)
                    self._after_step(step, plan, loop)
                    if diverged:
                        self._take_scores(loop.log, wait=True)  # the evaluations before it stand
                        raise TrainingDiverged(
                            f"the loss is not finite at step {self.divergence.step or step}; stopping "
                            f"(last good checkpoint: {self.last_checkpoint or 'none'})"
                        )
                    self._periodic_work(step, plan, stop, loop)
                    if stop and not plan.last:
                        self._take_scores(loop.log, wait=True)  # nothing scored is lost by the stop
                        raise TrainingInterrupted(
                            f"stopped {guard.reason or 'because another replica was asked to'} at step {step}; "
                            f"saved {self.last_checkpoint}; run the same command again to resume"
                        )
            runtime.wait()
            self._take_scores(loop.log, wait=True)  # every evaluation's metrics before the summary
        finally:
            if self.scoring is not None:
                self.scoring.close()  # only a failed run leaves scorings here
            loop.close()
            self._upload_logs()
        return self._summary(loop)

    def _start_loop(self) -> "LoopState":
        c, local = self.config.train, self.run_files.local
        first = self.start_step + 1
        log = MetricsLog(local, c.steps, self.start_step, self.console) if self.replicas.is_master else SilentLog()
        log.message(
            f"training steps {first}-{c.steps}, batch {c.batch_size} on {self.replicas.world} replica(s), "
            f"{self.num_images} images, {self.config.data.image_size[0]}x{self.config.data.image_size[1]}, "
            f"on {self.runtime.device} -> {self.output_dir}"
        )
        uploaded = (
            f" (uploaded to {storage.join(self.output_dir, 'tensorboard')} at each checkpoint)" if self.run_files.remote else ""
        )
        log.message(f"TensorBoard: tensorboard --logdir {local / 'tensorboard'}{uploaded}")
        if self.init_report:
            log.message(self.init_report)
        tensorboard = local / "tensorboard"
        profile = ProfileWindow(
            self.config.runtime.profile_steps if self.replicas.is_master else None,  # one trace per run
            c.steps,
            lambda: self.runtime.start_profile(tensorboard),
            self.runtime.stop_profile,
        )
        # Before the input workers start: a CPU measures its peak now (the master alone reports).
        utilisation = step_utilisation(self.config, self.runtime) if self.replicas.is_master else None
        if self.evaluator is not None and self.replicas.is_master:
            self.scoring = self.evaluator.background_scoring()
            self.scoring.start()  # reads the ground truth while step 1 compiles
        clock = Stopwatch()
        loop = LoopState(
            first=first,
            log=log,
            cadence=Cadence(first, c.steps, c.log_every, c.checkpoint_every, c.eval_every, self.replicas.world),
            compiles=CompileWatch(lambda: self.runtime.compilations()["count"]),
            profile=profile,
            clock=clock,
            throughput=Throughput(c.batch_size, clock.seconds),
            batches=self.runtime.device_batches(self.counters),
            tensorboard=tensorboard,
            utilisation=utilisation,
        )
        self.replicas.barrier()  # every replica is past its own setup graphs before step 1's
        return loop

    def _after_step(self, step: int, plan, loop: "LoopState") -> None:
        """What the loop learns once a step has been launched: the profile window, the first
        step's time and compilations, later compilations."""
        if loop.profile.after(step):
            loop.log.message(f"profiled steps {loop.profile.first}-{step}: open {loop.tensorboard} in TensorBoard's profile tab")
        if step == loop.first:
            self.runtime.wait()
            loop.first_step_seconds = loop.clock.seconds()
            compiled = loop.compiles.warmed_up()
            loop.warm_clock, loop.input_wait = Stopwatch(), InputWait(self.runtime.device_seconds, loop.batches)
            loop.log.message(f"step {step} done in {loop.first_step_seconds:.1f} s ({compiled} graphs compiled)")
        elif plan.log and self.replicas.is_master:
            loop.compiles.check(step)

    def _periodic_work(self, step: int, plan, stop: bool, loop: "LoopState") -> None:
        """Checkpoint and evaluation at a step boundary; their time is not training time."""
        loop.log.advance(step)
        self._take_scores(loop.log)
        paused = Stopwatch()
        if plan.checkpoint or stop:
            # The checkpoint's best AP and the logs uploaded with it include every evaluation
            # before it: a scoring in flight is waited for (usually long done by now).
            self._take_scores(loop.log, wait=True)
            self._save(step)
        if plan.evaluate:
            if not loop.evaluated:  # compiling the evaluation graphs is warm-up too
                loop.compiles.also_warmup(lambda: self._evaluate(step, loop.log))
                loop.evaluated = True
            else:
                self._evaluate(step, loop.log)
        if plan.checkpoint or stop or plan.evaluate:
            loop.throughput.exclude(paused.seconds())

    def _on_values(self, step: int, values: Dict[str, float], loop: "LoopState") -> None:
        """The master's host copy of a log step's values (``Runtime.on_step_end``)."""
        if not self.divergence.observe(step, values):
            return  # the replicas agree to stop at this step; nothing non-finite is logged
        rate = loop.throughput.rate(step)
        if rate is not None:
            values["images_per_second"] = rate
            report = loop.utilisation.report(rate)  # the master's, as this call is
            for key, logged in (("achieved_tflops_per_device", "tflops_per_second_per_device"), ("utilisation", "utilisation")):
                if report[key] is not None:  # None: the model's FLOPs or the device's peak are not known
                    values[logged] = report[key]
        values["truncated_images"] = float(self.counters.truncated)
        values["unreadable_images"] = float(self.counters.unreadable)
        self.last_loss = values["loss"]
        if self.first_loss is None:
            self.first_loss = values["loss"]
        loop.log.write(step, values)

    def _evaluate(self, step: int, log: MetricsLog) -> None:
        """Every replica runs the model over its shard; the master hands the gathered
        detections to the background scoring, with a host copy of the evaluated state for
        ``best.pt``, and training goes on. The metrics land at a later step boundary."""
        detections = self.evaluator.predict(self.step_fn.inference_model)
        if detections is None:  # not the master
            return
        log.message(f"step {step}: evaluated, scoring {len(detections)} detections in the background")
        self._record_scores(self.scoring.submit(step, detections, host_snapshot(self._payload(step))), log)

    def _redo_lost_evaluation(self, loop: "LoopState") -> None:
        """A run killed while the evaluation of its last checkpoint's step was being scored
        never logged it, and the resumed loop starts after that step: the restored state is
        that step's, so it is evaluated again now (once: a logged evaluation is not redone)."""
        step, every = self.start_step, self.config.train.eval_every
        if self.evaluator is None or step == 0 or (step % every and step != self.config.train.steps):
            return
        lost = self.replicas.is_master and step not in logged_evaluations(self.run_files.local / "metrics.jsonl")
        if self.replicas.from_master(int(lost)) == 1:  # every replica evaluates its shard
            loop.compiles.also_warmup(lambda: self._evaluate(step, loop.log))
            loop.evaluated = True

    def _take_scores(self, log, wait: bool = False) -> None:
        """The master's finished scorings, logged (``wait``: every one in flight)."""
        if self.scoring is None:
            return
        running = self.scoring.running() if wait else []
        if running:  # says why the run pauses here
            log.message(f"waiting for the background scoring of step {', '.join(map(str, running))}")
        self._record_scores(self.scoring.finished(wait=wait), log)

    def _record_scores(self, scored: List[Scored], log) -> None:
        for done in scored:
            metrics = done.result["metrics"]
            log.write_eval(done.step, metrics)
            self.last_eval = {k: v for k, v in metrics.items() if isinstance(v, float)}
            if metrics["AP"] > self.best_ap:
                self.best_ap = metrics["AP"]
                self.checkpoints.save_best({**done.context, "best_ap": self.best_ap})

    def _summary(self, loop: "LoopState") -> Dict:
        c = self.config.train
        steps_run = c.steps - self.start_step
        warm_steps, warm_seconds = steps_run - 1, (loop.warm_clock.seconds() if loop.warm_clock else 0.0)
        waits = loop.input_wait.fractions() if loop.input_wait is not None and c.steps > loop.first else {}
        images_per_second = warm_steps * c.batch_size / warm_seconds if warm_steps > 0 and warm_seconds else None
        summary = {
            "steps": c.steps,
            "resumed_from_step": self.start_step,
            "images": steps_run * c.batch_size,
            "wall_seconds": round(loop.clock.seconds(), 3),
            **timing_summary(
                self.runtime,
                self.runtime.compilations(),
                first_step_seconds=loop.first_step_seconds,
                images_per_second=images_per_second,
                compilations_after_warmup=loop.compiles.after_warmup() if steps_run else 0,
                waits=waits,
            ),
            **(loop.utilisation.report(images_per_second) if loop.utilisation is not None else {}),
            "first_loss": self.first_loss,
            "final_loss": self.last_loss,
            "truncated_images": self.counters.truncated,
            "unreadable_images": self.counters.unreadable,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "eval": self.last_eval,
        }
        if self.replicas.is_master:
            (self.run_files.local / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self._upload_logs()
        if summary["compilations_after_warmup"]:
            logger.warning("%d compilation(s) happened after warm-up", summary["compilations_after_warmup"])
        return summary


@dataclass
class LoopState:
    """What one run of the loop keeps between steps."""

    first: int
    log: object  # MetricsLog on the master, SilentLog elsewhere
    cadence: Cadence
    compiles: CompileWatch
    profile: ProfileWindow
    clock: Stopwatch
    throughput: Throughput
    batches: TimedBatches
    tensorboard: Path
    first_step_seconds: float = 0.0
    utilisation: Optional[Utilisation] = None  # the master's; None on the other replicas
    evaluated: bool = False  # an evaluation ran (its graphs are compiled)
    warm_clock: Optional[Stopwatch] = None
    input_wait: Optional[InputWait] = None

    def close(self) -> None:
        self.batches.close()
        self.profile.close()  # stopped or failed inside the window: keep what was traced
        self.log.close()
