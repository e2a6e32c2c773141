"""``TrainState``: everything training carries from one step to the next, listed once.

Weights and buffers, optimizer state, the loss's state (the positives normaliser), the step
counter and the weight average. The step traces and replays over ``tensors()``, the runtime
prepares ``tensors()`` before step 1, and a checkpoint is ``payload()`` / ``restore()``: a
tensor added to training state is added here and nowhere else.
"""

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from retinanet_xla.ops import DetectionLoss
from retinanet_xla.rundir.checkpoint import inference_weights
from retinanet_xla.training.ema import WeightAverage
from retinanet_xla.training.optimizer import Optimizer

# What a checkpoint needs beyond what any checkpoint has (rundir.checkpoint.REQUIRED_KEYS) for
# training to continue exactly where it stopped.
RESUME_KEYS = ("optimizer", "loss", "torch_rng_state")


class TrainState:
    def __init__(
        self, model: nn.Module, loss_fn: DetectionLoss, optimizer: Optimizer, ema: Optional[WeightAverage], device: torch.device
    ):
        self.model, self.loss_fn, self.optimizer, self.ema = model, loss_fn, optimizer, ema
        # The step counter lives on the device: the learning rate is computed from it inside
        # the graph, so a changing rate never changes the graph.
        self.step = torch.zeros((), dtype=torch.int64, device=device)

    def tensors(self) -> List[Tensor]:
        """Every tensor a step reads from the one before or updates, as the objects hold them."""
        tensors = [*self.model.state_dict(keep_vars=True).values(), *self.optimizer.state_tensors()]
        tensors += [*self.loss_fn.state_dict(keep_vars=True).values(), self.step]
        if self.ema is not None:
            tensors += list(self.ema.model.state_dict(keep_vars=True).values())
        return tensors

    @property
    def inference_model(self) -> nn.Module:
        """The weights to evaluate and keep for inference: the weight average where the run
        keeps one (as the TF reference does), else the model."""
        return self.ema.model if self.ema is not None else self.model

    def payload(self, step: int) -> Dict:
        """The state's part of a checkpoint at ``step`` (the loop's count, so that saving reads
        nothing back from the device but the tensors themselves)."""
        return {
            "step": step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss": self.loss_fn.state_dict(),
            **({"ema": self.ema.model.state_dict()} if self.ema is not None else {}),
        }

    def restore(self, payload: Dict) -> None:
        """A checkpoint's state (``payload``) into these tensors. Raises what ``load_state_dict``
        raises when the shapes or names do not fit; the caller says which file it was."""
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.loss_fn.load_state_dict(payload["loss"])
        if self.ema is not None:  # a run without an average before: it starts from the weights
            self.ema.model.load_state_dict(inference_weights(payload))
        self.step.copy_(torch.tensor(payload["step"], dtype=torch.int64))
