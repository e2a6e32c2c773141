"""The order in which replicas that are threads of one process launch their collective graphs."""

import threading
from typing import Callable, Dict


def _compile_progress() -> int:
    """Grows when a graph of this process was compiled (cached) or found in the cache."""
    import torch_xla.debug.metrics as metrics
    import torch_xla.runtime as xr

    return xr.get_num_cached_compilation_graph() + (metrics.counter_value("CachedCompile") or 0)


class LaunchOrder:
    """Replicas that are threads of one process (the CPU client with ``CPU_NUM_DEVICES=N``) get
    each collective graph from one compilation.

    Two threads compiling the same graph at once give its all-reduce different op ids, and it
    deadlocks until XLA aborts the process after 10 s (torch-xla 2.9.0, CPU). So the replicas
    take turns in rank order, and a replica's turn ends as soon as its graph is compiled or
    found in the cache: not when it returns, because a launch waits for the graph (``sync``),
    which waits in the all-reduce for the next replicas to launch theirs. At most one replica is
    between "started" and "past compilation" at a time, so the process-wide counters tell.

    Rank 0 starts a launch only once every replica has arrived at it. Otherwise another replica
    could still be compiling a graph without collectives (an evaluation batch), and its
    compilation would end rank 0's turn early, and the next replica would compile the same
    collective graph at the same time.
    """

    def __init__(self, world: int):
        self.world = world
        self._cond = threading.Condition()
        self._arrived = [0] * world  # collective launches each replica has reached
        self._started = [0] * world  # ... started
        self._passed = [0] * world  # ... and got past compilation
        self._marks = [0] * world  # _compile_progress() when each replica started its last one

    def _may_start(self, rank: int, launch_number: int) -> bool:
        progress = _compile_progress()
        for k in range(self.world):
            if self._passed[k] < self._started[k] and progress > self._marks[k]:
                self._passed[k] = self._started[k]
        before = all(self._passed[k] > launch_number for k in range(rank))
        after = all(self._passed[k] >= launch_number for k in range(rank + 1, self.world))
        return before and after

    def run(self, rank: int, launch: Callable[[], None]) -> None:
        with self._cond:
            number = self._started[rank]
            self._arrived[rank] = number + 1
            self._cond.notify_all()
            while not (min(self._arrived) > number and self._may_start(rank, number)):
                self._cond.wait(0.005)
            self._started[rank], self._marks[rank] = number + 1, _compile_progress()
        try:
            launch()
        finally:
            with self._cond:
                self._passed[rank] = max(self._passed[rank], number + 1)
                self._cond.notify_all()


_LAUNCH_ORDERS: Dict[int, LaunchOrder] = {}
_LAUNCH_ORDERS_LOCK = threading.Lock()


def launch_order(world: int) -> LaunchOrder:
    """The one LaunchOrder of this process's ``world`` replica threads."""
    with _LAUNCH_ORDERS_LOCK:
        return _LAUNCH_ORDERS.setdefault(world, LaunchOrder(world))
