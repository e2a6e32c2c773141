"""``retinanet-xla export``: a checkpoint -> a serving artefact, checked against the package."""

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import torch

from retinanet_xla import storage
from retinanet_xla.data import DetectionDataset, collate
from retinanet_xla.data.splits import dataset_split, resolve_max_boxes
from retinanet_xla.errors import require_package
from retinanet_xla.export.formats import Exported, compare_with_package, export
from retinanet_xla.inference.loading import load_for_inference
from retinanet_xla.rundir.directory import local_run_files, run_of
from retinanet_xla.storage import Location


def export_checkpoint(
    checkpoint: Location,
    fmt: str,
    output: Optional[str],
    batch_size: int,
    uint8_input: bool,
    overrides: Sequence[str] = (),
    check: bool = False,
) -> Tuple[Exported, Optional[Dict[str, float]]]:
    """Export on the host CPU (the artefact must not depend on an XLA device); with ``check``,
    compare it with the in-package model on the first images of the validation split. The
    artefact is written locally and checked there; a bucket ``output`` receives it after that."""
    if fmt == "onnx":  # before the checkpoint is read and the model built
        require_package("onnx", "export --format onnx", "export")
        if check:
            require_package("onnxruntime", "export --format onnx --check", "export")
    loaded = load_for_inference(checkpoint, [*overrides, "runtime.device=cpu"])
    output_dir = (
        storage.location(output) if output else storage.join(run_of(loaded.checkpoint), "export", storage.stem(loaded.checkpoint))
    )
    report = None
    with storage.written_through(output_dir) as local:
        exported = export(loaded, fmt, local, batch_size, uint8_input)
        if check:
            images, content_sizes = validation_batch(loaded, batch_size, uint8_input)
            report = compare_with_package(loaded, exported, images, content_sizes)
    placed = {field: storage.join(output_dir, str(getattr(exported, field).relative_to(local))) for field in ("path", "metadata")}
    return dataclasses.replace(exported, **placed), report


def validation_batch(loaded, batch_size: int, uint8_input: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``batch_size`` validation images, letterboxed as evaluation does."""
    config = loaded.config
    coco = dataset_split(config, "val", local_run_files(loaded.checkpoint))
    coco.mapping = loaded.mapping
    dataset = DetectionDataset(
        coco.records,
        coco.mapping,
        tuple(config.data.image_size),
        resolve_max_boxes(coco, config.data.max_boxes),
        augmentation=None,
    )
    batch = collate([dataset[i % len(dataset)] for i in range(batch_size)])
    images = batch["images"]
    content_sizes = (batch["original_size"].float() * batch["scale"][:, None]).round().long()  # as evaluation clips
    if not uint8_input:
        images = loaded.model.cpu().normalize(images)
    return images, content_sizes
