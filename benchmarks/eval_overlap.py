"""Time a training run loses to evaluation, this checkout against another (a checkout of
an earlier commit, say the one before evaluation overlapped training), in alternating pairs:
the same command, config and machine; only the code differs. Reported per run: the whole
run's wall time, and the seconds its loop spent in evaluation: predicting, scoring or waiting for
a background scoring (timers around those methods), which the machine's drift moves far less
than the whole run's time.

    git worktree add /tmp/baseline COMMIT
    .venv/bin/python benchmarks/eval_overlap.py --baseline /tmp/baseline --pairs 2 --json runs/bench/eval-overlap-xla.json
    .venv/bin/python benchmarks/eval_overlap.py --baseline /tmp/baseline --device cpu --python .venv-native/bin/python ...

Each run trains ``configs/smoke.yaml`` for 60 steps and evaluates every 20 on a 500-image
synthetic validation split, keeping detections down to score 0.001 (a scoring of seconds, as a
larger dataset's would be minutes).
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
    "eval.score_threshold=0.001",  # up to 100 detections an image: the scoring's share of a COCO-sized evaluation
]


# ``train`` with timers around the loop's evaluation (prediction, and in the baseline the
# scoring too) and, where it exists, the wait for background scorings, their total written to the
# file named last. The loop's evaluation is ``periodic.Evaluation`` since the loop was split into
# periodic work; a baseline tree from before has it as ``Trainer._evaluate``/``_take_scores``.
TIMED = """
import json, sys, time
from retinanet_xla.cli import main
sys.argv, out = ["retinanet-xla", *sys.argv[1:-1]], sys.argv[-1]
paused = [0.0]
def timer(method):
    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            paused[0] += time.perf_counter() - start
    return timed
try:
    from retinanet_xla.training.periodic import Evaluation
    Evaluation.evaluate, Evaluation.take = timer(Evaluation.evaluate), timer(Evaluation.take)
except ImportError:
    from retinanet_xla.training.trainer import Trainer
    Trainer._evaluate = timer(Trainer._evaluate)
    if hasattr(Trainer, "_take_scores"):  # waiting for background scorings is evaluation's time too
        Trainer._take_scores = timer(Trainer._take_scores)
try:
    main()
except SystemExit:
    pass
open(out, "w").write(json.dumps({"evaluation_pause_seconds": paused[0]}))
"""


def run(tree: Path, python: str, device: str) -> Dict:
    """One training run of the package in ``tree``: its summary's wall time and last AP, and
    the seconds its loop was paused for evaluation."""
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "run"
        command = [python, "-c", TIMED, "train", "configs/smoke.yaml", "--output", str(output)]
        command += [item for setting in (*SETTINGS, f"runtime.device={device}") for item in ("--set", setting)]
        command += [str(Path(scratch) / "pause.json")]
        env = {**os.environ, "PYTHONPATH": str(tree), "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
        if device == "xla":
            env["PJRT_DEVICE"] = "CPU"
        finished = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
        if finished.returncode != 0:
            sys.exit(f"{tree}: train failed ({finished.returncode}):\n{finished.stderr[-2000:]}")
        summary = json.loads((output / "summary.json").read_text())
        pause = json.loads((Path(scratch) / "pause.json").read_text())["evaluation_pause_seconds"]
    return {"wall_seconds": summary["wall_seconds"], "evaluation_pause_seconds": round(pause, 2), "AP": summary["eval"]["AP"]}


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
            measured = run(trees[name], os.path.abspath(args.python), args.device)  # runs in the tree's directory
            results[name].append(measured)
            print(
                f"pair {pair + 1}, {name}: {measured['wall_seconds']:.1f} s, paused for evaluation "
                f"{measured['evaluation_pause_seconds']:.1f} s, AP {measured['AP']:.4f}",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": args.device, "settings": SETTINGS, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
