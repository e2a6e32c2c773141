"""One replica's stream of training batches, and what the host counts on the way."""

from typing import Dict, Iterator

import torch

from retinanet_xla.config import Config
from retinanet_xla.data import DetectionDataset, TrainSampler, build_loader
from retinanet_xla.data.coco import CocoDataset
from retinanet_xla.data.splits import resolve_max_boxes
from retinanet_xla.device.runtime import ReplicaGroup

DEVICE_KEYS = ("images", "boxes", "labels", "crowd")


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


def replica_batch_size(config: Config, replicas: ReplicaGroup) -> int:
    """This replica's share of ``train.batch_size``."""
    return replicas.share(config.train.batch_size, "train.batch_size")


def train_batches(config: Config, coco: CocoDataset, replicas: ReplicaGroup, start_batch: int = 0) -> BatchCounters:
    """This replica's endless stream of augmented training batches. Starting at
    ``start_batch`` (the step a checkpoint reached), a resumed run sees the same images with
    the same augmentation as an uninterrupted one."""
    batch_size = replica_batch_size(config, replicas)
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
