"""Run a model over an evaluation split: fixed-shape batches on the device, candidates back to
the host once per batch, NMS there, boxes mapped to original pixels and dataset category ids;
with several replicas, each takes a shard and the master gathers and scores."""

from typing import Dict, List, Optional

import torch
from rich.progress import Progress

from retinanet_xla import storage
from retinanet_xla.config import Config
from retinanet_xla.data import DetectionDataset, EvalSampler, build_loader
from retinanet_xla.data.coco import CocoDataset
from retinanet_xla.data.frames import map_boxes
from retinanet_xla.data.splits import resolve_max_boxes
from retinanet_xla.device.runtime import Runtime
from retinanet_xla.errors import require_package
from retinanet_xla.inference.coco_metrics import evaluate_detections, ground_truth
from retinanet_xla.inference.detector import Detector
from retinanet_xla.inference.scoring import BackgroundScoring
from retinanet_xla.models import RetinaNet
from retinanet_xla.ops.postprocess import Detections, to_original_pixels
from retinanet_xla.rundir.directory import run_of
from retinanet_xla.storage import Location

# What stays on the host of an evaluation batch: what maps each image's detections back to it.
HOST_KEYS = ("original_size", "scale", "to_annotation", "valid", "image_id")


class Evaluator:
    """Built once per split; ``evaluate(model)`` may be called many times (evaluation during
    training reuses the loader and the compiled graphs).

    With several replicas, each runs the model and NMS over its shard of the split
    (``EvalSampler``); the detections travel to the master in fixed-size tensors (one
    all-gather, compiled once per split), and the master alone scores them."""

    def __init__(self, config: Config, coco: CocoDataset, runtime: Runtime, show_progress: bool = True):
        if config.eval.backend == "faster-coco-eval":  # before any prediction, not at the first scoring
            require_package("faster_coco_eval", "eval.backend faster-coco-eval", "eval")
        self.config, self.coco, self.runtime = config, coco, runtime
        self.replicas = replicas = runtime.replicas
        self.show_progress = show_progress and replicas.is_master
        image_size = tuple(config.data.image_size)
        self.batch_size = batch_size = replicas.share(config.eval.batch_size, "eval.batch_size")
        # Ground truth is scored from the annotation file: the padded boxes only fill the batch.
        max_boxes = resolve_max_boxes(coco, config.data.max_boxes)
        dataset = DetectionDataset(coco.records, coco.mapping, image_size, max_boxes, None, config.data.max_pixels)
        sampler = EvalSampler(len(dataset), batch_size, replicas.world, replicas.rank)
        self.loader = build_loader(dataset, sampler, batch_size, config.data.num_workers)
        self.num_batches = len(self.loader)
        # Rows of the gathered tensors: every image of the shard (padding included) at its cap.
        self.capacity = len(sampler) * config.eval.max_detections
        self.index_of = {record.image_id: index for index, record in enumerate(coco.records)}
        if len(coco.records) >= 2**24:
            raise ValueError(
                f"{coco.annotations_file}: {len(coco.records)} images; evaluation handles fewer than 2**24 per split"
            )
        self.gt = ground_truth(coco.annotations_file) if replicas.is_master else None
        self.detector: Optional[Detector] = None

    def predict(self, model: RetinaNet) -> Optional[List[Dict]]:
        """COCO-format detections for every image of the split (each exactly once), in split
        order; None on replicas other than the master."""
        if self.detector is None or self.detector.candidates.model is not model:
            self.detector = Detector(model, self.config, self.runtime, self.batch_size)
        shard = ShardDetections(self.capacity)
        progress = Progress(transient=True, disable=not self.show_progress)
        batches = self.runtime.device_batches(map(evaluation_batch, self.loader), host_keys=HOST_KEYS)
        try:
            with progress:
                task = progress.add_task("eval", total=self.num_batches)
                for batch in batches:
                    self._collect(shard, self.detector(batch["images"], batch["content_sizes"]), batch)
                    progress.advance(task)
        finally:
            batches.close()
        rows = self.replicas.gather(shard.rows)
        return self._to_coco(rows) if self.replicas.is_master else None

    def _collect(self, shard: "ShardDetections", per_image: List[Detections], batch: Dict[str, torch.Tensor]) -> None:
        """A batch's detections, in the annotation file's frame, into ``shard``; padding slots are
        dropped. Canvas -> decoded pixels (clipped to the image) -> the JSON's frame, the inverse
        of what training does to the JSON's boxes (``data.frames``)."""
        for image, found in enumerate(per_image):
            if bool(batch["valid"][image]):
                height, width = batch["original_size"][image].tolist()
                boxes = to_original_pixels(found.boxes, float(batch["scale"][image]), height, width)
                boxes = torch.from_numpy(map_boxes(batch["to_annotation"][image].double().numpy(), boxes.numpy()))
                shard.add(self.index_of[int(batch["image_id"][image])], boxes, found.scores, found.labels)

    def _to_coco(self, rows: torch.Tensor) -> List[Dict]:
        rows = rows[rows[:, 0] >= 0]
        # Split order, and within an image the order of its detections (a stable sort): the
        # same order whatever the number of replicas.
        rows = rows[torch.sort(rows[:, 0], stable=True).indices]
        indices, labels = rows[:, 0].long(), rows[:, 1].long()
        category_ids = self.coco.mapping.to_category_ids(labels.numpy())
        results = []
        for index, category_id, (x1, y1, x2, y2, score) in zip(indices.tolist(), category_ids.tolist(), rows[:, 2:].tolist()):
            results.append(
                {
                    "image_id": self.coco.records[index].image_id,
                    "category_id": int(category_id),
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "score": round(score, 5),
                }
            )
        return results

    def evaluate(self, model: RetinaNet) -> Optional[Dict]:
        """Metrics and detections on the master; None on the other replicas."""
        detections = self.predict(model)
        if detections is None:
            return None
        return {**self.score(detections), "detections": detections}

    def score(self, detections: List[Dict]) -> Dict:
        """The split's COCO metrics for ``detections`` (the master's ``predict``), in this process."""
        return evaluate_detections(self.gt, detections, self._image_ids(), self.config.eval.backend)

    def background_scoring(self) -> BackgroundScoring:
        """The same scoring in a background process (train's evaluations), ``score`` its fallback."""
        return BackgroundScoring(self.coco.annotations_file, self._image_ids(), self.config.eval.backend, self.score)

    def _image_ids(self) -> List[int]:
        return [record.image_id for record in self.coco.records]


