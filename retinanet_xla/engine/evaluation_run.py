"""``retinanet-xla eval``: a checkpoint, its config, a split -> COCO metrics on disk."""

import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from retinanet_xla.config import ConfigError, load_config
from retinanet_xla.data.coco import CategoryMapping
from retinanet_xla.engine.build import build_model
from retinanet_xla.engine.checkpoint import load_checkpoint, resolve_checkpoint
from retinanet_xla.engine.runtime import Runtime
from retinanet_xla.engine.trainer import dataset_split
from retinanet_xla.evaluation.evaluator import Evaluator, default_eval_dir


def evaluate_checkpoint(
    checkpoint: Path, overrides: Sequence[str] = (), annotations: Optional[Path] = None, images: Optional[Path] = None, output: Optional[Path] = None
) -> Tuple[Dict, Path]:
    checkpoint = resolve_checkpoint(checkpoint)
    payload = load_checkpoint(checkpoint)
    extra = [f"data.val.annotations={annotations}", f"data.val.images={images}"] if annotations else []
    config = load_config(base=payload["config"], overrides=[*overrides, *extra], where=str(checkpoint))
    # The weights come from the checkpoint; the ImageNet file need not exist on this machine.
    config.model.backbone.weights = None
    run_dir = checkpoint.parent.parent
    coco = dataset_split(config, "val", run_dir)
    trained_mapping = CategoryMapping.from_dict(payload["category_mapping"])
    unknown = sorted(set(coco.mapping.category_ids) - set(trained_mapping.category_ids))
    if unknown:
        raise ConfigError(f"{coco.annotations_file}: categories {unknown[:5]} were not in the training set of {checkpoint}")
    coco.mapping = trained_mapping

    runtime = Runtime(config.runtime.device)
    model = build_model(config)
    model.load_state_dict(payload["model"])
    model.to(runtime.device).eval()
    result = Evaluator(config, coco, runtime).evaluate(model)

    output_dir = Path(output) if output else default_eval_dir(Path(checkpoint))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "detections.json").write_text(json.dumps(result["detections"]))
    metrics = {**result["metrics"], "checkpoint": str(checkpoint), "step": payload["step"], "images": len(coco.records)}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return result, output_dir
