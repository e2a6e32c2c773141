"""``retinanet-xla train``: build everything from the config, resume if a checkpoint exists,
then one loop over steps.

Periodic work (logging, checkpoints, evaluation) happens at step boundaries; values reach the
host only at log steps (``Runtime.on_step_end``), so the host does not wait for the device on
the other steps. With several replicas, this is one replica's loop (docs/tpu.md).
"""

import json
import logging
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from rich.console import Console

from retinanet_xla import storage
from retinanet_xla.config import Config, save_config
from retinanet_xla.data import DetectionDataset, TrainSampler, build_loader
from retinanet_xla.data.coco import CocoDataset
from retinanet_xla.data.splits import check_box_budget, dataset_split, resolve_max_boxes
from retinanet_xla.distributed.launch import replica_runtime
from retinanet_xla.distributed.preemption import PreemptionGuard, stop_file
from retinanet_xla.distributed.replicas import Replicas
from retinanet_xla.errors import CheckpointError, ConfigError, RunFailed, RunStopped
from retinanet_xla.inference.evaluator import Evaluator
from retinanet_xla.rundir.checkpoint import load_checkpoint
from retinanet_xla.rundir.directory import CheckpointDirectory
from retinanet_xla.storage import Location, StagedDirectory
from retinanet_xla.training.build import build_train_step
from retinanet_xla.training.hooks import Cadence, CompileWatch, DivergenceCheck, ProfileWindow, Throughput
from retinanet_xla.training.init_from import initialize_from
from retinanet_xla.training.metrics_log import MetricsLog, SilentLog
from retinanet_xla.xla.feed import InputWait, Stopwatch
from retinanet_xla.xla.runtime import resolve_device

logger = logging.getLogger(__name__)
DEVICE_KEYS = ("images", "boxes", "labels", "crowd")
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


class BatchCounters:
    """Counts what the loader reports (boxes truncated, unreadable images) on the host side,
    before the batch goes to the device, and forwards only what the step needs."""

    def __init__(self, loader):
        self.loader = loader
        self.truncated = 0
        self.unreadable = 0

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        for batch in self.loader:
            self.truncated += int(batch["truncated"].sum())
            self.unreadable += int(batch["unreadable"].sum())
            yield {key: batch[key] for key in DEVICE_KEYS}


def train_batches(config: Config, coco: CocoDataset, replicas: Replicas, start_batch: int = 0) -> BatchCounters:
    """This replica's endless stream of augmented training batches. Starting at
    ``start_batch`` (the step a checkpoint reached), a resumed run sees the same images with
    the same augmentation as an uninterrupted one."""
    batch_size = check_batch_sizes(config, replicas)
    dataset = DetectionDataset(
        coco.records,
        coco.mapping,
        tuple(config.data.image_size),
        resolve_max_boxes(coco, config.data.max_boxes),
        config.data.augmentation,
        config.data.max_pixels,
    )
    sampler = TrainSampler(len(dataset), batch_size, replicas.world, replicas.rank, config.train.seed, start_batch=start_batch)
    return BatchCounters(build_loader(dataset, sampler, batch_size, config.data.num_workers))


def check_batch_sizes(config: Config, replicas: Replicas) -> int:
    """Each replica's training batch; the evaluation batch must split over the replicas too."""
    if config.train.eval_every > 0:
        replicas.share(config.eval.batch_size, "eval.batch_size")
    return replicas.share(config.train.batch_size, "train.batch_size")


