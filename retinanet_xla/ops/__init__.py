"""Static-shape detection math: every function here keeps tensor shapes independent of the data,
so XLA traces it once. No ``nonzero``, boolean indexing or ``.item()``."""

from retinanet_xla.ops.anchors import AnchorGenerator
from retinanet_xla.ops.box_coder import BoxCoder
from retinanet_xla.ops.boxes import box_area, box_ioa, box_iou, generalized_box_iou_pairwise
from retinanet_xla.ops.losses import DetectionLoss, sigmoid_focal_loss
from retinanet_xla.ops.matcher import AnchorMatcher, MatchResult

__all__ = [
    "AnchorGenerator",
    "AnchorMatcher",
    "BoxCoder",
    "DetectionLoss",
    "MatchResult",
    "box_area",
    "box_ioa",
    "box_iou",
    "generalized_box_iou_pairwise",
    "sigmoid_focal_loss",
]
