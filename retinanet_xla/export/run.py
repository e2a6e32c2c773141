"""``retinanet-xla export``: a checkpoint -> a serving artefact, checked against the package."""

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from retinanet_xla.data import DetectionDataset, collate
from retinanet_xla.data.splits import dataset_split
from retinanet_xla.export.formats import Exported, compare_with_package, export
from retinanet_xla.inference.loading import load_for_inference


def export_checkpoint(
    checkpoint: Path,
    fmt: str,
    output: Optional[Path],
    batch_size: int,
    uint8_input: bool,
    overrides: Sequence[str] = (),
    check: bool = False,
) -> Tuple[Exported, Optional[Dict[str, float]]]:
    """Export on the host CPU (the artefact must not depend on an XLA device); with ``check``,
    compare it with the in-package model on the first images of the validation split."""
    loaded = load_for_inference(checkpoint, [*overrides, "runtime.device=cpu"])
    output_dir = Path(output) if output else loaded.checkpoint.parent.parent / "export" / loaded.checkpoint.stem
    exported = export(loaded, fmt, output_dir, batch_size, uint8_input)
    if not check:
        return exported, None
    images, content_sizes = validation_batch(loaded, batch_size, uint8_input)
    return exported, compare_with_package(loaded, exported, images, content_sizes)


def validation_batch(loaded, batch_size: int, uint8_input: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``batch_size`` validation images, letterboxed as evaluation does."""
    config = loaded.config
    coco = dataset_split(config, "val", loaded.checkpoint.parent.parent)
    coco.mapping = loaded.mapping
    dataset = DetectionDataset(
        coco.records, coco.mapping, tuple(config.data.image_size), config.data.max_boxes, augmentation=None
    )
    batch = collate([dataset[i % len(dataset)] for i in range(batch_size)])
    images = batch["images"]
    content_sizes = (batch["original_size"].float() * batch["scale"][:, None]).round().long()  # as evaluation clips
    if not uint8_input:
        images = loaded.model.cpu().normalize(images)
    return images, content_sizes
