"""What a replica needs to know about the others: its rank, and the collectives it joins.

Every collective sits inside a compiled graph. Decisions that end the run normally (a stop
request, a non-finite loss) are agreed by all replicas at the same step (``agree``), so they
all leave the loop together. Starting the replicas is ``launch.py``'s job.
"""

import threading
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import Tensor

from retinanet_xla.errors import ConfigError

# Host-side barrier for replicas that are threads of one process (set up by ``current_replicas``).
_THREAD_BARRIERS: Dict[int, threading.Barrier] = {}
_BARRIERS_LOCK = threading.Lock()


@dataclass(frozen=True)
class Replicas:
    rank: int = 0
    world: int = 1
    threaded: bool = False  # all replicas are threads of this one process (the CPU client)

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def mean(self, tensor: Tensor) -> Tensor:
        """The mean over replicas of a tensor without gradient (the loss normaliser)."""
        if self.world == 1:
            return tensor
        import torch_xla.core.xla_model as xm

        return xm.all_reduce(xm.REDUCE_SUM, tensor, scale=1.0 / self.world)

    def differentiable_mean(self, tensor: Tensor) -> Tensor:
        """The mean over replicas, with gradient (cross-replica BatchNorm statistics)."""
        if self.world == 1:
            return tensor
        return _MeanOverReplicas.apply(tensor, self.world)

    def average_gradients(self, parameters: List[torch.nn.Parameter]) -> None:
        """Average gradients over replicas in place, inside the step's graph."""
        if self.world == 1:
            return
        import torch_xla.core.xla_model as xm

        grads = [p.grad for p in parameters if p.grad is not None]
        xm.all_reduce(xm.REDUCE_SUM, grads, scale=1.0 / self.world)

    def gather(self, tensor: Tensor, device: torch.device) -> Tensor:
        """Every replica's host ``tensor``, concatenated along dim 0 in rank order, on
        ``device`` once the next ``runtime.sync(collective=True)`` has run (evaluation results).

        Each replica places its tensor in its own slot of a zero buffer on the host, and the
        buffers are summed: every replica runs the same graph, compiled once. (torch_xla's
        ``all_gather`` pads by the replica's ordinal inside the graph, so each replica compiles
        its own, and on the CPU client their all-reduces never meet.)"""
        if self.world == 1:
            return tensor.to(device)
        import torch_xla.core.xla_model as xm

        slots = torch.zeros(self.world, *tensor.shape, dtype=tensor.dtype)
        slots[self.rank] = tensor
        return xm.all_reduce(xm.REDUCE_SUM, slots.to(device)).flatten(0, 1)

    def share(self, batch_size: int, key: str) -> int:
        """Each replica's part of a global batch (``key`` names the setting in the error)."""
        if batch_size % self.world:
            raise ConfigError(f"{key} {batch_size} is not divisible by the {self.world} replicas")
        return batch_size // self.world

    def agree(self, flags: Sequence[bool], runtime) -> List[bool]:
        """Each flag is true if it is true on any replica. Every replica must call this at the
        same step; it waits for the device (call it only where the loop reads values anyway)."""
        if self.world == 1:
            return list(flags)
        import torch_xla.core.xla_model as xm

        local = torch.tensor([float(f) for f in flags], device=runtime.device)
        reduced = xm.all_reduce(xm.REDUCE_MAX, local)
        runtime.sync(collective=True)
        return [bool(v) for v in reduced.cpu().tolist()]

    def from_master(self, value: int, runtime) -> int:
        """Replica 0's ``value`` (a non-negative int, or -1) on every replica: a decision taken
        once, such as the checkpoint to resume from. Every replica must call it; it waits for
        the device."""
        if self.world == 1:
            return value
        import torch_xla.core.xla_model as xm

        # Only the master's slot is non-zero: the sum is its value, shifted so that -1 fits.
        local = torch.tensor([float(value + 1) if self.is_master else 0.0], device=runtime.device)  # exact below 2**24
        reduced = xm.all_reduce(xm.REDUCE_SUM, local)
        runtime.sync(collective=True)
        return int(reduced.cpu().item()) - 1

    def barrier(self) -> None:
        """Wait on the host until every replica arrives (the master evaluating, say). Threads
        wait on a threading barrier, not inside a collective, which XLA's CPU client aborts
        after 10 s."""
        if self.world == 1:
            return
        if self.threaded:
            _THREAD_BARRIERS[self.world].wait()
        else:
            import torch_xla.core.xla_model as xm

            xm.rendezvous("retinanet-xla")


class _MeanOverReplicas(torch.autograd.Function):
    """All-reduce mean whose backward is an all-reduce mean too: every replica's loss depends on
    every replica's input. (torch_xla's ``functions.all_reduce`` only scales the local gradient,
    which drops the other replicas' terms once gradients are averaged.)"""

    @staticmethod
    def forward(ctx, tensor: Tensor, world: int) -> Tensor:
        import torch_xla.core.xla_model as xm

        ctx.world = world
        return xm.all_reduce(xm.REDUCE_SUM, tensor, scale=1.0 / world)

    @staticmethod
    def backward(ctx, grad: Tensor):
        import torch_xla.core.xla_model as xm

        return xm.all_reduce(xm.REDUCE_SUM, grad, scale=1.0 / ctx.world), None


def _thread_barrier(world: int) -> threading.Barrier:
    with _BARRIERS_LOCK:
        return _THREAD_BARRIERS.setdefault(world, threading.Barrier(world))


def current_replicas() -> Replicas:
    """This replica, from inside ``xmp.spawn``."""
    import torch_xla.runtime as xr

    world = xr.world_size()
    threaded = xr.process_count() == 1
    if threaded:
        _thread_barrier(world)
    return Replicas(xr.global_ordinal(), world, threaded)
