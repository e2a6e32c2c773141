"""What each optimizer update costs the one-graph step on XLA:CPU: compilations and reads of
device values back to the host, in steps whose learning rate is computed on the device from
a step counter, as the training step computes it (docs/performance.md, "Optimizers").

An update that reads the rate back (``.item()``, or a tensor passed where torch wants a
Python number) runs the step's graph up to that point and splits it in two.

    PJRT_DEVICE=CPU python benchmarks/optimizers_xla.py --json runs/bench/optimizers-xla.json
"""

import argparse
import json
from pathlib import Path

import torch
import torch_xla
import torch_xla.debug.metrics as metrics
from torch import nn
from torch.optim.adamw import adamw as torch_adamw
from torch.optim.sgd import sgd as torch_sgd

from retinanet_xla.config import OptimizerConfig
from retinanet_xla.device.runtime import UpdateStyle
from retinanet_xla.training.optimizer import build_optimizer


def count(name: str) -> int:
    data = metrics.metric_data(name)
    return data[0] if data else 0


def updates(model: nn.Module):
    """name -> a function (lr tensor, gradients) doing one update of the model's parameters."""
    params = [p for p in model.parameters()]
    traced = UpdateStyle(in_place=False, device_rate=True)  # XlaRuntime.update_style's
    ours_sgd = build_optimizer(model, OptimizerConfig(name="sgd"), traced)
    ours_adamw = build_optimizer(model, OptimizerConfig(name="adamw"), traced)
    buffers = [torch.zeros_like(p) for p in params]
    moments = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=p.device) for p in params]
    sgd_args = dict(weight_decay=1e-4, momentum=0.9, dampening=0.0, nesterov=True, maximize=False)
    adamw_args = dict(amsgrad=False, beta1=0.9, beta2=0.999, weight_decay=1e-4, eps=1e-8, maximize=False)
    return {
        "ours: sgd": ours_sgd.step,
        "ours: adamw (torch.optim.adamw, capturable)": ours_adamw.step,
        "torch.optim.sgd, foreach": lambda lr, g: torch_sgd(params, g, buffers, foreach=True, lr=lr, **sgd_args),
        "torch.optim.sgd, per parameter": lambda lr, g: torch_sgd(params, g, buffers, foreach=False, lr=lr, **sgd_args),
        "torch.optim.adamw, per parameter, not capturable": lambda lr, g: torch_adamw(
            params, g, *moments, [], steps, foreach=False, capturable=False, lr=lr, **adamw_args
        ),
    }


def measure(name: str, update, model: nn.Module, step_counter: torch.Tensor, steps: int, device) -> dict:
    x = torch.randn(8, 3, 32, 32, device=device)
    compiles = reads = 0
    for step in range(2 + steps):  # two steps of warm-up: the first graphs
        if step == 2:
            compiles, reads = count("CompileTime"), count("TransferFromDeviceTime")
        lr, gradients = forward_backward(model, x, step_counter)
        with torch.no_grad():
            update(lr, gradients)
        torch_xla.sync()
    return {
        "update": name,
        "steps": steps,
        "compilations": count("CompileTime") - compiles,
        "host_reads": count("TransferFromDeviceTime") - reads,
    }


def forward_backward(model: nn.Module, x: torch.Tensor, step_counter: torch.Tensor):
    step_counter.add_(1)
    lr = 0.01 * (step_counter.float() + 1).clamp(max=10)  # warm-up: a new rate every step
    loss = model(x).square().mean()
    return lr, list(torch.autograd.grad(loss, list(model.parameters())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch_xla.device()
    rows = []
    for name in updates(nn.Linear(1, 1)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.LazyLinear(10))
        model(torch.randn(1, 3, 32, 32))
        model = model.to(device)
        step_counter = torch.zeros((), dtype=torch.int64, device=device)
        torch_xla.sync()
        rows.append(measure(name, updates(model)[name], model, step_counter, args.steps, device))
        print(json.dumps(rows[-1]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
