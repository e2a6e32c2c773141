"""The replica group of native devices: one process per device, joined by ``torch.distributed``.

Collectives inside the step are functional collectives (``_functional_collectives``), which
``torch.compile`` traces into the step's graph and which run eagerly too; those the host reads
(``gather``, ``agree``, ``from_master``, ``barrier``) are the process group's own calls.
"""

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional
from torch import Tensor

from retinanet_xla.device.runtime import ReplicaGroup


def _mean(tensor: Tensor, world: int) -> Tensor:
    return functional.all_reduce(tensor, "sum", dist.group.WORLD) / world


class DistributedReplicaGroup(ReplicaGroup):
    """Replica ``rank`` of ``world`` processes; host collectives use tensors on ``device``
    (NCCL and tpu_dist reduce device memory only)."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device

    def mean(self, tensor: Tensor) -> Tensor:
        return _mean(tensor, self.world)

    def differentiable_mean(self, tensor: Tensor) -> Tensor:
        return _MeanOverReplicas.apply(tensor, self.world)

    def average_gradients(self, gradients: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
        """One all-reduce of every gradient flattened into one buffer (as DDP's buckets do):
        one collective per step instead of one per parameter."""
        present = [g for g in gradients if g is not None]
        if not present:
            return gradients
        flat = _mean(torch.cat([g.reshape(-1) for g in present]), self.world)
        averaged = iter(part.view_as(g) for part, g in zip(flat.split([g.numel() for g in present]), present))
        return [None if g is None else next(averaged) for g in gradients]

    def gather(self, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor, device=self.device) for _ in range(self.world)]
        dist.all_gather(parts, tensor.to(self.device))
        return torch.cat(parts).cpu()

    def agree(self, flags: Sequence[bool]) -> List[bool]:
        local = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        return [bool(v) for v in local.cpu().tolist()]

    def from_master(self, value: int) -> int:
        local = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(local, src=0)
        return int(local.item())

    def barrier(self) -> None:
        dist.barrier()


class _MeanOverReplicas(torch.autograd.Function):
    """All-reduce mean whose backward is an all-reduce mean too: every replica's loss depends on
    every replica's input (cross-replica BatchNorm statistics)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, world: int) -> Tensor:
        ctx.world = world
        return _mean(tensor, world)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _mean(grad, ctx.world), None
