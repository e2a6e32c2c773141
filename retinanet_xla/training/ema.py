"""Exponential moving average of the weights, updated inside the compiled training step.

The TF reference keeps one with decay 0.9998. The decay warms up as ``min(decay, (1 + n) /
(10 + n))`` after n steps (TF's ``num_updates`` rule), so early averages are not dominated by
the random initialisation. The step count is a device tensor: no graph change as it grows.
"""

import torch
from torch import Tensor, nn


class WeightAverage:
    def __init__(self, model: nn.Module, average: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = average.eval().requires_grad_(False)
        sources = list(model.state_dict(keep_vars=True).values())
        targets = list(average.state_dict(keep_vars=True).values())
        floating = [k for k, target in enumerate(targets) if target.is_floating_point()]
        others = [k for k, target in enumerate(targets) if not target.is_floating_point()]
        self._float_pairs = ([targets[k] for k in floating], [sources[k] for k in floating])
        # Integer buffers (num_batches_tracked) follow the model.
        self._other_pairs = ([targets[k] for k in others], [sources[k] for k in others])

    @torch.no_grad()
    def update(self, steps_done: Tensor) -> None:
        """In ``_foreach`` ops, out of place then copied: one traced op for all tensors (the
        host's tracing time; see SGD.step)."""
        n = steps_done.float()
        decay = torch.minimum(torch.full_like(n, self.decay), (1.0 + n) / (10.0 + n))
        targets, sources = self._float_pairs
        if targets:
            torch._foreach_copy_(
                targets, torch._foreach_add(torch._foreach_mul(targets, decay), torch._foreach_mul(sources, 1.0 - decay))
            )
        targets, sources = self._other_pairs
        if targets:
            torch._foreach_copy_(targets, sources)
