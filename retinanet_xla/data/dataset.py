"""One sample: a decoded, transformed image and its ground truth padded to ``max_boxes``."""

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from retinanet_xla import storage
from retinanet_xla.data.coco import CategoryMapping, ImageRecord
from retinanet_xla.data.frames import IDENTITY, AnnotationFrame, map_boxes
from retinanet_xla.data.image_io import OrientedImage, UnreadableImage, read_oriented
from retinanet_xla.data.transforms import Augmentation, letterbox, random_resized_crop
from retinanet_xla.errors import DatasetError

logger = logging.getLogger(__name__)

PADDING_INDEX = -1  # a sampler key for a masked-out slot that fills the last evaluation batch
Key = Union[int, Tuple[int, int]]  # image index, or (image index, augmentation seed)
UNREADABLE_IN_A_ROW = 64  # a sample gives up after this many unreadable images: the dataset is broken


@dataclass(frozen=True)
class Placement:
    """Where a sample's canvas came from: what evaluation needs to write detections in the
    annotation file's frame."""

    image_id: int  # -1: padding
    scale: float  # letterbox: canvas pixels per decoded pixel (0: a random crop, not invertible)
    decoded_size: Tuple[int, int]  # (height, width) of the image as decoded
    to_annotation: np.ndarray  # 2x3: decoded pixels -> the JSON's frame


