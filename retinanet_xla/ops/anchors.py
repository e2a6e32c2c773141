"""Anchors for a fixed input size, computed once on the host.

Because the input size is static, the anchors are a constant of the compiled graph: computing
them per step (as torchvision does from the feature maps) only adds host work. The order is
torchvision's: level by level, then row (y), column (x), and within a location aspect ratio
major, scale minor, so head outputs and anchors line up exactly as in ``torchvision.models.
detection.RetinaNet``.
"""

from typing import Sequence

import torch
from torch import Tensor


class AnchorGenerator:
    """Anchors of ``size * scale`` for each level's base size, at each aspect ratio (height/width).

    ``offset`` places anchor centres at ``(i + offset) * stride``: 0.5 centres them in their cell
    (the TF reference recipe); 0.0 puts them on the cell corner (torchvision).
    ``torchvision_rounding`` truncates each ``size * scale`` to an integer and rounds the base
    anchor corners, which torchvision does; with it and ``offset=0.0`` the anchors equal
    torchvision's ``AnchorGenerator`` for the RetinaNet configuration bit for bit.
    """

    def __init__(
        self,
        sizes: Sequence[float] = (32, 64, 128, 256, 512),
        scales: Sequence[float] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        offset: float = 0.0,
        torchvision_rounding: bool = True,
    ):
        if not sizes or not scales or not aspect_ratios:
            raise ValueError("anchor sizes, scales and aspect ratios must be non-empty")
        if any(v <= 0 for v in (*sizes, *scales, *aspect_ratios)):
            raise ValueError("anchor sizes, scales and aspect ratios must be positive")
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"anchor offset must be in [0, 1), got {offset}")
        self.sizes = tuple(float(s) for s in sizes)
        self.scales = tuple(float(s) for s in scales)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.offset = float(offset)
        self.torchvision_rounding = torchvision_rounding
        self._cache: dict = {}

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.scales) * len(self.aspect_ratios)

    def cell_anchors(self, level: int) -> Tensor:
        """Anchors [num_anchors_per_location, 4] centred on (0, 0) for one level, in float64."""
        sizes = torch.tensor([self.sizes[level] * s for s in self.scales], dtype=torch.float64)
        if self.torchvision_rounding:
            sizes = sizes.trunc()
        ratios = torch.tensor(self.aspect_ratios, dtype=torch.float64)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1.0 / h_ratios
        widths = (w_ratios[:, None] * sizes[None, :]).reshape(-1)
        heights = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
        base = torch.stack([-widths, -heights, widths, heights], dim=1) / 2
        return base.round() if self.torchvision_rounding else base

    def grid_anchors(self, image_size: Sequence[int], feature_sizes: Sequence[Sequence[int]]) -> Tensor:
        """All anchors [A, 4] (float32) for an input of ``image_size`` (H, W) whose levels have
        the spatial ``feature_sizes``. Strides are ``image_size // feature_size`` per axis, as in
        torchvision."""
        if len(feature_sizes) != self.num_levels:
            raise ValueError(f"{len(feature_sizes)} feature levels but anchors configured for {self.num_levels}")
        key = (tuple(image_size), tuple(tuple(f) for f in feature_sizes))
        if key not in self._cache:
            levels = []
            for level, (grid_h, grid_w) in enumerate(feature_sizes):
                stride_h = image_size[0] // grid_h
                stride_w = image_size[1] // grid_w
                shift_x = (torch.arange(grid_w, dtype=torch.float64) + self.offset) * stride_w
                shift_y = (torch.arange(grid_h, dtype=torch.float64) + self.offset) * stride_h
                yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
                shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
                levels.append((shifts + self.cell_anchors(level)[None]).reshape(-1, 4))
            self._cache[key] = torch.cat(levels).to(torch.float32)
        return self._cache[key]
