"""Box geometry on (x1, y1, x2, y2) boxes, batched and shape-stable.

torchvision's ``box_iou`` works on one image at a time; the matcher needs the whole padded batch
at once ([B, A, 4] against [B, M, 4]) so the step is one fused graph.
"""

import torch
from torch import Tensor


def box_area(boxes: Tensor) -> Tensor:
    """Area of boxes [..., 4]; degenerate boxes (x2 < x1) count as zero, never negative."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _intersection(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection areas [..., N, M] of boxes1 [..., N, 4] with boxes2 [..., M, 4]."""
    top_left = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU [..., N, M]. Zero-area pairs give 0 rather than NaN (padded ground truth)."""
    inter = _intersection(boxes1, boxes2)
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def box_ioa(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection over the area of ``boxes1`` [..., N, M]: how much of each anchor a crowd
    region covers. IoU would be tiny for a small anchor inside a large crowd box."""
    inter = _intersection(boxes1, boxes2)
    return inter / box_area(boxes1)[..., :, None].clamp(min=torch.finfo(inter.dtype).tiny)


def generalized_box_iou_pairwise(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of matching pairs [...]: boxes1[i] against boxes2[i] (not all pairs), for the loss."""
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    eps = 1e-7
    iou = inter / (union + eps)
    hull_wh = (torch.maximum(boxes1[..., 2:], boxes2[..., 2:]) - torch.minimum(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou - (hull - union) / (hull + eps)
