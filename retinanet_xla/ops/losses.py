"""RetinaNet loss over the whole padded batch: sigmoid focal loss + box regression loss.

The normaliser is the number of foreground anchors in the *global* batch (the TF recipe and
detectron2), not per image (torchvision), so that R replicas with batch B/R compute the same
update as one replica with batch B.
"""

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retinanet_xla.config import BOX_LOSSES
from retinanet_xla.ops.box_coder import BoxCoder
from retinanet_xla.ops.boxes import generalized_box_iou_pairwise
from retinanet_xla.ops.matcher import BACKGROUND, FOREGROUND, AnchorMatcher


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss (Lin et al. 2017); equals torchvision's with ``reduction="none"``.
    ``alpha < 0`` disables the class balancing term, as in torchvision."""
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def _identity(tensor: Tensor) -> Tensor:
    return tensor


class DetectionLoss(nn.Module):
    """Matches anchors to padded ground truth and returns the RetinaNet losses.

    ``box_loss``: ``smooth_l1`` (torchvision; ``beta`` is its transition point), ``huber``
    (``beta`` times smooth L1: TF's Huber with delta ``beta``), ``l1``, or ``giou`` (on decoded
    boxes). Per-anchor box losses are summed over the 4 coordinates; TF/Keras averages them, so
    the TF recipe's weight 50 is 12.5 here.

    ``average_across_replicas`` maps a local scalar to its mean over replicas (identity on one
    device); the trainer passes an all-reduce. ``normalizer_momentum > 0`` smooths the normaliser
    with an exponential moving average kept in a buffer (detectron2's ``loss_normalizer``).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: Optional[AnchorMatcher] = None,
        box_coder: Optional[BoxCoder] = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_loss: str = "smooth_l1",
        box_loss_beta: float = 0.0,
        box_loss_weight: float = 1.0,
        normalizer_momentum: float = 0.0,
        average_across_replicas: Callable[[Tensor], Tensor] = _identity,
    ):
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {', '.join(BOX_LOSSES)}, got {box_loss!r}")
        if box_loss in ("smooth_l1", "huber") and box_loss_beta < 0 or box_loss == "huber" and box_loss_beta == 0:
            raise ValueError(f"box_loss_beta must be >= 0 for smooth_l1 and > 0 for huber, got {box_loss_beta}")
        if not 0.0 <= normalizer_momentum < 1.0:
            raise ValueError(f"normalizer_momentum must be in [0, 1), got {normalizer_momentum}")
        self.num_classes = num_classes
        self.matcher = matcher or AnchorMatcher()
        self.box_coder = box_coder or BoxCoder()
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.box_loss = box_loss
        self.box_loss_beta = box_loss_beta
        self.box_loss_weight = box_loss_weight
        self.normalizer_momentum = normalizer_momentum
        self.average_across_replicas = average_across_replicas
        # detectron2 starts the moving average at 100 positives per batch.
        self.register_buffer("normalizer_ema", torch.tensor(100.0))

    def forward(
        self,
        outputs: Dict[str, Tensor],
        anchors: Tensor,
        boxes: Tensor,
        labels: Tensor,
        crowd: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """outputs: ``cls_logits`` [B, A, C] and ``bbox_regression`` [B, A, 4]; anchors [A, 4];
        boxes [B, M, 4] float; labels [B, M] int (-1 = padding); crowd [B, M] bool."""
        cls_logits = outputs["cls_logits"].float()
        bbox_regression = outputs["bbox_regression"].float()
        boxes = boxes.float()
        if crowd is None:
            crowd = torch.zeros_like(labels, dtype=torch.bool)
        match = self.matcher(anchors, boxes, labels, crowd)
        foreground = (match.state == FOREGROUND).to(cls_logits.dtype)  # [B, A]
        valid = (match.state != -1).to(cls_logits.dtype)

        num_foreground = self.average_across_replicas(foreground.sum())
        normalizer = num_foreground.clamp(min=1.0)
        if self.normalizer_momentum > 0:
            if self.training:
                with torch.no_grad():
                    m = self.normalizer_momentum
                    self.normalizer_ema.copy_(m * self.normalizer_ema + (1 - m) * normalizer)
            normalizer = self.normalizer_ema.clone()

        matched_labels = labels.gather(1, match.matched_index)  # [B, A]
        classes = torch.arange(self.num_classes, device=labels.device)
        cls_targets = (matched_labels[..., None] == classes).to(cls_logits.dtype) * foreground[..., None]
        cls_loss = sigmoid_focal_loss(cls_logits, cls_targets, self.focal_alpha, self.focal_gamma)
        cls_loss = (cls_loss.sum(dim=2) * valid).sum() / normalizer

        matched_boxes = boxes.gather(1, match.matched_index[..., None].expand(-1, -1, 4))  # [B, A, 4]
        box_loss = (self._box_loss(bbox_regression, matched_boxes, anchors) * foreground).sum() / normalizer

        return {
            "loss": cls_loss + self.box_loss_weight * box_loss,
            "cls_loss": cls_loss,
            "box_loss": box_loss,
            "num_foreground": num_foreground,
            "num_background": (match.state == BACKGROUND).sum(),
        }

    def _box_loss(self, regression: Tensor, matched_boxes: Tensor, anchors: Tensor) -> Tensor:
        """Per-anchor box loss [B, A]; callers mask it to foreground anchors."""
        anchors = anchors.to(regression.dtype)[None]
        if self.box_loss == "giou":
            predicted = self.box_coder.decode(regression, anchors)
            return 1.0 - generalized_box_iou_pairwise(predicted, matched_boxes)
        targets = self.box_coder.encode(matched_boxes, anchors)
        if self.box_loss == "l1":
            return (regression - targets).abs().sum(dim=-1)
        per_coord = F.smooth_l1_loss(regression, targets, reduction="none", beta=self.box_loss_beta)
        if self.box_loss == "huber":
            per_coord = per_coord * self.box_loss_beta
        return per_coord.sum(dim=-1)
