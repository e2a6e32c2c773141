"""A configured split, or the built-in synthetic dataset in its place."""

import logging
from pathlib import Path
from typing import Optional, Tuple, Union

from retinanet_xla import storage
from retinanet_xla.config import Config
from retinanet_xla.data.coco import CocoDataset, load_coco
from retinanet_xla.data.records import load_records
from retinanet_xla.data.synthetic import write_synthetic_dataset
from retinanet_xla.errors import ConfigError, DatasetError
from retinanet_xla.storage import Location

logger = logging.getLogger(__name__)


def split_files(config: Config, split: str, output_dir: Path) -> Tuple[Location, Location]:
    """The annotation file and image directory of ``data.<split>``; when its annotations are
    unset, the synthetic dataset's, written under ``output_dir/synthetic`` the first time
    (``output_dir`` is local: a run in a bucket passes its local staging directory).
    Commands call it before their replicas start, so that they find the files written once."""
    paths = getattr(config.data, split)
    if paths.records is not None:  # nothing to write: dataset_split reads the records
        return storage.location(f"{paths.records}.json"), storage.parent(storage.location(paths.records))
    if paths.annotations is None:
        root = Path(output_dir) / "synthetic"
        annotations = root / "annotations" / f"instances_{split}.json"
        if not annotations.is_file():
            s = config.data.synthetic
            write_synthetic_dataset(root, s.train_images, s.val_images, s.seed)
        return annotations, root / split
    if paths.images is None:
        raise ConfigError(f"data.{split}.images must be set when data.{split}.annotations is")
    return storage.location(paths.annotations), storage.location(paths.images)


def dataset_split(config: Config, split: str, output_dir: Path) -> CocoDataset:
    """The configured split (``split_files``, or ``data.<split>.records``), loaded and checked
    against the model."""
    records = getattr(config.data, split).records
    if records is not None:
        coco = load_records(records, config.data.label_mapping, config.data.augmentation.min_box_size)
        annotations = coco.annotations_file
    else:
        annotations, images = split_files(config, split, output_dir)
        coco = load_coco(annotations, images, config.data.label_mapping, config.data.augmentation.min_box_size)
    if not coco.records:
        raise DatasetError(f"{annotations}: no usable images (run 'retinanet-xla data check' for details)")
    if not coco.usable_boxes:
        raise DatasetError(coco.no_usable_boxes())
    if config.model.num_classes < coco.mapping.num_labels:
        raise ConfigError(
            f"model.num_classes is {config.model.num_classes} but {annotations} needs {coco.mapping.num_labels} "
            f"with data.label_mapping {config.data.label_mapping}"
        )
    if split == "train" and config.model.num_classes > coco.mapping.num_labels:
        logger.warning(
            "model.num_classes is %d but %s has %d labels with data.label_mapping %s: the other %d outputs only ever learn background",
            config.model.num_classes,
            annotations,
            coco.mapping.num_labels,
            config.data.label_mapping,
            config.model.num_classes - coco.mapping.num_labels,
        )
    return coco


# Training refuses to start when more than this share of the boxes would be dropped because
# their images hold more than data.max_boxes: those objects would silently count as background.
MAX_DROPPED_SHARE = 0.01
AUTO_MULTIPLE = 8  # data.max_boxes: auto rounds the dataset's maximum up to a multiple of this


def resolve_max_boxes(coco: CocoDataset, setting: Union[int, str]) -> int:
    """``data.max_boxes`` for this dataset: the number, or for ``auto`` the most boxes any image
    holds, rounded up (a few boxes more or less in a new version of the data keep the shapes,
    and so the compiled step)."""
    if setting != "auto":
        return int(setting)
    most = max((len(record.boxes) for record in coco.records), default=1)
    return max(AUTO_MULTIPLE, -(-most // AUTO_MULTIPLE) * AUTO_MULTIPLE)


def check_box_budget(coco: CocoDataset, setting: Union[int, str]) -> Tuple[int, Optional[str]]:
    """The resolved ``max_boxes`` and a warning line when some images hold more boxes (the
    batches keep the largest of each, real objects before crowd regions; the rest count as
    background). More than ``MAX_DROPPED_SHARE`` of the boxes dropped is a ``DatasetError``."""
    max_boxes = resolve_max_boxes(coco, setting)
    counts = [len(record.boxes) for record in coco.records]
    over = [count for count in counts if count > max_boxes]
    if not over:
        return max_boxes, None
    dropped, total = sum(count - max_boxes for count in over), sum(counts)
    found = (
        f"{len(over)} of {len(counts)} images in {coco.annotations_file} have more than data.max_boxes={max_boxes} boxes "
        f"(up to {max(over)}); {dropped} of {total} boxes ({dropped / total:.1%})"
    )
    if dropped > MAX_DROPPED_SHARE * total:
        raise DatasetError(
            f"{found} would be dropped and their objects trained as background: set data.max_boxes to {max(over)} "
            f"(or auto), or remove the crowded images"
        )
    return max_boxes, f"{found} are dropped and their objects count as background: set data.max_boxes to {max(over)} to keep them"
