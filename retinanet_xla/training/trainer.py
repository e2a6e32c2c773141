"""``retinanet-xla train``'s loop, for one replica (the only one, on a single device): set up
(``setup.set_up_run``), then one ``for`` over steps, each step followed by the periodic work
(``periodic.py``) in a fixed order.

Values reach the host only at log steps (``Runtime.on_step_end``), so the host does not wait
for the device on the other steps. With several replicas every replica runs this loop, in
lockstep through the step's all-reduce (docs/tpu.md).
"""

import logging
from typing import Dict, Optional

from rich.console import Console

from retinanet_xla.device.runtime import Runtime
from retinanet_xla.distributed.preemption import PreemptionGuard, stop_file
from retinanet_xla.storage import Location
from retinanet_xla.training.hooks import Cadence, StepPlan
from retinanet_xla.training.periodic import Checkpoints, Evaluation, StepLog, StopWhenAsked, StopWhenDiverged, WarmUp
from retinanet_xla.training.setup import open_log, set_up_run
from retinanet_xla.training.summary import write_run_summary

logger = logging.getLogger(__name__)


class Trainer:
    """Builds everything from the config and resumes from the newest checkpoint (``resume``)
    when it is constructed; ``run()`` trains to ``train.steps`` and returns the summary."""

    def __init__(self, config, runtime: Runtime, output_dir: Location, resume: bool = True, console: Optional[Console] = None):
        self.training = set_up_run(config, runtime, output_dir, resume)
        self.console = console
        if self.training.last_checkpoint is not None:  # every replica: each says it loaded replica 0's choice
            logger.info("resuming from %s (step %d)", self.training.last_checkpoint, self.training.start_step)

    def run(self) -> Dict:
        run, c = self.training, self.training.config.train
        first, log = run.start_step + 1, open_log(run, self.console)
        step_log = StepLog(run, log)  # a CPU measures its peak here, before the input workers start
        batches = run.runtime.device_batches(run.batches)
        warm_up = WarmUp(run, log, first, batches)
        throughput = step_log.throughput
        evaluation = Evaluation(run, log, warm_up.compiles, throughput)
        evaluation.start()
        cadence = Cadence(first, c.steps, c.log_every, c.checkpoint_every, c.eval_every, run.replicas.world)
        work = [warm_up, StopWhenDiverged(run, evaluation, step_log.divergence), step_log]
        work += [Checkpoints(run, evaluation, throughput, self._upload_logs), evaluation]
        run.replicas.barrier()  # every replica is past its own setup graphs before step 1's
        try:
            with PreemptionGuard(stop_file(run.files.local)) as guard:
                work.append(StopWhenAsked(run, evaluation, lambda: guard.reason))
                evaluation.redo_lost()
                for step in range(first, c.steps + 1):
                    warm_up.before_step(step)
                    plan = self._step(step, next(batches), cadence.plan(step), guard, step_log)
                    for each in work:
                        each.after_step(step, plan)
            run.runtime.wait()
            evaluation.take(wait=True)  # every evaluation's metrics before the summary
        finally:
            batches.close()
            for each in reversed(work):
                each.close()
            self._upload_logs()
        return write_run_summary(run, warm_up, step_log.utilisation)

    def _step(self, step: int, batch, plan: StepPlan, guard: PreemptionGuard, step_log: StepLog) -> StepPlan:
        """One step launched. The master asks for its values at log steps, and at a requested
        stop (the loss is known to be finite before the checkpoint); at decision steps every
        replica learns whether any was asked to stop or saw a non-finite loss."""
        runtime = self.training.runtime
        outputs = self.training.step_fn(batch)
        stop_requested = plan.decide and guard.requested
        if runtime.replicas.is_master and (plan.log or stop_requested):
            runtime.on_step_end(lambda values: step_log.values(step, values), outputs)
        runtime.end_step()
        if not plan.decide:
            return plan
        stop, diverged = runtime.replicas.agree([stop_requested, step_log.divergence.diverged])
        return plan.decided(stop, diverged)

    def _upload_logs(self) -> None:
        """The staged logs to the bucket (nothing to do for a local output)."""
        if self.training.replicas.is_master:
            self.training.files.push()
