"""From COCO-format files on disk to fixed-shape uint8 batches.

The names below are imported on first use, not with the package: ``data.coco`` (the annotation
format, numpy only) must import without torch, since evaluation's background scoring process
reads ground truth through it and would otherwise spend seconds and a GiB loading torch."""

import importlib

_HOMES = {
    "CategoryMapping": "coco",
    "CocoDataset": "coco",
    "DatasetError": "coco",
    "ImageRecord": "coco",
    "load_coco": "coco",
    "DetectionDataset": "dataset",
    "collate": "dataset",
    "EvalSampler": "loader",
    "TrainSampler": "loader",
    "build_loader": "loader",
    "NO_AUGMENTATION": "transforms",
    "Augmentation": "transforms",
    "letterbox": "transforms",
    "random_resized_crop": "transforms",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"retinanet_xla.data.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
