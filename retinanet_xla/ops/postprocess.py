"""Detections from raw head outputs, in two halves.

On the device, with static shapes: sigmoid scores, one top-k over every (anchor, class) pair
(``pre_nms_top_k``), decoding of the chosen boxes and clipping to each image's content.
On the host, once per batch, on those few candidates only: score threshold, per-class NMS,
per-class and per-image caps. NMS output sizes depend on the data, which is why it stays off
the device (the export issue moves a fixed-size NMS into the graph).
"""

from typing import List, NamedTuple

import torch
from torch import Tensor
from torchvision.ops import nms

from retinanet_xla.config import PostprocessConfig
from retinanet_xla.ops.box_coder import BoxCoder


class Candidates(NamedTuple):
    boxes: Tensor  # [B, K, 4] in input-canvas pixels, clipped to the image content
    scores: Tensor  # [B, K] sigmoid probabilities, descending
    labels: Tensor  # [B, K] int64


class Detections(NamedTuple):
    boxes: Tensor  # [N, 4]
    scores: Tensor  # [N]
    labels: Tensor  # [N]


def select_candidates(
    cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor, box_coder: BoxCoder, top_k: int, content_size: Tensor
) -> Candidates:
    """cls_logits [B, A, C], bbox_regression [B, A, 4], anchors [A, 4]; ``content_size`` [B, 2]
    (height, width) of the real image inside the padded canvas. Static shapes throughout."""
    batch, num_anchors, num_classes = cls_logits.shape
    k = min(top_k, num_anchors * num_classes)
    scores, flat_index = torch.sigmoid(cls_logits.float()).reshape(batch, -1).topk(k, dim=1)
    anchor_index = flat_index // num_classes
    labels = flat_index % num_classes
    deltas = bbox_regression.float().gather(1, anchor_index[..., None].expand(-1, -1, 4))
    boxes = box_coder.decode(deltas, anchors[anchor_index])
    limits = content_size.flip(-1).to(boxes.dtype).repeat(1, 2)[:, None, :]  # [B, 1, 4]: w, h, w, h
    boxes = torch.minimum(boxes.clamp(min=0), limits)
    return Candidates(boxes, scores, labels)


def per_class_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Indices kept by NMS within each class, by decreasing score. Each class's boxes are moved
    apart by more than the largest coordinate, so one ``nms`` call never lets two classes
    overlap. torchvision's ``batched_nms`` does the same for small inputs, but above 4,000 box
    coordinates on the CPU it loops over ``torch.unique(labels)``, which ``torch.export``
    cannot trace (the reference config's 5,000 candidates); one rule everywhere keeps the
    exported detector and evaluation identical."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = labels.to(boxes.dtype) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def filter_detections(candidates: Candidates, config: PostprocessConfig) -> List[Detections]:
    """Host half: per image, threshold, per-class NMS and the per-class and per-image caps."""
    results = []
    for boxes, scores, labels in zip(*(t.cpu() for t in candidates)):
        keep = scores >= config.score_threshold
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        wide = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, labels = boxes[wide], scores[wide], labels[wide]
        keep = per_class_nms(boxes, scores, labels, config.nms_iou)  # sorted by score
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        # Rank of each detection within its class (inputs are sorted by score).
        same_class_before = (labels[:, None] == labels[None, :]).tril(-1).sum(dim=1)
        keep = same_class_before < config.max_detections_per_class
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        results.append(
            Detections(boxes[: config.max_detections], scores[: config.max_detections], labels[: config.max_detections])
        )
    return results


def to_original_pixels(boxes: Tensor, scale: float, height: int, width: int) -> Tensor:
    """Undo the letterbox: canvas pixels -> the original image's pixels, clipped to it."""
    boxes = boxes / scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes
