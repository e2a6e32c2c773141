"""Anchor-relative box encoding (dx, dy, log dw, log dh), as torchvision's ``BoxCoder``.

The weights are the inverse of the TF recipe's "variance": variance (0.1, 0.1, 0.2, 0.2) is
weights (10, 10, 5, 5); torchvision's RetinaNet uses (1, 1, 1, 1).
"""

import math
from typing import Sequence

import torch
from torch import Tensor

# torchvision clamps dw/dh before exp so that a wild prediction cannot overflow.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), scale_clamp: float = DEFAULT_SCALE_CLAMP):
        if len(weights) != 4 or any(w <= 0 for w in weights):
            raise ValueError(f"box coder weights must be 4 positive numbers, got {tuple(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Regression targets [..., 4] of ``boxes`` relative to ``anchors`` (same leading shape,
        or broadcastable). Zero-size boxes (padding) give finite garbage that callers mask."""
        wx, wy, ww, wh = self.weights
        anchor_w = anchors[..., 2] - anchors[..., 0]
        anchor_h = anchors[..., 3] - anchors[..., 1]
        anchor_cx = anchors[..., 0] + 0.5 * anchor_w
        anchor_cy = anchors[..., 1] + 0.5 * anchor_h
        tiny = torch.finfo(boxes.dtype).tiny
        box_w = (boxes[..., 2] - boxes[..., 0]).clamp(min=tiny)
        box_h = (boxes[..., 3] - boxes[..., 1]).clamp(min=tiny)
        box_cx = boxes[..., 0] + 0.5 * (boxes[..., 2] - boxes[..., 0])
        box_cy = boxes[..., 1] + 0.5 * (boxes[..., 3] - boxes[..., 1])
        dx = wx * (box_cx - anchor_cx) / anchor_w
        dy = wy * (box_cy - anchor_cy) / anchor_h
        dw = ww * torch.log(box_w / anchor_w)
        dh = wh * torch.log(box_h / anchor_h)
        return torch.stack((dx, dy, dw, dh), dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Boxes [..., 4] from regression outputs ``deltas`` and ``anchors`` (broadcastable)."""
        wx, wy, ww, wh = self.weights
        anchors = anchors.to(deltas.dtype)
        anchor_w = anchors[..., 2] - anchors[..., 0]
        anchor_h = anchors[..., 3] - anchors[..., 1]
        anchor_cx = anchors[..., 0] + 0.5 * anchor_w
        anchor_cy = anchors[..., 1] + 0.5 * anchor_h
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
        cx = dx * anchor_w + anchor_cx
        cy = dy * anchor_h + anchor_cy
        half_w = 0.5 * torch.exp(dw) * anchor_w
        half_h = 0.5 * torch.exp(dh) * anchor_h
        return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)
