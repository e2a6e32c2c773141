"""Recipe ablation: train each variant (a set of ``--set`` overrides on one config) with 2+
seeds for the same budget, evaluate each run, and tabulate AP, AP50, AP75 and AP small with
their spread over seeds (docs/models.md, "Recipes").

Every run is ``retinanet-xla train`` then ``retinanet-xla eval`` in processes of their own,
under OUTPUT/VARIANT/seed-N; a run whose metrics exist is not run again, so an interrupted
ablation continues where it stopped and new variants can be added to an existing table.

On the built-in synthetic data (the default) or on COCO-format data of your own:

    PJRT_DEVICE=CPU python benchmarks/recipes.py --output runs/recipes --steps 200 \\
        --json runs/recipes/recipes.json --markdown runs/recipes/recipes.md
    python benchmarks/recipes.py --config configs/small-dataset.yaml --output runs/my-recipes \\
        --train-annotations data/train.json --train-images data/images \\
        --val-annotations data/val.json --val-images data/images --variants smoke gn-head giou
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

ROOT = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).parent / "retinanet-xla"

ADAMW = ["train.optimizer.name=adamw", "train.optimizer.weight_decay=0.05", "train.optimizer.weight_decay_norm_and_bias=false"]

# Each a change from configs/smoke.yaml (SGD, Huber box loss, BatchNorm, no head norm, P6 from
# P5, scale jitter 0.8-1.25, no weight average). Rates are for its batch of 8.
VARIANTS: Dict[str, List[str]] = {
    "smoke": [],
    "giou": ["loss.box_loss=giou", "loss.box_loss_weight=2.0"],
    "gn-head": ["model.head.norm=gn"],  # configs/small-dataset.yaml's choices on the smoke model
    "p6-from-c5": ["model.p6_from=c5"],
    "adamw": [*ADAMW, "train.schedule.base_lr=4.0e-4", "train.schedule.warmup_start_lr=4.0e-5"],
    "ema": ["train.ema_decay=0.99"],
    "jitter-0.5-2.0": ["data.augmentation.scale_min=0.5", "data.augmentation.scale_max=2.0"],
    "box-weight-25": ["loss.box_loss_weight=25.0"],
    "focal-gamma-2-alpha-0.25": ["loss.focal_gamma=2.0", "loss.focal_alpha=0.25"],
    "gn-head+adamw": ["model.head.norm=gn", *ADAMW, "train.schedule.base_lr=4.0e-4", "train.schedule.warmup_start_lr=4.0e-5"],
}
STATS = ("AP", "AP50", "AP75", "APs")


def overrides_and_config(variant: Sequence[str], default_config: Path):
    """A variant may name its own config (``--config PATH`` first), then overrides."""
    variant = list(variant)
    if variant[:1] == ["--config"]:
        return ROOT / variant[1], variant[2:]
    return default_config, variant


def run_one(name: str, variant: Sequence[str], seed: int, args: argparse.Namespace) -> Dict:
    output = args.output / name / f"seed-{seed}"
    metrics_file = output / "eval" / "metrics.json"
    if metrics_file.exists():
        return json.loads(metrics_file.read_text())
    config, overrides = overrides_and_config(variant, args.config)
    common = [*data_overrides(args), *args.set]
    train = [str(CLI), "train", str(config), "--output", str(output), "--no-resume", "--overwrite"]
    for override in [*common, *overrides, f"train.seed={seed}", f"train.steps={args.steps}", "train.eval_every=0"]:
        train += ["--set", override]
    started = time.monotonic()
    log = args.output / name / f"seed-{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as stream:
        subprocess.run(train, stdout=stream, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
        evaluate = [str(CLI), "eval", str(output), "--output", str(output / "eval")]
        for override in common:
            evaluate += ["--set", override]
        subprocess.run(evaluate, stdout=stream, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    metrics = json.loads(metrics_file.read_text())
    metrics["seconds"] = time.monotonic() - started
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def data_overrides(args: argparse.Namespace) -> List[str]:
    if not args.train_annotations:
        return []
    return [
        f"data.train.annotations={args.train_annotations}",
        f"data.train.images={args.train_images}",
        f"data.val.annotations={args.val_annotations}",
        f"data.val.images={args.val_images}",
    ]


def summarize(name: str, variant: Sequence[str], runs: List[Dict]) -> Dict:
    row = {"variant": name, "overrides": list(variant), "seeds": len(runs)}
    for stat in STATS:
        values = [run[stat] for run in runs]
        row[stat] = statistics.mean(values)
        row[f"{stat}_spread"] = max(values) - min(values)  # max - min over seeds
        row[f"{stat}_runs"] = values
    row["minutes_per_run"] = statistics.mean(run.get("seconds", 0.0) for run in runs) / 60
    return row


def markdown(rows: List[Dict], args: argparse.Namespace) -> str:
    lines = [
        f"{args.steps} steps, seeds {', '.join(map(str, args.seeds))}; mean over seeds (max - min in brackets)",
        "",
        "| variant | overrides | AP | AP50 | AP75 | APs |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [f"{row[s]:.3f} ({row[f'{s}_spread']:.3f})" for s in STATS]
        overrides = " ".join(f"`{o}`" for o in row["overrides"]) or "(the base config)"
        lines.append(f"| {row['variant']} | {overrides} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "smoke.yaml")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"of: {', '.join(VARIANTS)}")
    parser.add_argument("--variants-file", type=Path, help="JSON {name: [override, ...]} instead of the built-in list")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], help="an override for every run")
    parser.add_argument("--train-annotations")
    parser.add_argument("--train-images")
    parser.add_argument("--val-annotations")
    parser.add_argument("--val-images")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("--seeds: at least 2, for the spread")
    if args.train_annotations and not (args.train_images and args.val_annotations and args.val_images):
        parser.error("--train-annotations needs --train-images, --val-annotations and --val-images")
    variants = json.loads(args.variants_file.read_text()) if args.variants_file else {n: VARIANTS[n] for n in args.variants}
    rows = []
    for name, variant in variants.items():
        runs = [run_one(name, variant, seed, args) for seed in args.seeds]
        rows.append(summarize(name, variant, runs))
        print(json.dumps({k: rows[-1][k] for k in ("variant", *STATS)}), flush=True)
        table = markdown(rows, args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "rows": rows}, indent=2) + "\n")
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
