"""From COCO-format files on disk to fixed-shape uint8 batches."""

from retinanet_xla.data.coco import CategoryMapping, CocoDataset, DatasetError, ImageRecord, load_coco
from retinanet_xla.data.dataset import DetectionDataset, collate
from retinanet_xla.data.loader import EvalSampler, TrainSampler, build_loader
from retinanet_xla.data.transforms import NO_AUGMENTATION, Augmentation, letterbox, random_resized_crop

__all__ = [
    "Augmentation",
    "CategoryMapping",
    "CocoDataset",
    "DatasetError",
    "DetectionDataset",
    "EvalSampler",
    "ImageRecord",
    "NO_AUGMENTATION",
    "TrainSampler",
    "build_loader",
    "collate",
    "letterbox",
    "load_coco",
    "random_resized_crop",
]
