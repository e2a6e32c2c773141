"""Anchor to ground-truth matching for a padded batch, with static shapes.

Ground truth arrives padded to ``max_boxes`` per image (label -1 marks a padded slot). Every
decision is a mask over the [B, A, M] IoU matrix, so an image with 0 boxes or with
``max_boxes`` boxes runs the same graph.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from retinanet_xla.ops.boxes import box_ioa, box_iou

FOREGROUND = 1
BACKGROUND = 0
IGNORE = -1


class MatchResult(NamedTuple):
    matched_index: Tensor  # [B, A] int64: ground-truth slot of each anchor (meaningful for foreground)
    state: Tensor  # [B, A] int64: FOREGROUND, BACKGROUND or IGNORE
    max_iou: Tensor  # [B, A]: best IoU of each anchor with any real, non-crowd box (-1 if none)


class AnchorMatcher:
    """IoU >= ``positive_threshold`` is foreground, IoU < ``negative_threshold`` background, in
    between ignored. With ``allow_low_quality_matches`` every real box also claims the anchors it
    overlaps most (ties included), so small or oddly shaped objects always have a positive; as in
    torchvision such an anchor is assigned the box it overlaps most.
    Crowd boxes never become targets: anchors covered by one for at least ``crowd_ioa_threshold``
    of their area are ignored unless they are foreground for a real box.
    """

    def __init__(
        self,
        positive_threshold: float = 0.5,
        negative_threshold: float = 0.4,
        allow_low_quality_matches: bool = True,
        crowd_ioa_threshold: float = 0.5,
    ):
        if not 0.0 <= negative_threshold <= positive_threshold <= 1.0:
            raise ValueError(
                "matcher thresholds need 0 <= negative_threshold <= positive_threshold <= 1, "
                f"got negative={negative_threshold}, positive={positive_threshold}"
            )
        self.positive_threshold = positive_threshold
        self.negative_threshold = negative_threshold
        self.allow_low_quality_matches = allow_low_quality_matches
        self.crowd_ioa_threshold = crowd_ioa_threshold

    def __call__(self, anchors: Tensor, boxes: Tensor, labels: Tensor, crowd: Tensor) -> MatchResult:
        """anchors [A, 4]; boxes [B, M, 4]; labels [B, M] (-1 = padding); crowd [B, M] bool."""
        batch = boxes.shape[0]
        anchors = anchors.to(boxes.dtype).unsqueeze(0).expand(batch, -1, -1)
        real = labels >= 0
        target = real & ~crowd  # [B, M]
        iou = box_iou(anchors, boxes)  # [B, A, M]
        iou = torch.where(target[:, None, :], iou, torch.full_like(iou, -1.0))
        max_iou, matched_index = iou.max(dim=2)  # [B, A]

        foreground = max_iou >= self.positive_threshold
        if self.allow_low_quality_matches:
            best_per_box = iou.max(dim=1, keepdim=True).values  # [B, 1, M]
            is_best = (iou == best_per_box) & (best_per_box > 0) & target[:, None, :]
            foreground = foreground | is_best.any(dim=2)
        background = (max_iou < self.negative_threshold) & ~foreground

        crowd_slots = real & crowd
        ioa = box_ioa(anchors, boxes)
        in_crowd = ((ioa >= self.crowd_ioa_threshold) & crowd_slots[:, None, :]).any(dim=2)
        background = background & ~in_crowd

        state = torch.full_like(matched_index, IGNORE)
        state = torch.where(background, torch.full_like(state, BACKGROUND), state)
        state = torch.where(foreground, torch.full_like(state, FOREGROUND), state)
        return MatchResult(matched_index, state, max_iou)
