"""The optimizers (SGD with momentum/Nesterov, AdamW) and a learning-rate schedule computed on
the device.

``torch.optim``'s optimizer classes keep the learning rate as a Python float, which XLA bakes
into the graph as a constant, so every change of the rate would compile a new graph; and they
create their state lazily on the first step, so the first step's graph differs from all later
ones. Here the step counter, the rate and the state are device tensors that exist before step
one; AdamW's math is ``torch.optim``'s own functional ``adamw``, given that state.
"""

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw

from retinanet_xla.config import OptimizerConfig, ScheduleConfig
from retinanet_xla.device.runtime import UpdateStyle

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(model: nn.Module, decay_norm_and_bias: bool) -> Dict[str, List[nn.Parameter]]:
    """Trainable parameters split into those with and without weight decay."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            exempt = isinstance(module, _NORM_TYPES) or name == "bias"
            (no_decay if exempt and not decay_norm_and_bias else decay).append(parameter)
    return {"decay": decay, "no_decay": no_decay}


class LearningRateSchedule:
    """Linear warmup from ``warmup_start_lr`` to ``base_lr``, then step decay (x ``decay_factor``
    at each of ``decay_steps``) or cosine decay to ``final_lr_fraction * base_lr`` at
    ``total_steps``. Works on any tensor of step numbers (device or host)."""

    def __init__(self, config: ScheduleConfig, total_steps: int):
        self.config = config
        self.total_steps = total_steps

    def __call__(self, step: Tensor) -> Tensor:
        c = self.config
        step = step.float()
        if c.kind == "cosine":
            span = max(self.total_steps - c.warmup_steps, 1)
            progress = ((step - c.warmup_steps) / span).clamp(0.0, 1.0)
            final = c.final_lr_fraction * c.base_lr
            after_warmup = final + (c.base_lr - final) * 0.5 * (1.0 + torch.cos(math.pi * progress))
        else:
            decays = sum((step >= boundary).float() for boundary in c.decay_steps) if c.decay_steps else torch.zeros_like(step)
            after_warmup = c.base_lr * torch.pow(torch.full_like(step, c.decay_factor), decays)
        if c.warmup_steps <= 0:
            return after_warmup
        warmup = c.warmup_start_lr + (c.base_lr - c.warmup_start_lr) * step / c.warmup_steps
        return torch.where(step < c.warmup_steps, warmup, after_warmup)


class Optimizer:
    """The update of the trainable parameters, with its state as device tensors that exist
    before step one (``state_tensors``: the step's graph reads and updates them). ``style``:
    how the backend wants tensors updated (``Runtime.update_style``)."""

    name = ""

    def __init__(self, groups: Dict[str, Sequence[nn.Parameter]], config: OptimizerConfig, style: UpdateStyle = UpdateStyle()):
        self.config, self.style = config, style
        self.in_place = style.in_place
        self.params: List[nn.Parameter] = list(groups["decay"]) + list(groups["no_decay"])
        self.decay_flags = [True] * len(groups["decay"]) + [False] * len(groups["no_decay"])

    def step(self, lr: Tensor, gradients: Sequence[Optional[Tensor]]) -> None:
        raise NotImplementedError

    def state(self) -> Dict[str, List[Tensor]]:
        """The state tensors by name, one per parameter in each list."""
        raise NotImplementedError

    def state_tensors(self) -> List[Tensor]:
        return [tensor for tensors in self.state().values() for tensor in tensors]

    def state_dict(self) -> Dict[str, List[Tensor]]:
        return {name: list(tensors) for name, tensors in self.state().items()}

    def load_state_dict(self, saved: Dict[str, List[Tensor]]) -> None:
        own = self.state()
        if set(saved) != set(own):
            raise ValueError(
                f"the checkpoint's optimizer state ({', '.join(sorted(saved))}) is not train.optimizer.name={self.name}'s"
            )
        for name, tensors in own.items():
            if len(saved[name]) != len(tensors):
                raise ValueError(f"optimizer state has {len(saved[name])} {name}, the model needs {len(tensors)}")
            for tensor, value in zip(tensors, saved[name]):
                tensor.copy_(value)

    def _with_gradients(self, gradients: Sequence[Optional[Tensor]]) -> List[int]:
        """Indices of the parameters that got a gradient this step (the others are left as
        they are, state included, as ``torch.optim`` does)."""
        return [k for k, gradient in enumerate(gradients) if gradient is not None]


class SGD(Optimizer):
    """``p -= lr * (g + wd * p  [+ Nesterov momentum])``, as ``torch.optim.SGD``.

    Our own, not ``torch.optim.sgd``'s functional form: outside ``torch.compile`` that form
    takes a tensor learning rate as ``alpha=-lr``, a Python number, so on torch-xla it reads
    the rate back to the host in every step, which runs the step's graph up to there and
    splits it in two (docs/performance.md, "Optimizers")."""

    name = "sgd"

    def __init__(self, groups: Dict[str, Sequence[nn.Parameter]], config: OptimizerConfig, style: UpdateStyle = UpdateStyle()):
        super().__init__(groups, config, style)
        self.momentum_buffers = [torch.zeros_like(p) for p in self.params]

    def state(self) -> Dict[str, List[Tensor]]:
        return {"momentum_buffers": self.momentum_buffers}

    @torch.no_grad()
    def step(self, lr: Tensor, gradients: Sequence[Optional[Tensor]]) -> None:
        """One update of every parameter that has a gradient (``gradients``, in the order of
        ``params``; None where a parameter got none), in ``_foreach`` ops that trace each
        operation once for all parameters. Where the step is traced (XLA) out of place, then
        copied: there an in-place binary op checks its broadcast in Python, per tensor, and
        per-parameter in-place ops were half of all tracing time (docs/performance.md,
        "Optimizers"). Elsewhere (``in_place``) in place: eager on the CPU each
        out-of-place result is a fresh allocation whose pages the kernel faults in anew
        (docs/performance.md, "Native eager: the update in place")."""
        momentum, nesterov, weight_decay = self.config.momentum, self.config.nesterov, self.config.weight_decay
        active = self._with_gradients(gradients)
        if not active:
            return
        params = [self.params[k] for k in active]
        gradients = [gradients[k] for k in active]
        if weight_decay:
            decayed = [i for i, k in enumerate(active) if self.decay_flags[k]]
            if decayed and self.in_place:  # the step's own gradients: nothing else reads them after
                torch._foreach_add_([gradients[i] for i in decayed], [params[i] for i in decayed], alpha=weight_decay)
            elif decayed:
                with_decay = torch._foreach_add([gradients[i] for i in decayed], [params[i] for i in decayed], alpha=weight_decay)
                for i, gradient in zip(decayed, with_decay):
                    gradients[i] = gradient
        if momentum:
            buffers = [self.momentum_buffers[k] for k in active]
            if self.in_place:
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, gradients)
            else:
                torch._foreach_copy_(buffers, torch._foreach_add(torch._foreach_mul(buffers, momentum), gradients))
            gradients = torch._foreach_add(gradients, buffers, alpha=momentum) if nesterov else buffers
        if self.in_place:
            torch._foreach_sub_(params, torch._foreach_mul(gradients, lr))
        else:
            torch._foreach_copy_(params, torch._foreach_sub(params, torch._foreach_mul(gradients, lr)))


class AdamW(Optimizer):
    """Adam with decoupled weight decay (``p *= 1 - lr * wd``, none on norms and biases when
    ``weight_decay_norm_and_bias`` is false): ``torch.optim.adamw``'s functional form over
    state created here, in its ``capturable`` variant, which takes the rate as a device
    tensor and keeps the step counts on the device (one graph for every step). Its
    ``foreach`` form refuses XLA tensors as capturable, so on XLA the per-parameter form
    runs (traced once: the step's graph is replayed). Eager on the CPU, where no capturable
    form is offered, the ``foreach`` form runs with the rate as a number: nothing is
    compiled there."""

    name = "adamw"

    def __init__(self, groups: Dict[str, Sequence[nn.Parameter]], config: OptimizerConfig, style: UpdateStyle = UpdateStyle()):
        super().__init__(groups, config, style)  # torch.optim's functional form is in place already
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        # One count per parameter, as torch.optim keeps it (a parameter without a gradient
        # in a step is not counted), float32 as its capturable variant needs.
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]

    def state(self) -> Dict[str, List[Tensor]]:
        return {"exp_avgs": self.exp_avgs, "exp_avg_sqs": self.exp_avg_sqs, "steps": self.steps}

    @torch.no_grad()
    def step(self, lr: Tensor, gradients: Sequence[Optional[Tensor]]) -> None:
        active = self._with_gradients(gradients)
        if not active:
            return
        # While torch.compile traces the step, its kernels take a device rate on any device.
        foreach_capturable = torch.compiler.is_compiling() or self.style.foreach_device_rate
        capturable = foreach_capturable or self.style.device_rate
        foreach = foreach_capturable or not capturable
        rate = lr if capturable else lr.item()
        beta1, beta2 = self.config.betas
        for decays in (True, False):
            chosen = [k for k in active if self.decay_flags[k] == decays]
            if not chosen:
                continue
            adamw(
                [self.params[k] for k in chosen],
                [gradients[k] for k in chosen],
                [self.exp_avgs[k] for k in chosen],
                [self.exp_avg_sqs[k] for k in chosen],
                [],
                [self.steps[k] for k in chosen],
                foreach=foreach,
                capturable=capturable,
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=rate,
                weight_decay=self.config.weight_decay if decays else 0.0,
                eps=self.config.eps,
                maximize=False,
            )


OPTIMIZERS = {optimizer.name: optimizer for optimizer in (SGD, AdamW)}


def build_optimizer(model: nn.Module, config: OptimizerConfig, style: UpdateStyle = UpdateStyle()) -> Optimizer:
    """``train.optimizer.name``'s optimizer over the model's trainable parameters, updating
    them as the backend says (``Runtime.update_style``; SGD.step says why it matters)."""
    return OPTIMIZERS[config.name](parameter_groups(model, config.weight_decay_norm_and_bias), config, style)
