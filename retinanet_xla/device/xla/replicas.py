"""The replica group of XLA devices: collectives as all-reduces inside the step's graph.

Every collective sits inside a compiled graph; those that the host reads (``gather``, ``agree``,
``from_master``) end their own collective step.
"""

import threading
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from retinanet_xla.device.runtime import ReplicaGroup

if TYPE_CHECKING:
    from retinanet_xla.device.xla.runtime import XlaRuntime

# Host-side barrier for replicas that are threads of one process.
_THREAD_BARRIERS: Dict[int, threading.Barrier] = {}
_BARRIERS_LOCK = threading.Lock()


class XlaReplicaGroup(ReplicaGroup):
    """Replica ``rank`` of ``world``; ``threaded``: every replica is a thread of this process
    (the CPU client with ``CPU_NUM_DEVICES=N``)."""

    def __init__(self, runtime: "XlaRuntime", rank: int, world: int, threaded: bool):
        self.runtime, self.rank, self.world, self.threaded = runtime, rank, world, threaded
        if threaded:
            with _BARRIERS_LOCK:
                _THREAD_BARRIERS.setdefault(world, threading.Barrier(world))

    def mean(self, tensor: Tensor) -> Tensor:
        if self.world == 1:
            return tensor
        import torch_xla.core.xla_model as xm

        return xm.all_reduce(xm.REDUCE_SUM, tensor, scale=1.0 / self.world)

    def differentiable_mean(self, tensor: Tensor) -> Tensor:
        if self.world == 1:
            return tensor
        return _MeanOverReplicas.apply(tensor, self.world)

    def average_gradients(self, gradients: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
        if self.world == 1:
            return gradients
        import torch_xla.core.xla_model as xm

        # A list is all-reduced in place, as one collective.
        xm.all_reduce(xm.REDUCE_SUM, [g for g in gradients if g is not None], scale=1.0 / self.world)
        return gradients

    def gather(self, tensor: Tensor) -> Tensor:
        """Each replica places its tensor in its own slot of a zero buffer on the host, and the
        buffers are summed: every replica runs the same graph, compiled once. (torch_xla's
        ``all_gather`` pads by the replica's ordinal inside the graph, so each replica compiles
        its own, and on the CPU client their all-reduces never meet.)"""
        if self.world == 1:
            return tensor
        import torch_xla.core.xla_model as xm

        slots = torch.zeros(self.world, *tensor.shape, dtype=tensor.dtype)
        slots[self.rank] = tensor
        gathered = xm.all_reduce(xm.REDUCE_SUM, slots.to(self.runtime.device)).flatten(0, 1)
        self.runtime.end_step()
        return gathered.cpu()

    def agree(self, flags: Sequence[bool]) -> List[bool]:
        if self.world == 1:
            return list(flags)
        import torch_xla.core.xla_model as xm

        local = torch.tensor([float(f) for f in flags], device=self.runtime.device)
        reduced = xm.all_reduce(xm.REDUCE_MAX, local)
        self.runtime.end_step()
        return [bool(v) for v in reduced.cpu().tolist()]

    def from_master(self, value: int) -> int:
        if self.world == 1:
            return value
        import torch_xla.core.xla_model as xm

        # Only the master's slot is non-zero: the sum is its value, shifted so that -1 fits.
        local = torch.tensor([float(value + 1) if self.is_master else 0.0], device=self.runtime.device)  # exact below 2**24
        reduced = xm.all_reduce(xm.REDUCE_SUM, local)
        self.runtime.end_step()
        return int(reduced.cpu().item()) - 1

    def barrier(self) -> None:
        """Threads wait on a threading barrier, not inside a collective, which XLA's CPU client
        aborts after 10 s."""
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
