"""Every backbone side by side: parameters, FLOPs at 640x640, and the smoke batch's training
step time, eager on the CPU and through CPU XLA (`make bench-backbones`; docs/models.md).

Parameters and FLOPs are for the 640 recipe's model (91 classes, FPN 256, 4-conv heads).
The step times use configs/smoke.yaml (batch 8, 128x128, FPN 64, 2-conv heads) with only
the body swapped. Each XLA measurement runs `retinanet-xla bench` in a process of its own, so
one network's compilations do not count towards the next.

    PJRT_DEVICE=CPU python benchmarks/backbones.py --steps 6 --json runs/bench/backbones.json
"""

import argparse
import json
from pathlib import Path

import torch
from bench_runs import SMOKE, bench_in_own_process
from torch.utils.flop_counter import FlopCounterMode

from retinanet_xla.commands.bench import benchmark
from retinanet_xla.config import load_config
from retinanet_xla.models import BACKBONES, RetinaNet


def size_and_flops(name: str) -> dict:
    model = RetinaNet(91, backbone=name).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 640, 640))
    return {
        "body_parameters_m": round(sum(p.numel() for p in model.backbone.body.parameters()) / 1e6, 2),
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "gflops_640": round(counter.get_total_flops() / 1e9, 1),  # a multiply-add counts as 2
    }


def eager_step(name: str, steps: int) -> float:
    config = load_config(SMOKE, [f"model.backbone.name={name}", "runtime.device=cpu"])
    return benchmark(config, steps)["step_seconds"]


def xla_step(name: str, steps: int) -> dict:
    result = bench_in_own_process([f"model.backbone.name={name}"], steps)
    return {k: result[k] for k in ("step_seconds", "first_step_seconds", "compilations_total", "compilations_after_warmup")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="*", default=list(BACKBONES))
    args = parser.parse_args()
    rows = []
    for name in args.only:
        row = {"backbone": name, **size_and_flops(name), "eager_cpu_step_seconds": eager_step(name, args.steps)}
        row.update({f"xla_{k}": v for k, v in xla_step(name, args.steps).items()})
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(
        "| Backbone | Body params (M) | RetinaNet params (M) | GFLOPs at 640 | Eager CPU step (ms) | CPU XLA step (ms) | XLA first step (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| `{r['backbone']}` | {r['body_parameters_m']} | {r['parameters_m']} | {r['gflops_640']} | "
            f"{r['eager_cpu_step_seconds'] * 1000:.0f} | {r['xla_step_seconds'] * 1000:.0f} | {r['xla_first_step_seconds']:.1f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
