"""Training-pipeline throughput of one worker (decode + every augmentation + padding)."""

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from retinanet_xla.data.coco import load_coco
from retinanet_xla.data.dataset import DetectionDataset
from retinanet_xla.data.loader import TrainSampler
from retinanet_xla.data.records import load_records
from retinanet_xla.data.synthetic import write_synthetic_dataset
from retinanet_xla.data.transforms import Augmentation


@dataclass
class ThroughputResult:
    images: int
    seconds: float
    image_size: Sequence[int]
    source: str

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def measure_pipeline(
    image_size: Sequence[int] = (640, 640),
    num_images: int = 200,
    annotations: Optional[str] = None,
    images_dir: Optional[str] = None,
    max_boxes: int = 100,
    batch_size: int = 8,
    records: Optional[str] = None,
) -> ThroughputResult:
    """Time ``num_images`` training samples in this process (one worker), asked for a batch at a
    time as the DataLoader does (so a bucket's images are fetched concurrently). Without a
    dataset, synthetic images of COCO-like size (480-640 px) are written to a temporary directory."""
    with tempfile.TemporaryDirectory() as scratch:
        if records is not None:
            coco, source = load_records(records), f"records {records}"
        elif annotations is None:
            paths = write_synthetic_dataset(Path(scratch), num_train=64, num_val=0, min_size=480, max_size=640)["train"]
            annotations, images_dir = paths["annotations"], paths["images"]
            source = "synthetic 480-640 px JPEG/PNG"
            coco = load_coco(annotations, images_dir)
        else:
            source = str(annotations)
            coco = load_coco(annotations, images_dir)
        dataset = DetectionDataset(coco.records, coco.mapping, image_size, max_boxes, Augmentation())
        keys = iter(TrainSampler(len(dataset), batch_size=1, seed=0))
        dataset.__getitems__([next(keys) for _ in range(batch_size)])  # warm PIL's decoders and the connection
        start = time.perf_counter()
        for first in range(0, num_images, batch_size):
            dataset.__getitems__([next(keys) for _ in range(min(batch_size, num_images - first))])
        return ThroughputResult(num_images, time.perf_counter() - start, tuple(image_size), source)
