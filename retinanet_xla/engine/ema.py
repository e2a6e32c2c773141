"""Exponential moving average of the weights, updated inside the compiled training step.

The TF reference keeps one with decay 0.9998. The decay warms up as ``min(decay, (1 + n) /
(10 + n))`` after n steps (TF's ``num_updates`` rule), so early averages are not dominated by
the random initialisation. The step count is a device tensor: no graph change as it grows.
"""

from typing import List

import torch
from torch import Tensor, nn


class WeightAverage:
    def __init__(self, model: nn.Module, average: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = average.eval().requires_grad_(False)
        self._sources: List[Tensor] = list(model.state_dict(keep_vars=True).values())
        self._targets: List[Tensor] = list(average.state_dict(keep_vars=True).values())

    @torch.no_grad()
    def update(self, steps_done: Tensor) -> None:
        n = steps_done.float()
        decay = torch.minimum(torch.full_like(n, self.decay), (1.0 + n) / (10.0 + n))
        for target, source in zip(self._targets, self._sources):
            if target.is_floating_point():
                target.copy_(target * decay + source.detach() * (1.0 - decay))
            else:
                target.copy_(source)  # integer buffers (num_batches_tracked) follow the model
