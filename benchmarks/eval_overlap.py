"""Wall time of a training run with evaluations, this checkout against another (a checkout of
an earlier commit, say the one before evaluation overlapped training), in alternating pairs:
the same command, config and machine; only the code differs.

    git worktree add /tmp/baseline COMMIT
    .venv/bin/python benchmarks/eval_overlap.py --baseline /tmp/baseline --pairs 2 --json runs/bench/eval-overlap-xla.json
    .venv/bin/python benchmarks/eval_overlap.py --baseline /tmp/baseline --device cpu --python .venv-native/bin/python ...

Each run trains ``configs/smoke.yaml`` for 60 steps and evaluates every 20 on a 500-image
synthetic validation split (a scoring of seconds, as a larger dataset's would be minutes).
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
SETTINGS = [
    "train.steps=60",
    "train.eval_every=20",
    "train.log_every=20",
    "data.synthetic.val_images=500",
]


def run(tree: Path, python: str, device: str) -> Dict:
    """One training run of the package in ``tree``; its summary's wall time and last AP."""
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "run"
        command = [python, "-m", "retinanet_xla", "train", "configs/smoke.yaml", "--output", str(output)]
        command += [item for setting in (*SETTINGS, f"runtime.device={device}") for item in ("--set", setting)]
        env = {**os.environ, "PYTHONPATH": str(tree), "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
        if device == "xla":
            env["PJRT_DEVICE"] = "CPU"
        finished = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
        if finished.returncode != 0:
            sys.exit(f"{tree}: train failed ({finished.returncode}):\n{finished.stderr[-2000:]}")
        summary = json.loads((output / "summary.json").read_text())
    return {"wall_seconds": summary["wall_seconds"], "AP": summary["eval"]["AP"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the code to compare with")
    parser.add_argument("--device", default="xla", help="runtime.device: xla (CPU XLA) or cpu (native)")
    parser.add_argument("--python", default=sys.executable, help="the environment's interpreter")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    trees = {"this checkout": ROOT, "baseline": args.baseline.resolve()}
    results: Dict[str, List[Dict]] = {name: [] for name in trees}
    for pair in range(args.pairs):
        for name in list(trees) if pair % 2 else reversed(list(trees)):
            measured = run(trees[name], args.python, args.device)
            results[name].append(measured)
            print(f"pair {pair + 1}, {name}: {measured['wall_seconds']:.1f} s, AP {measured['AP']:.4f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": args.device, "settings": SETTINGS, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