class Trainer:
    """One replica's training loop (the only one, on a single device)."""

    def __init__(
        self,
        config: Config,
        output_dir: Location,
        resume: bool = True,
        console: Optional[Console] = None,
        replicas: Replicas = Replicas(),
    ):
        self.config, self.output_dir, self.replicas = config, storage.location(output_dir), replicas
        self.run_files = StagedDirectory(self.output_dir)  # logs, config, summary; local when the output is
        world_size = replicas.world
        if config.runtime.num_devices not in (None, world_size) and resolve_device(config.runtime.device) == "xla":
            raise ConfigError(f"runtime.num_devices is {config.runtime.num_devices} but {world_size} XLA device(s) are running")
        check_batch_sizes(config, replicas)  # before anything is built
        local = self.run_files.local
        local.mkdir(parents=True, exist_ok=True)
        self.coco = dataset_split(config, "train", local)
        _, truncated = check_box_budget(self.coco, config.data.max_boxes)  # before anything is written
        if replicas.is_master:
            save_config(config, local / "config.yaml")
            if truncated:
                logger.warning(truncated)
        self.checkpoints = CheckpointDirectory(self.output_dir, config.train.keep_checkpoints)

        self.runtime = replica_runtime(config, replicas)
        self.init_report: Optional[str] = None  # what model.init_from did, for the start of the log
        found = self._resume_point() if resume else None
        self.step_fn = build_train_step(config, self.runtime, replicas, self._initializer(found))
        self.start_step, self.best_ap = 0, float("-inf")
        if found is not None:
            self._restore(*found)

        self.counters = train_batches(config, self.coco, replicas, start_batch=self.start_step)
        self.num_images = len(self.coco.records)

        self.evaluator = None
        if config.train.eval_every > 0:  # every replica evaluates its shard of the split
            val = dataset_split(config, "val", local)
            val.mapping = self.coco.mapping  # detections are written with the training set's ids
            self.evaluator = Evaluator(config, val, self.runtime, replicas, show_progress=False)

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
        step = self.replicas.from_master(found[1]["step"] if found else -1, self.runtime)
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
                s.ema.model.load_state_dict(payload["ema"] if "ema" in payload else payload["model"])
        except (RuntimeError, ValueError, KeyError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise CheckpointError(
                f"{path}: does not fit this config ({first_line}); use --no-resume or another --output"
            ) from None
        s.step.copy_(torch.tensor(payload["step"], dtype=torch.int64))
        torch.set_rng_state(payload["torch_rng_state"])
        self.start_step, self.best_ap = payload["step"], payload.get("best_ap", float("-inf"))
        self.last_checkpoint = path
        restored = [*s.model.state_dict().values(), *s.loss_fn.state_dict().values(), s.step]
        restored += list(s.ema.model.state_dict().values()) if s.ema is not None else []
        self.runtime.separate_scalars(restored)  # before the first traced step
        logger.warning("resuming from %s (step %d)", path, self.start_step)

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
        first = self.start_step + 1
        local = self.run_files.local
        log = MetricsLog(local, c.steps, self.start_step, self.console) if replicas.is_master else SilentLog()
        log.message(
            f"training steps {first}-{c.steps}, batch {c.batch_size} on {replicas.world} replica(s), "
            f"{self.num_images} images, {self.config.data.image_size[0]}x{self.config.data.image_size[1]}, "
            f"on {runtime.device} -> {self.output_dir}"
        )
        uploaded = (
            f" (uploaded to {storage.join(self.output_dir, 'tensorboard')} at each checkpoint)" if self.run_files.remote else ""
        )
        log.message(f"TensorBoard: tensorboard --logdir {local / 'tensorboard'}{uploaded}")
        if self.init_report:
            log.message(self.init_report)
        cadence = Cadence(first, c.steps, c.log_every, c.checkpoint_every, c.eval_every, replicas.world)
        compiles = CompileWatch(lambda: runtime.compilations()["count"])
        tensorboard = local / "tensorboard"
        profile = ProfileWindow(
            self.config.runtime.profile_steps if replicas.is_master else None,  # one trace per run
            c.steps,
            lambda: runtime.start_profile(tensorboard),
            runtime.stop_profile,
        )
        clock, throughput = Stopwatch(), Throughput(c.batch_size, lambda: clock.seconds())
        warm_clock, first_step_seconds, input_wait = None, 0.0, None
        batches = runtime.device_batches(self.counters)
        replicas.barrier()  # every replica is past its own setup graphs before step 1's
        try:
            with PreemptionGuard(stop_file(local)) as guard:
                for step in range(first, c.steps + 1):
                    profile.before(step)
                    outputs = self.step_fn(next(batches))
                    plan = cadence.plan(step)
                    stop_requested = plan.decide and guard.requested
                    if replicas.is_master and (plan.log or stop_requested):
                        runtime.on_step_end(lambda values, s=step: self._on_values(s, values, throughput, log), outputs)
                    runtime.sync(collective=True)
                    stop = diverged = False
                    if plan.decide:
                        stop, diverged = replicas.agree([stop_requested, self.divergence.diverged], runtime)
                    if profile.after(step):
                        log.message(f"profiled steps {profile.first}-{step}: open {tensorboard} in TensorBoard's profile tab")
                    if step == first:
                        runtime.wait()
                        first_step_seconds = clock.seconds()
                        compiled = compiles.warmed_up()
                        warm_clock, input_wait = Stopwatch(), InputWait(runtime, batches)
                        log.message(f"step {step} done in {first_step_seconds:.1f} s ({compiled} graphs compiled)")
                    elif plan.log and replicas.is_master:
                        compiles.check(step)
                    if diverged:
                        raise TrainingDiverged(
                            f"the loss is not finite at step {self.divergence.step or step}; stopping "
                            f"(last good checkpoint: {self.last_checkpoint or 'none'})"
                        )
                    log.advance(step)
                    paused = Stopwatch()  # checkpoints and evaluation are not training time
                    if plan.checkpoint or stop:
                        self._save(step)
                    if plan.evaluate:
                        if self.last_eval is None:  # compiling the evaluation graphs is warm-up too
                            compiles.also_warmup(lambda s=step: self._evaluate(s, log))
                        else:
                            self._evaluate(step, log)
                    if plan.checkpoint or stop or plan.evaluate:
                        throughput.exclude(paused.seconds())
                    if stop and not plan.last:
                        raise TrainingInterrupted(
                            f"stopped {guard.reason or 'because another replica was asked to'} at step {step}; "
                            f"saved {self.last_checkpoint}; run the same command again to resume"
                        )
            runtime.wait()
        finally:
            batches.close()
            profile.close()  # stopped or failed inside the window: keep what was traced
            log.close()
            self._upload_logs()
        waits = input_wait.fractions() if input_wait is not None and c.steps > first else {}
        return self._summary(clock, warm_clock, first_step_seconds, compiles, waits)

    def _on_values(self, step: int, values: Dict[str, float], throughput: Throughput, log: MetricsLog) -> None:
        """The master's host copy of a log step's values (``Runtime.on_step_end``)."""
        if not self.divergence.observe(step, values):
            return  # the replicas agree to stop at this step; nothing non-finite is logged
        rate = throughput.rate(step)
        if rate is not None:
            values["images_per_second"] = rate
        values["truncated_images"] = float(self.counters.truncated)
        values["unreadable_images"] = float(self.counters.unreadable)
        self.last_loss = values["loss"]
        if self.first_loss is None:
            self.first_loss = values["loss"]
        log.write(step, values)

    def _evaluate(self, step: int, log: MetricsLog) -> None:
        """Every replica runs the model over its shard; the master scores the gathered
        detections and keeps ``best.pt`` while the others wait."""
        # With a weight average, it is what gets evaluated (and what eval uses later).
        model = self.step_fn.ema.model if self.step_fn.ema is not None else self.step_fn.model
        result = self.evaluator.evaluate(model)
        if result is None:  # not the master
            self.replicas.barrier()
            return
        metrics = result["metrics"]
        log.write_eval(step, metrics)
        self.last_eval = {k: v for k, v in metrics.items() if isinstance(v, float)}
        if metrics["AP"] > self.best_ap:
            self.best_ap = metrics["AP"]
            self.checkpoints.save_best(self._payload(step))
        self.replicas.barrier()

    def _summary(
        self, clock: Stopwatch, warm_clock: Optional[Stopwatch], first_step_seconds: float, compiles: CompileWatch, waits: Dict
    ) -> Dict:
        c = self.config.train
        compiled = self.runtime.compilations()
        steps_run = c.steps - self.start_step
        warm_steps, warm_seconds = steps_run - 1, (warm_clock.seconds() if warm_clock else 0.0)
        summary = {
            "steps": c.steps,
            "resumed_from_step": self.start_step,
            "images": steps_run * c.batch_size,
            "wall_seconds": round(clock.seconds(), 3),
            "first_step_seconds": round(first_step_seconds, 3),
            "images_per_second": round(warm_steps * c.batch_size / warm_seconds, 3) if warm_steps > 0 and warm_seconds else None,
            # After step 1 (evaluation and checkpoints included): runtime.InputWait.
            **{key: waits.get(key) for key in ("device_wait_fraction", "input_wait_fraction", "device_idle_fraction")},
            "compilations_total": compiled["count"],
            "compilations_after_warmup": compiles.after_warmup() if steps_run else 0,
            "compile_seconds": round(compiled["seconds"], 3),
            "compile_cache": str(self.runtime.compile_cache) if self.runtime.compile_cache else None,
            **{key: compiled[key] for key in ("cache_hits", "cache_misses", "cache_load_failures") if key in compiled},
            "first_loss": self.first_loss,
            "final_loss": self.last_loss,
            "truncated_images": self.counters.truncated,
            "unreadable_images": self.counters.unreadable,
            "device": str(self.runtime.device),
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "eval": self.last_eval,
            "replicas": self.replicas.world,
        }
        if self.replicas.is_master:
            (self.run_files.local / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self._upload_logs()
        if summary["compilations_after_warmup"]:
            logger.warning("%d XLA compilation(s) happened after warm-up", summary["compilations_after_warmup"])
        return summary
