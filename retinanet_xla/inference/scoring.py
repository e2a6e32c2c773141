"""COCO scoring in a background process, so that training goes on while the host scores an
evaluation's detections (on COCO val2017 with pycocotools, about a minute in which the
accelerators would otherwise idle).

One worker process, started with ``spawn`` (nothing of the training process's devices or
threads is inherited), reads the ground truth once and scores each submission exactly as
``evaluate_detections`` does in-process: the same metrics, to the bit. It ignores SIGINT and
SIGTERM: a stop is the training process's to handle, which waits for what is in flight. If the
worker dies, the scorings it held are done in the training process instead (with a warning) and
a new worker takes the next ones: nothing is lost."""

import logging
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Callable, Dict, List, Optional, Sequence

from retinanet_xla import storage
from retinanet_xla.inference.coco_metrics import evaluate_detections, ground_truth

logger = logging.getLogger(__name__)

# A scoring in flight and at most one waiting: each holds its detections and the caller's
# context (train keeps the evaluated weights for best.pt), so more would only pile up memory
# when scoring is slower than the evaluations come.
MAX_IN_FLIGHT = 2

_worker_gt = None  # the worker's ground truth, read once by _start_worker
PARENT_CHECK_SECONDS = 1.0


def _start_worker(annotations: storage.Location, parent: int) -> None:
    global _worker_gt
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The lowest CPU priority: the scoring takes the cycles training leaves. At the same priority
    # it slowed a native CPU run's OpenMP threads more than it saved (docs/performance.md,
    # "Evaluation overlapping training").
    os.nice(19)
    threading.Thread(target=_end_with, args=(parent,), daemon=True, name="scoring-parent-watch").start()
    _worker_gt = ground_truth(annotations)


def _end_with(parent: int) -> None:
    """End this worker when the training process is gone (killed outright: SIGKILL, a second
    Ctrl-C). The worker holds both ends of its task queue, so it would never see the queue
    close and would wait for work forever, holding the ground truth in memory."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(0)


def _score_in_worker(detections: Sequence[Dict], image_ids: Sequence[int], backend: str) -> Dict:
    return evaluate_detections(_worker_gt, detections, image_ids, backend)


def _ready() -> None:
    """The first task: the worker has started and read the ground truth."""


@dataclass
class Scored:
    step: int
    result: Dict  # evaluate_detections' ``metrics`` and ``summary``
    context: Any  # what the caller submitted with it
    in_process: bool = False  # the worker died: scored by the caller's process


@dataclass
class _Pending:
    step: int
    detections: List[Dict]
    context: Any
    future: Optional[Future]  # None: the worker could not take it
    pool: Optional[ProcessPoolExecutor] = None  # the worker it went to


class BackgroundScoring:
    """Scorings of one evaluation split, in submission order. ``score_here(detections)`` is
    the same scoring in this process (the evaluator's), for a worker that died."""

    def __init__(
        self,
        annotations: storage.Location,
        image_ids: Sequence[int],
        backend: str,
        score_here: Callable[[List[Dict]], Dict],
    ):
        self.annotations, self.image_ids, self.backend = annotations, list(image_ids), backend
        self.score_here = score_here
        self.pending: List[_Pending] = []
        self._pool: Optional[ProcessPoolExecutor] = None

    def start(self) -> None:
        """Start the worker now (it reads the ground truth while the caller does other work)."""
        self._worker().submit(_ready)

    def _worker(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=get_context("spawn"),
                initializer=_start_worker,
                initargs=(self.annotations, os.getpid()),
            )
        return self._pool

    def submit(self, step: int, detections: List[Dict], context: Any = None) -> List[Scored]:
        """Queue the scoring of ``detections`` (evaluated at ``step``). Returns what had to be
        finished first to keep at most ``MAX_IN_FLIGHT`` in flight (oldest first)."""
        done = self.finished(wait=len(self.pending) >= MAX_IN_FLIGHT, keep=MAX_IN_FLIGHT - 1)
        pool = self._worker()
        try:
            future = pool.submit(_score_in_worker, detections, self.image_ids, self.backend)
        except (BrokenProcessPool, RuntimeError):  # the worker died while idle: scored when collected
            self._replace_worker(pool)
            future = None
        self.pending.append(_Pending(step, detections, context, future, pool))
        return done

    def running(self) -> List[int]:
        """The steps whose scoring is not done yet."""
        return [p.step for p in self.pending if p.future is not None and not p.future.done()]

    def finished(self, wait: bool = False, keep: int = 0) -> List[Scored]:
        """The scorings done so far, oldest first, stopping at the first still running; with
        ``wait``, every one but the newest ``keep`` is waited for."""
        done = []
        while self.pending:
            head = self.pending[0]
            must_wait = wait and len(self.pending) > keep
            if head.future is not None and not head.future.done() and not must_wait:
                break
            done.append(self._result(head))
            self.pending.pop(0)
        return done

    def _result(self, pending: _Pending) -> Scored:
        if pending.future is not None:
            try:
                return Scored(pending.step, pending.future.result(), pending.context)
            except BrokenProcessPool:
                self._replace_worker(pending.pool)
        logger.warning(
            "the background scoring process died; scoring the evaluation of step %d in the training process", pending.step
        )
        return Scored(pending.step, self.score_here(pending.detections), pending.context, in_process=True)

    def _replace_worker(self, broken: Optional[ProcessPoolExecutor]) -> None:
        """A broken worker takes no more work: the next submission starts a new one."""
        if broken is not None:
            broken.shutdown(wait=False, cancel_futures=True)
        if self._pool is broken:
            self._pool = None

    def close(self) -> None:
        """End the worker; scorings not collected are dropped (the run failed)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.pending = []
