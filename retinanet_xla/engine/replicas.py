"""One replica per XLA device: the launcher, and what a replica needs to know about the others.

``xmp.spawn`` starts one process per TPU chip (per host) and, inside it, one thread per device
it addresses; on the CPU client (``PJRT_DEVICE=CPU CPU_NUM_DEVICES=N``) one child process with
N threads. Every collective sits inside a compiled graph. When the replicas are threads of one
process, they launch each such graph in rank order (``runtime.LaunchOrder``), so that it is
compiled once and its collectives match.

A replica that fails ends its whole process at once (``os._exit``): the others would otherwise
wait in the next all-reduce for a partner that never comes. Decisions that end the run
normally (a stop request, a non-finite loss) are agreed by all replicas at the same step
(``agree``), so they all leave the loop together.
"""

import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from retinanet_xla.engine.preemption import SIGNALS as STOP_SIGNALS
from retinanet_xla.engine.runtime import prefer_nonblocking_cpu_client
from retinanet_xla.errors import ConfigError, RunFailed, UserError

# Host-side barrier for replicas that are threads of one process (set up by ``current_replicas``).
_THREAD_BARRIERS: Dict[int, threading.Barrier] = {}
_BARRIERS_LOCK = threading.Lock()


class ReplicaFailed(RunFailed):
    """A replica process ended abnormally; the replica printed its own error first."""


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


def _replica_entry(index: int, function: Callable, args: tuple, agreed_errors: tuple) -> None:
    """Run one replica. ``agreed_errors`` are raised by every replica at the same step and go
    back to the launcher; anything else ends the whole process at once with a message."""
    replicas = current_replicas()
    try:
        function(replicas, *args)
    except agreed_errors:
        raise
    except BaseException as error:  # noqa: BLE001 - every other failure must end every replica
        if isinstance(error, UserError):
            print(f"error: {error}", file=sys.stderr, flush=True)
        else:
            print(f"error: replica {replicas.rank} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(error.exit_code if isinstance(error, UserError) else RunFailed.exit_code)


def local_replica_count(device: str, num_devices: Optional[int]) -> Optional[int]:
    """How many replicas a command runs on this host (``runtime.device``,
    ``runtime.num_devices``), when it can be known without starting the runtime (the launcher
    must not touch the device before ``xmp.spawn``): 1 off XLA; on the CPU client,
    ``num_devices`` or else ``CPU_NUM_DEVICES``; on TPU, ``num_devices``, or None for all of the
    host's."""
    if device != "xla":
        return 1
    if num_devices is not None or os.environ.get("PJRT_DEVICE", "CPU").upper() != "CPU":
        return num_devices
    return int(os.environ.get("CPU_NUM_DEVICES", "1"))


def launch(function: Callable, args: tuple, agreed_errors: tuple = (), num_devices: Optional[int] = None) -> None:
    """``function(replicas, *args)`` on every local XLA device, through ``xmp.spawn``.

    The replica processes start with SIGTERM and SIGINT ignored (a TPU VM's preemption notice
    reaches every process): the launcher alone handles them, with the handlers it had before
    the call, and the replicas learn of a stop through the ``STOP`` file those handlers write.
    """
    import torch_xla.distributed.xla_multiprocessing as xmp

    if num_devices is not None and os.environ.get("PJRT_DEVICE", "CPU").upper() == "CPU":
        os.environ["CPU_NUM_DEVICES"] = str(num_devices)  # the CPU client's device count
    prefer_nonblocking_cpu_client()  # the replica process creates its client before any Runtime
    outcome: Dict[str, BaseException] = {}

    def spawn() -> None:
        try:
            xmp.spawn(_replica_entry, args=(function, args, agreed_errors))
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    in_main_thread = threading.current_thread() is threading.main_thread()
    handlers = {number: signal.signal(number, signal.SIG_IGN) for number in STOP_SIGNALS} if in_main_thread else {}
    launcher = threading.Thread(target=spawn, name="xmp.spawn", daemon=True)
    before = set(multiprocessing.active_children())
    try:
        launcher.start()
        # Ignored signals stay ignored across fork and exec: restore ours once the process exists.
        while launcher.is_alive() and not set(multiprocessing.active_children()) - before:
            time.sleep(0.01)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    while launcher.is_alive():
        launcher.join(0.1)  # short waits, so that this thread runs the signal handlers
    error = outcome.get("error")
    if isinstance(error, BrokenProcessPool):
        for process in multiprocessing.active_children():  # no replica process outlives the run
            process.kill()
        raise ReplicaFailed(
            "a replica process ended abnormally (its error is printed above); checkpoints already written are intact"
        )
    if error is not None:
        raise error
