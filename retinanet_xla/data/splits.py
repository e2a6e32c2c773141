"""A configured split, or the built-in synthetic dataset in its place."""

from pathlib import Path
from typing import Optional, Tuple

from retinanet_xla import storage
from retinanet_xla.config import Config
from retinanet_xla.data.coco import CocoDataset, load_coco
from retinanet_xla.data.synthetic import write_synthetic_dataset
from retinanet_xla.errors import ConfigError, DatasetError
from retinanet_xla.storage import Location


def split_files(config: Config, split: str, output_dir: Path) -> Tuple[Location, Location]:
    """The annotation file and image directory of ``data.<split>``; when its annotations are
    unset, the synthetic dataset's, written under ``output_dir/synthetic`` the first time
    (``output_dir`` is local: a run in a bucket passes its local staging directory).
    Commands call it before their replicas start, so that they find the files written once."""
    paths = getattr(config.data, split)
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
    """The configured split (``split_files``), loaded and checked against the model."""
    annotations, images = split_files(config, split, output_dir)
    coco = load_coco(annotations, images, config.data.label_mapping, config.data.augmentation.min_box_size)
    if not coco.records:
        raise DatasetError(f"{annotations}: no usable images (run 'retinanet-xla data check' for details)")
    if not any(len(record.boxes) for record in coco.records):
        raise DatasetError(f"{annotations}: no usable boxes in any image (run 'retinanet-xla data check' for details)")
    if config.model.num_classes < coco.mapping.num_labels:
        raise ConfigError(
            f"model.num_classes is {config.model.num_classes} but {annotations} needs {coco.mapping.num_labels} "
            f"with data.label_mapping {config.data.label_mapping}"
        )
    return coco


def truncation_warning(coco: CocoDataset, max_boxes: int) -> Optional[str]:
    """One line when some images hold more boxes than ``data.max_boxes``: the batches keep the
    largest ``max_boxes`` of each (real objects before crowd regions), and the objects past them
    count as background."""
    counts = [len(record.boxes) for record in coco.records]
    over = [count for count in counts if count > max_boxes]
    if not over:
        return None
    dropped = sum(count - max_boxes for count in over)
    return (
        f"{len(over)} of {len(counts)} images in {coco.annotations_file} have more than data.max_boxes={max_boxes} boxes "
        f"(up to {max(over)}); {dropped} of {sum(counts)} boxes ({dropped / sum(counts):.1%}) are dropped and their "
        f"objects count as background: set data.max_boxes to {max(over)} to keep them"
    )
