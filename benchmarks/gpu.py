"""One GPU, the training step four ways, against its physical limit: ours eager in bf16, ours as
one ``torch.compile`` graph, ours compiled with CUDA graphs (``runtime.compile_mode:
reduce-overhead``), and torchvision's ``RetinaNet`` with AMP as its references train it
(``torch.autocast`` in fp16 and a ``GradScaler``). For each batch size: images/s, TFLOP/s per
device and utilisation against the GPU's datasheet bf16 peak (``device/peaks.py``), peak
memory, and the first step's time (compilation). One JSON and one markdown table.

Every run is a process of its own (memory and compile caches start empty) under a time budget:
what would not fit is reported as skipped, never silently dropped. In the native environment
(PyPI's torch; no torch-xla on the GPU machine), from the repository's root:

    python benchmarks/gpu.py --json runs/bench/gpu.json --markdown runs/bench/gpu.md   # make bench-gpu

``--device cpu --config configs/smoke.yaml ...`` runs the same code on a CPU (the tests do).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
# Ours: what each variant sets on top of the config (bf16 for all: the chip's fast path).
OURS = {
    "ours eager bf16": ["runtime.compile=false", "train.precision=bf16"],
    "ours compiled bf16": ["runtime.compile=true", "runtime.compile_mode=default", "train.precision=bf16"],
    "ours compiled + CUDA graphs bf16": ["runtime.compile=true", "runtime.compile_mode=reduce-overhead", "train.precision=bf16"],
}
TORCHVISION = "torchvision AMP"
VARIANTS = (*OURS, TORCHVISION)


def run_ours(variant: str, config: str, settings: List[str], steps: int, timeout: float) -> Dict:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "bench.json"
        command = [sys.executable, "-m", "retinanet_xla", "bench", config, "--steps", str(steps), "--json", str(out)]
        command += [item for setting in (*settings, *OURS[variant]) for item in ("--set", setting)]
        finished = _run(command, timeout)
        if finished is not None:
            return finished
        result = json.loads(out.read_text())
    keep = ("images_per_second", "first_step_seconds", "step_seconds", "achieved_tflops_per_device", "utilisation")
    keep += ("peak_tflops_per_device", "peak_source", "train_flops_per_image", "peak_memory_bytes")
    return {key: result[key] for key in keep} | {"compilations_after_warmup": result["compilations_after_warmup"]}


def run_torchvision(config: str, device: str, settings: List[str], steps: int, timeout: float) -> Dict:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "tv.json"
        command = [sys.executable, "benchmarks/torchvision_retinanet.py", "--torchvision-only", "--amp"]
        command += ["--device", device, "--config", config, "--steps", str(steps), "--json", str(out)]
        command += [item for setting in settings for item in ("--set", setting)]
        finished = _run(command, timeout)
        if finished is not None:
            return finished
        tv = json.loads(out.read_text())["torchvision"]
    return {
        "images_per_second": tv["images_per_second"],
        "first_step_seconds": tv["step_seconds"][0],
        "step_seconds": tv["median_step_seconds_after_first"],
        "peak_memory_bytes": tv["peak_memory_bytes"],
    }


def _run(command: List[str], timeout: float) -> Optional[Dict]:
    """None when the run succeeded; else what went wrong, as the row's entry."""
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    try:
        finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"skipped": f"ran past its {timeout:.0f} s"}
    if finished.returncode != 0:
        return {"failed": (finished.stderr.strip().splitlines() or ["no output"])[-1][:500]}
    return None


def with_utilisation(row: Dict, reference: Dict) -> Dict:
    """torchvision's rate against our FLOP count of the same architecture (head depth 4, same
    input) and the same peak: one yardstick for every row."""
    if "images_per_second" not in row or "train_flops_per_image" not in reference:
        return row
    achieved = row["images_per_second"] * reference["train_flops_per_image"] / 1e12
    peak = reference["peak_tflops_per_device"]
    return row | {"achieved_tflops_per_device": round(achieved, 3), "utilisation": round(achieved / peak, 4) if peak else None}


def markdown(results: Dict) -> str:
    lines = [
        f"GPU benchmark: {results['config']} at {results['image_size']}, {results['device_name']}, "
        f"torch {results['torch']}, {results['date']}; peak {results['peak_source']}",
        "",
        "| Variant | Batch | images/s | TFLOP/s | Utilisation | Peak memory | First step |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        if "images_per_second" not in row:
            lines.append(f"| {row['variant']} | {row['batch_size']} | {row.get('skipped') or row.get('failed')} | | | | |")
            continue
        utilisation = "-" if row.get("utilisation") is None else f"{row['utilisation']:.1%}"
        tflops = "-" if row.get("achieved_tflops_per_device") is None else f"{row['achieved_tflops_per_device']:.3g}"
        memory = "-" if row.get("peak_memory_bytes") is None else f"{row['peak_memory_bytes'] / 2**30:.1f} GiB"
        lines.append(
            f"| {row['variant']} | {row['batch_size']} | {row['images_per_second']:.1f} | {tflops} | {utilisation} | "
            f"{memory} | {row['first_step_seconds']:.1f} s |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/640-3x.yaml")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to try the script on a CPU")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--steps", type=int, default=30, help="steps per run, the first one compiles")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all runs together")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a config override")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()

    import torch

    from retinanet_xla.config import load_config

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device here; --device cpu runs it on the CPU")
    base = [*args.overrides, f"runtime.device={args.device}", "runtime.num_devices=1", "model.backbone.weights=null"]
    config = load_config(args.config, base)
    results = {
        "config": args.config,
        "image_size": list(config.data.image_size),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "steps": args.steps,
        "rows": [],
    }
    deadline = time.monotonic() + args.budget
    for batch in args.batch_sizes:
        settings = [*base, f"train.batch_size={batch}"]
        reference: Dict = {}
        for variant in args.variants:
            left = deadline - time.monotonic()
            if left < 10:
                row = {"skipped": "time budget spent"}
            elif variant == TORCHVISION:
                row = with_utilisation(run_torchvision(args.config, args.device, settings, args.steps, left), reference)
            else:
                row = run_ours(variant, args.config, settings, args.steps, left)
                if "train_flops_per_image" in row and not reference:
                    reference = row
                    results["peak_source"] = row["peak_source"]
            row = {"variant": variant, "batch_size": batch, **row}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=2) + "\n")
    results.setdefault("peak_source", "unknown (no run of ours finished)")
    table = markdown(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
