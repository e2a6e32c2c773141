"""Fine-tuning from a detector trained on other classes, against starting from its backbone
alone (docs/models.md, "Fine-tuning"), on the synthetic shapes through the real CLI on CPU XLA.

1. Pre-train the smoke model on two of the four shapes (rectangle, ellipse).
2. Fine-tune on the other two (triangle, cross) for the same steps, twice: from the whole
   pre-trained detector (``model.init_from``; the class output layer starts at the prior), and
   from its backbone alone (``model.backbone.weights``: FPN and head start random).
3. Report both runs' COCO AP on the validation images of the new classes.

    PJRT_DEVICE=CPU python benchmarks/finetune.py --output runs/bench/finetune --json runs/bench/finetune.json
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "retinanet-xla"
OLD, NEW = {1: "rectangle", 2: "ellipse"}, {3: "triangle", 4: "cross"}


def subset(source: Path, target: Path, categories: dict) -> Path:
    data = json.loads(source.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in categories]
    data["categories"] = [c for c in data["categories"] if c["id"] in categories]
    target.write_text(json.dumps(data))
    return target


def train(output: Path, data: Path, split_files: dict, steps: int, *extra: str) -> dict:
    args = [str(SCRIPT), "train", str(ROOT / "configs" / "smoke.yaml"), "--output", str(output)]
    settings = [
        f"data.train.annotations={split_files['train']}",
        f"data.train.images={data / 'train'}",
        f"data.val.annotations={split_files['val']}",
        f"data.val.images={data / 'val'}",
        "model.num_classes=2",
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        f"train.log_every={max(steps // 4, 1)}",
        *extra,
    ]
    for setting in settings:
        args += ["--set", setting]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return json.loads((output / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench" / "finetune")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    output = args.output
    data = output / "shapes"
    subprocess.run([str(SCRIPT), "data", "synth", str(data), "--seed", "0"], check=True, stdout=subprocess.DEVNULL)
    old = {
        split: subset(data / "annotations" / f"instances_{split}.json", output / f"old_{split}.json", OLD)
        for split in ("train", "val")
    }
    new = {
        split: subset(data / "annotations" / f"instances_{split}.json", output / f"new_{split}.json", NEW)
        for split in ("train", "val")
    }

    pretrained = train(output / "pretrain", data, old, args.pretrain_steps)
    checkpoint = output / "pretrain" / "checkpoints" / f"step_{args.pretrain_steps:08d}.pt"
    body = {
        key.removeprefix("backbone.body."): value
        for key, value in torch.load(checkpoint, weights_only=True)["model"].items()
        if key.startswith("backbone.body.")
    }
    torch.save(body, output / "pretrained_backbone.pth")  # as torchvision publishes a classifier

    from_detector = train(output / "from_detector", data, new, args.steps, f"model.init_from={output / 'pretrain'}")
    from_backbone = train(
        output / "from_backbone", data, new, args.steps, f"model.backbone.weights={output / 'pretrained_backbone.pth'}"
    )
    result = {
        "pretrain": {"classes": list(OLD.values()), "steps": args.pretrain_steps, "eval": pretrained["eval"]},
        "finetune_steps": args.steps,
        "classes": list(NEW.values()),
        "from_detector": from_detector["eval"],
        "from_backbone": from_backbone["eval"],
    }
    print(json.dumps({k: result[k] for k in ("finetune_steps", "classes")}))
    for name in ("from_detector", "from_backbone"):
        print(f"{name}: AP {result[name]['AP']:.3f}  AP50 {result[name]['AP50']:.3f}  AP75 {result[name]['AP75']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
