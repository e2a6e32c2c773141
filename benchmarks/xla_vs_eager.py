"""Every backbone's training step on XLA:CPU against its eager CPU step, in alternating pairs
(`make bench-ratios`; docs/models.md, "Every backbone in alternating pairs").

The step is `retinanet-xla bench configs/smoke.yaml` with only the body swapped, at the size
the XLA:CPU kernel adapter was tuned at (256x256, batch 4, no ImageNet weights). Every run is a
process of its own, so one network's compilations and memory do not count towards the next.
This VM's speed drifts by 10-30% within an hour, so each pair is run back to back and the
order flips from one pair to the next (XLA then eager, then eager then XLA): a ratio is only
read within its pair.

    PJRT_DEVICE=CPU python benchmarks/xla_vs_eager.py --pairs 2 --json runs/bench/xla-vs-eager.json
"""

import argparse
import json
import sys
from pathlib import Path

from bench_runs import bench_in_own_process

from retinanet_xla.models import BACKBONES

LINE = 1.5  # issue 23: an XLA:CPU step may take at most 1.5x its eager step
FAMILIES = {
    "resnext": "ResNeXt",
    "wide_resnet": "Wide ResNet",
    "resnet": "ResNet",
    "mobilenet": "MobileNet",
    "efficientnet": "EfficientNet",
    "regnet": "RegNet",
    "convnext": "ConvNeXt",
}


def family(name: str) -> str:
    return next(label for prefix, label in FAMILIES.items() if name.startswith(prefix))


def bench(name: str, device: str, args: argparse.Namespace) -> dict:
    """One run; `device` is "xla" or "cpu"."""
    settings = [
        f"model.backbone.name={name}",
        f"data.image_size=[{args.image_size},{args.image_size}]",
        f"train.batch_size={args.batch_size}",
        "model.backbone.weights=null",
        f"runtime.device={device}",
    ]
    return bench_in_own_process(settings, args.steps, on_xla=device == "xla")


def measure(name: str, args: argparse.Namespace) -> dict:
    pairs = []
    for index in range(args.pairs):
        order = ("xla", "cpu") if index % 2 == 0 else ("cpu", "xla")
        runs = {device: bench(name, device, args) for device in order}
        xla, eager = runs["xla"], runs["cpu"]
        if xla["compilations_after_warmup"]:
            sys.exit(f"{name}: {xla['compilations_after_warmup']} compilation(s) after warm-up on XLA:CPU")
        pairs.append(
            {
                "order": list(order),
                "xla_step_seconds": xla["step_seconds"],
                "eager_step_seconds": eager["step_seconds"],
                "ratio": round(xla["step_seconds"] / eager["step_seconds"], 3),
                "xla_first_step_seconds": xla["first_step_seconds"],
                "xla_compile_seconds": xla["compile_seconds"],
                "xla_compilations": xla["compilations_total"],
                "xla_page_faults_per_step": xla["page_faults_per_step"],
                "eager_page_faults_per_step": eager["page_faults_per_step"],
            }
        )
    ratios = [p["ratio"] for p in pairs]
    return {"backbone": name, "family": family(name), "pairs": pairs, "ratio_min": min(ratios), "ratio_max": max(ratios)}


def span(values, scale: float = 1.0, digits: int = 0) -> str:
    low, high = min(values) * scale, max(values) * scale
    if round(low, digits) == round(high, digits):
        return f"{low:,.{digits}f}"
    return f"{low:,.{digits}f}-{high:,.{digits}f}"


def table(rows: list) -> str:
    lines = [
        "| Family | Network | XLA:CPU step | Eager CPU step | XLA / eager, per pair | XLA first step |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        pairs = row["pairs"]
        ratios = ", ".join(f"{p['ratio']:.2f}x" for p in pairs)
        if row["ratio_max"] > LINE:
            ratios = f"**{ratios}**"
        lines.append(
            f"| {row['family']} | `{row['backbone']}` | {span([p['xla_step_seconds'] for p in pairs], 1000)} ms "
            f"| {span([p['eager_step_seconds'] for p in pairs], 1000)} ms | {ratios} "
            f"| {span([p['xla_first_step_seconds'] for p in pairs], digits=0)} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="*", default=list(BACKBONES))
    args = parser.parse_args()
    unknown = sorted(set(args.only) - set(BACKBONES))
    if unknown:
        sys.exit(f"--only: unknown backbone(s) {', '.join(unknown)}; expected any of {', '.join(BACKBONES)}")
    rows = []
    for name in args.only:
        rows.append(measure(name, args))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:  # written after every network: a sweep takes half an hour or more, and may be cut short
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    over = [row["backbone"] for row in rows if row["ratio_max"] > LINE]
    print(f"over {LINE}x in some pair: {', '.join(over) if over else 'none'}")


if __name__ == "__main__":
    main()