def evaluation_batch(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """What evaluation needs of a loader's batch: the images and the size of each image's
    content inside its canvas (height, width) for the device, ``HOST_KEYS`` for the host."""
    content_sizes = (batch["original_size"].float() * batch["scale"][:, None]).round()
    return {"images": batch["images"], "content_sizes": content_sizes, **{key: batch[key] for key in HOST_KEYS}}


class ShardDetections:
    """One replica's detections as fixed-size float32 rows: split index (-1 marks padding),
    label, x1, y1, x2, y2 in original pixels, score. A fixed size keeps the all-gather one
    compiled graph; float32 holds indices and labels exactly below 2**24."""

    def __init__(self, capacity: int):
        self.rows = torch.zeros(capacity, 7, dtype=torch.float32)
        self.rows[:, 0] = -1
        self.count = 0

    def add(self, index: int, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> None:
        end = self.count + len(scores)
        self.rows[self.count : end, 0] = index
        self.rows[self.count : end, 1] = labels.float()
        self.rows[self.count : end, 2:6] = boxes
        self.rows[self.count : end, 6] = scores
        self.count = end


def default_eval_dir(checkpoint: Location) -> Location:
    """``RUN/checkpoints/step_N.pt`` -> ``RUN/eval/step_N``."""
    return storage.join(run_of(checkpoint), "eval", storage.stem(checkpoint))