class DetectionDataset(torch.utils.data.Dataset):
    """Map-style dataset of fixed-shape samples.

    Keys come from the samplers in ``loader.py``: ``(index, seed)``, where the seed drives
    this sample's augmentation so that it depends on the run's seed and the sample's position
    in the stream, never on which worker process decoded it. ``augmentation=None`` is the
    evaluation transform (letterbox).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        mapping: CategoryMapping,
        image_size: Sequence[int],
        max_boxes: int,
        augmentation: Optional[Augmentation] = None,
        max_pixels: Optional[int] = None,
    ):
        if max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
        self.records = list(records)
        self.mapping = mapping
        self.image_size = tuple(int(s) for s in image_size)
        self.max_boxes = max_boxes
        self.augmentation = augmentation
        self.max_pixels = max_pixels  # None: image_io.MAX_PIXELS

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: Key) -> Dict[str, np.ndarray]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[Key]) -> List[Dict[str, np.ndarray]]:
        """A batch's samples (the DataLoader asks for a batch at once): the files are read
        together first, concurrently when they are in a bucket (``storage.read_many``)."""
        keys = [key if isinstance(key, tuple) else (key, 0) for key in keys]
        paths = [self.records[index].path for index, _ in keys if index != PADDING_INDEX]
        fetched = dict(zip(paths, storage.read_many(paths)))
        return [self._sample(index, seed, fetched) for index, seed in keys]

    def _sample(self, index: int, seed: int, fetched: Dict) -> Dict[str, np.ndarray]:
        if index == PADDING_INDEX:
            return self._padding_sample()
        unreadable = 0
        # An unreadable image is replaced by the next readable one: the batch keeps its shape and
        # the count travels with the batch so the trainer can log it. So many in a row that the
        # dataset (or its directory) is broken, not an image: the run stops and says so.
        attempts = min(len(self.records), UNREADABLE_IN_A_ROW)
        for attempt in range(attempts):
            record = self.records[(index + attempt) % len(self.records)]
            data = fetched.get(record.path) if attempt == 0 else None
            try:
                image = read_oriented(record.path, None if isinstance(data, Exception) else data, self.max_pixels)
            except UnreadableImage as error:
                logger.warning("skipping unreadable image %s", error)
                unreadable, last_error = unreadable + 1, error
                continue
            sample = self._transform(record, image, np.random.default_rng(seed))
            sample["unreadable"] = np.int64(unreadable)
            return sample
        what = (
            f"none of the dataset's {attempts} images could be read"
            if attempts == len(self.records)
            else f"{attempts} images in a row could not be read"
        )
        raise DatasetError(f"{what} (the last: {last_error}); `retinanet-xla data check` names every problem")

    def _transform(self, record: ImageRecord, oriented: OrientedImage, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        image = oriented.image
        # The JSON's frame onto the decoded pixels (turned with EXIF, or rescaled): evaluation
        # maps detections back with the same frame (``to_annotation``).
        frame = AnnotationFrame.of((record.width, record.height), oriented)
        boxes = map_boxes(frame.to_image, record.boxes) if frame.how != "same" else record.boxes
        labels = self.mapping.to_labels(record.category_ids)
        crowd = record.crowd
        if self.augmentation is None:
            pixels, boxes, scale = letterbox(image, boxes, self.image_size)
        else:
            pixels, boxes, keep = random_resized_crop(image, boxes, self.image_size, self.augmentation, rng)
            labels, crowd = labels[keep], crowd[keep]
            scale = 0.0  # not invertible after a random crop; only evaluation uses the scale
        placed = Placement(record.image_id, scale, (image.height, image.width), frame.to_annotation)
        return self._pad(pixels, boxes, labels, crowd, placed, valid=True)

    def _pad(self, pixels, boxes, labels, crowd, placed: "Placement", valid: bool) -> Dict[str, np.ndarray]:
        truncated = len(boxes) > self.max_boxes
        if truncated:
            # Keep real objects before crowd regions, larger before smaller.
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            order = np.lexsort((-area, crowd))[: self.max_boxes]
            boxes, labels, crowd = boxes[order], labels[order], crowd[order]
        count = len(boxes)
        padded_boxes = np.zeros((self.max_boxes, 4), dtype=np.float32)
        padded_labels = np.full(self.max_boxes, -1, dtype=np.int64)
        padded_crowd = np.zeros(self.max_boxes, dtype=bool)
        padded_boxes[:count], padded_labels[:count], padded_crowd[:count] = boxes, labels, crowd
        return {
            "image": np.ascontiguousarray(pixels.transpose(2, 0, 1)),
            "boxes": padded_boxes,
            "labels": padded_labels,
            "crowd": padded_crowd,
            "image_id": np.int64(placed.image_id),
            "scale": np.float32(placed.scale),
            "original_size": np.array(placed.decoded_size, dtype=np.int64),
            "to_annotation": placed.to_annotation.astype(np.float32),
            "valid": np.bool_(valid),
            "truncated": np.bool_(truncated),
            "unreadable": np.int64(0),
        }

    def _padding_sample(self) -> Dict[str, np.ndarray]:
        pixels = np.zeros((*self.image_size, 3), dtype=np.uint8)
        empty = np.zeros((0, 4), dtype=np.float32)
        return self._pad(
            pixels, empty, np.zeros(0, np.int64), np.zeros(0, bool), Placement(-1, 0.0, (0, 0), IDENTITY), valid=False
        )


BATCH_KEYS = (
    "image",
    "boxes",
    "labels",
    "crowd",
    "image_id",
    "scale",
    "original_size",
    "to_annotation",
    "valid",
    "truncated",
    "unreadable",
)


def collate(samples: List[Dict[str, np.ndarray]]) -> Dict[str, torch.Tensor]:
    """Stack samples into a batch whose shapes and dtypes depend only on the configuration:
    images uint8 [B, 3, H, W], boxes float32 [B, M, 4], labels int64 [B, M] (-1 = padding),
    crowd bool [B, M], image_id [B], scale [B] (canvas pixels per decoded pixel), original_size
    [B, 2] (H, W of the decoded image), to_annotation [B, 2, 3] (decoded pixels -> the JSON's
    frame, ``frames.AnnotationFrame``), valid [B]."""
    batch = {key: torch.from_numpy(np.stack([sample[key] for sample in samples])) for key in BATCH_KEYS}
    batch["images"] = batch.pop("image")
    return batch
