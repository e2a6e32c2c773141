"""The training loop's periodic work, each a small object the loop asks at step boundaries (in
the spirit of detectron2's hooks, without a registry): when to log, checkpoint, evaluate and
decide; whether XLA compiled after warm-up; the profiler window; whether the loss diverged.
None of them touches a device, so they are tested without XLA."""

import logging
import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Sequence

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    """What happens at the end of one step."""

    log: bool  # the master reads the step's values (the only host reads of device values)
    decide: bool  # replicas agree on stopping (a request, a non-finite loss)
    checkpoint: bool
    evaluate: bool
    last: bool
    stop: bool = False  # the replicas agreed to stop here (a request on any of them)
    diverged: bool = False  # ... because a loss was not finite

    def decided(self, stop: bool, diverged: bool) -> "StepPlan":
        """This plan with what the replicas agreed at a decision step."""
        return replace(self, stop=stop, diverged=diverged)


@dataclass(frozen=True)
class Cadence:
    """``train.log_every``, ``checkpoint_every`` and ``eval_every`` as a plan per step.

    Checkpoint steps are log steps too: the loss is known to be finite before the weights are
    written, so the last checkpoint is always a good one. Replicas decide to stop together at
    log steps, where the master reads values anyway; a single device at every step."""

    first: int
    last: int
    log_every: int
    checkpoint_every: int
    eval_every: int
    replicas: int = 1

    def plan(self, step: int) -> StepPlan:
        last = step == self.last
        checkpoint = step % self.checkpoint_every == 0 or last
        log = step == self.first or step % self.log_every == 0 or checkpoint
        evaluate = self.eval_every > 0 and (step % self.eval_every == 0 or last)
        return StepPlan(log=log, decide=log or self.replicas == 1, checkpoint=checkpoint, evaluate=evaluate, last=last)


class CompileWatch:
    """Counts XLA compilations after warm-up and warns once when the step graph changed.

    Warm-up is the first step and the first evaluation (which compiles the evaluation graphs);
    ``count`` is the process's compilation counter (``Runtime.compilations``)."""

    def __init__(self, count: Callable[[], int]):
        self.count = count
        self.at_warmup: Optional[int] = None
        self.warned = False

    def warmed_up(self) -> int:
        """The first step has run: what was compiled so far is warm-up."""
        self.at_warmup = self.count()
        return self.at_warmup

    def also_warmup(self, compile: Callable[[], None]) -> None:
        """Run ``compile`` (the first evaluation); its compilations count as warm-up."""
        before = self.count()
        compile()
        if self.at_warmup is not None:
            self.at_warmup += self.count() - before

    def after_warmup(self) -> int:
        return 0 if self.at_warmup is None else self.count() - self.at_warmup

    def check(self, step: int) -> None:
        new = self.after_warmup()
        if new and not self.warned:
            self.warned = True
            logger.warning("%d new XLA compilation(s) after warm-up (by step %d): the step graph changed", new, step)


class ProfileWindow:
    """``runtime.profile_steps``: start the profiler before the first listed step, stop it after
    the last (or the run's last step); ``close`` keeps what was traced if the run ends inside."""

    def __init__(self, steps: Optional[Sequence[int]], last_step: int, start: Callable[[], None], stop: Callable[[], None]):
        self.first, self.last = (steps[0], min(steps[1], last_step)) if steps else (None, None)
        self._start, self._stop = start, stop
        self.active = False

    def before(self, step: int) -> None:
        if step == self.first:
            self._start()
            self.active = True

    def after(self, step: int) -> bool:
        """True when the window closed at this step."""
        if self.active and step == self.last:
            self.close()
            return True
        return False

    def close(self) -> None:
        if self.active:
            self._stop()
            self.active = False


class DivergenceCheck:
    """The first log step whose values are not all finite."""

    def __init__(self):
        self.step: Optional[int] = None

    def observe(self, step: int, values: Dict[str, float]) -> bool:
        """Whether ``values`` are finite; remembers the first step where they were not."""
        finite = all(math.isfinite(value) for value in values.values())
        if not finite and self.step is None:
            self.step = step
        return finite

    @property
    def diverged(self) -> bool:
        return self.step is not None


class Throughput:
    """Training images per second between consecutive log steps: the time spent evaluating and
    writing checkpoints in between (``exclude``) is not training time."""

    def __init__(self, batch_size: int, clock: Callable[[], float]):
        self.batch_size, self.clock = batch_size, clock
        self.window: Optional[tuple] = None
        self.excluded = 0.0

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def rate(self, step: int) -> Optional[float]:
        """Since the previous call (None at the first)."""
        now = self.clock()
        rate = None
        if self.window is not None:
            window_step, window_time = self.window
            rate = (step - window_step) * self.batch_size / max(now - window_time - self.excluded, 1e-9)
        self.window, self.excluded = (step, now), 0.0
        return rate
