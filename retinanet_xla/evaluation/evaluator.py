"""Run a model over an evaluation split: fixed-shape batches on the device, candidates back to
the host once per batch, NMS there, boxes mapped to original pixels and dataset category ids."""

from pathlib import Path
from typing import Dict, List, Optional

import torch
from rich.progress import Progress

from retinanet_xla.config import Config
from retinanet_xla.data import DetectionDataset, EvalSampler, build_loader
from retinanet_xla.data.coco import CocoDataset
from retinanet_xla.engine.runtime import Runtime
from retinanet_xla.evaluation.coco_metrics import evaluate_detections, ground_truth
from retinanet_xla.models import RetinaNet
from retinanet_xla.ops import BoxCoder
from retinanet_xla.ops.postprocess import Candidates, filter_detections, select_candidates, to_original_pixels


class Evaluator:
    """Built once per split; ``run(model)`` may be called many times (evaluation during
    training reuses the loader and the compiled graph)."""

    def __init__(self, config: Config, coco: CocoDataset, runtime: Runtime, show_progress: bool = True):
        self.config, self.coco, self.runtime = config, coco, runtime
        self.show_progress = show_progress
        image_size = tuple(config.data.image_size)
        batch_size = config.eval.batch_size
        dataset = DetectionDataset(coco.records, coco.mapping, image_size, config.data.max_boxes, augmentation=None)
        self.loader = build_loader(dataset, EvalSampler(len(dataset), batch_size), batch_size, config.data.num_workers)
        self.num_batches = len(self.loader)
        self.box_coder = BoxCoder(config.model.box_coder_weights)
        self.gt = ground_truth(coco.annotations_file)
        self.anchors: Optional[torch.Tensor] = None

    @torch.no_grad()
    def _candidates(self, model: RetinaNet, batch: Dict[str, torch.Tensor]) -> Candidates:
        if self.anchors is None:
            self.anchors = model.anchors(tuple(self.config.data.image_size)).to(self.runtime.device)
        content = (batch["original_size"].float() * batch["scale"][:, None]).round()
        with self.runtime.autocast(self.config.train.precision):
            outputs = model(model.normalize(batch["images"]))
        return select_candidates(outputs["cls_logits"], outputs["bbox_regression"], self.anchors, self.box_coder, self.config.eval.pre_nms_top_k, content)

    def predict(self, model: RetinaNet) -> List[Dict]:
        """COCO-format detections for every image of the split (each exactly once)."""
        was_training = model.training
        model.eval()
        detections: List[Dict] = []
        keys = ("images", "original_size", "scale")
        progress = Progress(transient=True, disable=not self.show_progress)
        with progress:
            task = progress.add_task("eval", total=self.num_batches)
            for host_batch in self.loader:
                device_batch = {k: host_batch[k].to(self.runtime.device) for k in keys}
                candidates = self._candidates(model, device_batch)
                self.runtime.sync()
                detections += self._to_coco(filter_detections(candidates, self.config.eval), host_batch)
                progress.advance(task)
        model.train(was_training)
        return detections

    def _to_coco(self, per_image, batch) -> List[Dict]:
        results = []
        for image, found in enumerate(per_image):
            if not bool(batch["valid"][image]):
                continue
            height, width = batch["original_size"][image].tolist()
            boxes = to_original_pixels(found.boxes, float(batch["scale"][image]), height, width)
            category_ids = self.coco.mapping.to_category_ids(found.labels.numpy())
            for box, score, category_id in zip(boxes.tolist(), found.scores.tolist(), category_ids.tolist()):
                x1, y1, x2, y2 = box
                results.append(
                    {
                        "image_id": int(batch["image_id"][image]),
                        "category_id": int(category_id),
                        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                        "score": round(float(score), 5),
                    }
                )
        return results

    def evaluate(self, model: RetinaNet) -> Dict:
        detections = self.predict(model)
        result = evaluate_detections(self.gt, detections, [r.image_id for r in self.coco.records])
        result["detections"] = detections
        return result


def default_eval_dir(checkpoint: Path) -> Path:
    """``RUN/checkpoints/step_N.pt`` -> ``RUN/eval/step_N``."""
    return checkpoint.parent.parent / "eval" / checkpoint.stem
