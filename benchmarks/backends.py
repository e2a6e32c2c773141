"""The same training step on every backend this machine has, in alternating pairs: XLA:CPU (the
torch-xla environment), the native backend eagerly and as one `torch.compile` graph (the native
environment, PyPI's current torch), and torchvision's own `RetinaNet`, eager, on the same CPU,
sizes and batch: the alternative a CPU user would pick. The 640-3x case runs in fp32 and in bf16
(torchvision's model under bf16 autocast, as its references' ``--amp``).

Each run is a process of its own; the order of the four flips from one pair to the next, since
this VM's speed drifts 5-10% within minutes. Usage (`make bench-backends`):

    .venv/bin/python benchmarks/backends.py --pairs 2 --json runs/bench/backends.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
XLA_PYTHON = ROOT / ".venv" / "bin" / "python"
NATIVE_PYTHON = ROOT / ".venv-native" / "bin" / "python"
AT_256 = ["data.image_size=[256,256]", "train.batch_size=8", "model.backbone.weights=null", "runtime.num_devices=1"]
CASES = {
    # torchvision's head has 4 convolutions per branch, fixed: ours gets the same.
    "smoke": ("configs/smoke.yaml", ["model.head.convs=4"]),
    "640-3x at 256": ("configs/640-3x.yaml", [*AT_256, "train.precision=fp32"]),
    # bf16: ours by train.precision, torchvision's under autocast as its references' --amp does.
    "640-3x at 256, bf16": ("configs/640-3x.yaml", [*AT_256, "train.precision=bf16"]),
}
BACKENDS = ("xla", "native eager", "native compiled", "torchvision eager")


def run(backend: str, config: str, settings: List[str], steps: int) -> Dict:
    """One run's step time (median after the first step), first step and images/s."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        env = {key: value for key, value in os.environ.items() if key != "PJRT_DEVICE"}
        env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
        if backend == "torchvision eager":
            command = [str(NATIVE_PYTHON), "benchmarks/torchvision_retinanet.py", "--device", "cpu", "--torchvision-only"]
            command += ["--amp"] if "train.precision=bf16" in settings else []
            command += ["--config", config, "--steps", str(steps), "--json", str(out)]
            command += [item for setting in settings for item in ("--set", setting)]
        else:
            python = XLA_PYTHON if backend == "xla" else NATIVE_PYTHON
            command = [str(python), "-m", "retinanet_xla", "bench", config, "--steps", str(steps), "--json", str(out)]
            extra = {
                "xla": ["runtime.device=xla"],
                "native eager": ["runtime.device=cpu", "runtime.compile=false"],
                "native compiled": ["runtime.device=cpu", "runtime.compile=true"],
            }[backend]
            command += [item for setting in (*settings, *extra) for item in ("--set", setting)]
            if backend == "xla":
                env["PJRT_DEVICE"] = "CPU"
        finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        if finished.returncode != 0:
            sys.exit(f"{backend} {config}: failed ({finished.returncode}):\n{finished.stderr[-2000:]}")
        result = json.loads(out.read_text())
    if backend == "torchvision eager":
        tv = result["torchvision"]
        return {
            "step_seconds": tv["median_step_seconds_after_first"],
            "first_step_seconds": tv["step_seconds"][0],
            "images_per_second": tv["images_per_second"],
        }
    return {key: result[key] for key in ("step_seconds", "first_step_seconds", "images_per_second", "compilations_after_warmup")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--only", choices=sorted(CASES), action="append", help="cases to run (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: Dict[str, Dict[str, List[Dict]]] = {}
    for case in args.only or list(CASES):
        config, settings = CASES[case]
        results[case] = {backend: [] for backend in BACKENDS}
        for pair in range(args.pairs):
            for backend in BACKENDS if pair % 2 == 0 else reversed(BACKENDS):
                measured = run(backend, config, settings, args.steps)
                results[case][backend].append(measured)
                print(
                    f"{case}, pair {pair + 1}, {backend}: step {measured['step_seconds'] * 1000:.0f} ms, "
                    f"first {measured['first_step_seconds']:.1f} s, {measured['images_per_second']:.1f} images/s",
                    flush=True,
                )
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| Case | " + " | ".join(BACKENDS) + " |\n|---|" + "---|" * len(BACKENDS))
    for case, by_backend in results.items():
        cells = [", ".join(f"{run['step_seconds'] * 1000:.0f}" for run in runs) + " ms" for runs in by_backend.values()]
        print(f"| {case} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
