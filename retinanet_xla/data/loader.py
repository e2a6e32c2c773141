"""Sharded, deterministic sampling and the DataLoader around ``DetectionDataset``.

Every replica builds its own loader with its ``rank``; the samplers give each replica a
disjoint slice of every epoch. The training stream is infinite and addressable by batch number,
so a resumed run continues with exactly the batches it would have seen.
"""

import logging
import os
import signal
import threading
from typing import Iterator, Tuple

import numpy as np
import torch

from retinanet_xla.data.dataset import PADDING_INDEX, DetectionDataset, collate
from retinanet_xla.errors import STOP_SIGNALS, DatasetError

logger = logging.getLogger(__name__)


def _check_shard(num_replicas: int, rank: int, batch_size: int) -> None:
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
    if batch_size < 1:
        raise ValueError(f"per-replica batch size must be >= 1, got {batch_size}")


class TrainSampler(torch.utils.data.Sampler):
    """Endless ``(index, augmentation seed)`` keys for one replica.

    Epoch ``e`` is a permutation drawn from ``seed + e``, cut to a multiple of the global batch
    (the remainder is dropped, a different remainder each epoch); replica ``r`` takes the
    ``r``-th slice of every global batch. ``start_batch`` skips that many per-replica batches.
    """

    def __init__(
        self, num_images: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, start_batch: int = 0
    ):
        _check_shard(num_replicas, rank, batch_size)
        global_batch = batch_size * num_replicas
        if num_images < global_batch:
            raise DatasetError(
                f"the training set has {num_images} usable images, fewer than one global batch of {global_batch}: "
                "lower train.batch_size or add images"
            )
        self.num_images, self.batch_size, self.num_replicas, self.rank = num_images, batch_size, num_replicas, rank
        self.seed, self.start_batch = seed, start_batch
        self.batches_per_epoch = num_images // global_batch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This replica's image indices for ``epoch``, [batches_per_epoch, batch_size]."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_images)
        global_batches = order[: self.batches_per_epoch * self.batch_size * self.num_replicas]
        global_batches = global_batches.reshape(self.batches_per_epoch, self.num_replicas, self.batch_size)
        return global_batches[:, self.rank]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        batch = self.start_batch
        while True:
            epoch, position = divmod(batch, self.batches_per_epoch)
            indices = self.epoch_indices(epoch)
            for row in indices[position:]:
                for slot, index in enumerate(row):
                    # The augmentation seed names the sample's place in the whole run.
                    yield int(index), int(np.random.SeedSequence([self.seed, self.rank, batch, slot]).generate_state(1)[0])
                batch += 1


class EvalSampler(torch.utils.data.Sampler):
    """Every image exactly once over all replicas, in order; the last global batch is padded
    with ``PADDING_INDEX`` keys (masked samples, ``valid = False``) so shapes never change."""

    def __init__(self, num_images: int, batch_size: int, num_replicas: int = 1, rank: int = 0):
        _check_shard(num_replicas, rank, batch_size)
        global_batch = batch_size * num_replicas
        num_batches = -(-num_images // global_batch)
        keys = np.full(num_batches * global_batch, PADDING_INDEX, dtype=np.int64)
        keys[:num_images] = np.arange(num_images)
        self.keys = keys.reshape(num_batches, num_replicas, batch_size)[:, rank].reshape(-1)

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return ((int(index), 0) for index in self.keys)


def _receive_stop_signals_from_the_parent_only(worker_id: int) -> None:
    """A worker's stop signals are its parent's business alone.

    A TPU VM preemption or a Ctrl-C signals every process; torch's workers die of a foreign
    SIGTERM and quit on SIGINT, so a replica lost its input (the batches already queued too)
    before the replicas agreed to stop and save. Ignoring the signals is no answer either:
    multiprocessing ends leftover workers with SIGTERM at exit and would wait forever. Only the
    sender tells the two apart, and only ``sigwaitinfo`` gives it: the worker starts with the
    signals blocked in every thread (``StopSignalsBlockedAtStart``), and this thread receives
    them, exiting when the parent sent one and ignoring the rest. A worker whose parent died
    still ends through torch's watchdog.
    """
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def receive() -> None:
        while True:
            if signal.sigwaitinfo(STOP_SIGNALS).si_pid == parent:
                os._exit(0)

    threading.Thread(target=receive, name="stop-signals", daemon=True).start()


class StopSignalsBlockedAtStart(torch.utils.data.DataLoader):
    """Workers start with SIGTERM and SIGINT blocked. A signal mask is inherited by a forked or
    spawned process and by every thread it starts, so no thread of the worker (importing
    torch_xla starts some) can take a stop signal before its receiver runs. In the starting
    thread a signal only waits until the workers exist."""

    def __iter__(self):
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            batches = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return _dataset_errors_as_raised(batches)


def _dataset_errors_as_raised(batches: Iterator) -> Iterator:
    """torch re-raises a worker's exception with the worker's traceback in its message; a
    ``DatasetError`` is meant for the user, so it comes back in the one line it was raised with."""
    try:
        yield from batches
    except DatasetError as error:
        last_line = str(error).rstrip().splitlines()[-1] if str(error).strip() else ""
        raise DatasetError(last_line.partition("DatasetError: ")[2] or str(error)) from None


def usable_cores() -> int:
    """The cores this process may run on (a container's or ``taskset``'s limit included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_CAPPED_LOGGED = set()


def usable_workers(num_workers: int) -> int:
    """``data.num_workers``, at most the usable cores: more processes than cores decode no
    faster, and they took the step's cores (a 2-core VM under load trained ~10x slower with 8)."""
    cores = usable_cores()
    if num_workers <= cores:
        return num_workers
    if (num_workers, cores) not in _CAPPED_LOGGED:  # once per process, not per loader
        _CAPPED_LOGGED.add((num_workers, cores))
        logger.info("data.num_workers %d capped at this machine's %d usable core(s)", num_workers, cores)
    return cores


def build_loader(
    dataset: DetectionDataset, sampler: torch.utils.data.Sampler, batch_size: int, num_workers: int = 2
) -> torch.utils.data.DataLoader:
    """A DataLoader of fixed-shape batches. Workers are persistent: the training stream is
    endless and re-spawning them per epoch would stall the device. The loader gets its own
    generator: without one, starting an iterator draws worker seeds from torch's global RNG,
    which replica threads share, and a replica doing that while another initialises its model
    under the seed gave the replicas different starting weights."""
    num_workers = usable_workers(num_workers)
    return StopSignalsBlockedAtStart(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=False,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0),  # augmentation has its own per-sample seeds
        worker_init_fn=_receive_stop_signals_from_the_parent_only,
    )
