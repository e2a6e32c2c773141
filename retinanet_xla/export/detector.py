"""The detector as one graph with fixed-size outputs, for serving outside this package.

Evaluation runs NMS on the host because its output size depends on the data. Here NMS stays in
the graph and only its *indices* are data-dependent: they are scattered into a mask over the
fixed-size candidates, and everything after is static (per-class cap through a one-hot
running count, per-image cap through top-k). The result equals ``filter_detections``.
"""

from typing import Tuple

import torch
from torch import Tensor, nn

from retinanet_xla.config import PostprocessConfig
from retinanet_xla.inference.detector import CandidateDetector
from retinanet_xla.ops.postprocess import Candidates, per_class_nms


class ExportedDetector(nn.Module):
    """``CandidateDetector`` followed by the evaluation post-processing inside the graph:
    boxes [B, N, 4] (x1, y1, x2, y2 in canvas pixels), scores [B, N], labels [B, N] (-1 past
    the count) and count [B], N = ``max_detections``; rows past ``count`` are zeros."""

    def __init__(self, candidates: CandidateDetector, postprocess: PostprocessConfig, num_classes: int):
        super().__init__()
        self.candidates, self.postprocess, self.num_classes = candidates, postprocess, num_classes

    def forward(self, images: Tensor, content_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        boxes, scores, labels = self.candidates(images, content_sizes)
        results = [
            fixed_size_detections(Candidates(*found), self.postprocess, self.num_classes) for found in zip(boxes, scores, labels)
        ]
        return tuple(torch.stack(parts) for parts in zip(*results))


def fixed_size_detections(
    found: Candidates, config: PostprocessConfig, num_classes: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One image's candidates (sorted by score) -> its ``max_detections`` best after the
    threshold, per-class NMS and the per-class cap, with the same result as the host path.

    NMS runs over every candidate: those under the threshold score below every kept one and can
    only suppress others under it, and boxes without area overlap nothing."""
    boxes, scores, labels = found
    valid = (scores >= config.score_threshold) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep = per_class_nms(boxes, scores, labels, config.nms_iou)
    kept = torch.zeros_like(valid).scatter(0, keep, torch.ones_like(keep, dtype=torch.bool)) & valid
    # Rank of each kept candidate within its class, in score order.
    same_class = nn.functional.one_hot(labels, num_classes) * kept[:, None].long()
    rank = same_class.cumsum(0).gather(1, labels[:, None])[:, 0] - 1
    kept = kept & (rank < config.max_detections_per_class)
    order = torch.where(kept, scores, torch.full_like(scores, -1.0)).topk(config.max_detections).indices
    chosen = kept[order]
    count = chosen.sum()
    return (
        torch.where(chosen[:, None], boxes[order], torch.zeros_like(boxes[order])),
        torch.where(chosen, scores[order], torch.zeros_like(scores[order])),
        torch.where(chosen, labels[order], torch.full_like(labels[order], -1)),
        count,
    )
