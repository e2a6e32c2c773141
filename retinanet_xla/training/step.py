"""The training step: forward, loss, backward, clipping and the optimizer update, traced as one
graph. It returns device tensors only; nothing here waits for the device.

It is a ``StepProgram`` for the runtime to compile (``Runtime.compile_step``): on torch-xla it
is traced on the first call only and its compiled graph replayed after that
(``runtime.step_graph: replay``, ``device/xla/replay.py``), so everything it updates is in
``TrainState.tensors``."""

from typing import Dict, List, Optional

import torch
from torch import Tensor

from retinanet_xla.device.runtime import Runtime
from retinanet_xla.training.optimizer import LearningRateSchedule
from retinanet_xla.training.state import TrainState


class TrainStep:
    def __init__(
        self,
        state: TrainState,
        schedule: LearningRateSchedule,
        anchors: Tensor,
        runtime: Runtime,
        precision: str = "fp32",
        grad_clip_norm: float = 0.0,
    ):
        self.state, self.schedule, self.anchors = state, schedule, anchors
        self.runtime = runtime
        self.precision = precision
        self.grad_clip_norm = grad_clip_norm
        self.replicas = runtime.replicas
        self._launch = runtime.compile_step(self)

    def __call__(self, batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return self._launch(batch)

    def state_tensors(self) -> List[Tensor]:
        return self.state.tensors()

    def seconds_waiting(self) -> float:
        """Time the calls so far spent waiting for the device to finish the step before (a
        replayed graph reads its inputs' buffers at launch), which is not the host's work."""
        return self._launch.waited_seconds

    def after_trace(self) -> None:
        """Nothing to drop: the gradients are values of the step, never stored in ``.grad``."""

    def trace(self, batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """One step, run eagerly, traced lazily or compiled (what ``__call__`` runs or replays).
        The gradients come from ``torch.autograd.grad``, not ``backward()`` into ``.grad``: the
        same math on every backend, and ``torch.compile`` traces it into the step's one graph."""
        s = self.state
        with self.runtime.autocast(self.precision):
            outputs = s.model(s.model.normalize(batch["images"]))
        losses = s.loss_fn(outputs, self.anchors, batch["boxes"], batch["labels"], batch["crowd"])
        gradients = list(torch.autograd.grad(losses["loss"], s.optimizer.params, allow_unused=True))
        gradients = self.replicas.average_gradients(gradients)
        grad_norm = self._clip_gradients(gradients)
        lr = self.schedule(s.step)
        s.optimizer.step(lr, gradients)
        s.step += 1
        if s.ema is not None:
            s.ema.update(s.step)
        # What is logged is the mean over replicas (the foreground count already is).
        loss, cls_loss, box_loss = self.replicas.mean(torch.stack([losses[k].detach() for k in ("loss", "cls_loss", "box_loss")]))
        return {
            "loss": loss,
            "cls_loss": cls_loss,
            "box_loss": box_loss,
            "num_foreground": losses["num_foreground"].detach(),
            "lr": lr,
            "grad_norm": grad_norm,
        }

    @torch.no_grad()
    def _clip_gradients(self, gradients: List[Optional[Tensor]]) -> Tensor:
        """Global gradient norm, and clipping to ``grad_clip_norm`` when set, on the device
        (``clip_grad_norm_`` would be equivalent; this keeps the norm for logging). In
        ``_foreach`` ops, in place or out of place then copied as the optimizer updates
        (``UpdateStyle``; SGD.step says why)."""
        grads = [g for g in gradients if g is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([g.float() for g in grads])))
        if self.grad_clip_norm > 0:
            factor = (self.grad_clip_norm / (norm + 1e-6)).clamp(max=1.0).to(grads[0].dtype)
            if self.state.optimizer.style.in_place:
                torch._foreach_mul_(grads, factor)
            else:
                torch._foreach_copy_(grads, torch._foreach_mul(grads, factor))
        return norm
