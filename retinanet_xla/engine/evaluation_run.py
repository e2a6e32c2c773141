"""``retinanet-xla eval``: a checkpoint, its config, a split -> COCO metrics on disk."""

import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from retinanet_xla.config import ConfigError
from retinanet_xla.engine.inference import load_for_inference
from retinanet_xla.engine.trainer import dataset_split
from retinanet_xla.evaluation.evaluator import Evaluator, default_eval_dir


def evaluate_checkpoint(
    checkpoint: Path, overrides: Sequence[str] = (), annotations: Optional[Path] = None, images: Optional[Path] = None, output: Optional[Path] = None
) -> Tuple[Dict, Path]:
    extra = [f"data.val.annotations={annotations}", f"data.val.images={images}"] if annotations else []
    loaded = load_for_inference(checkpoint, [*overrides, *extra])
    coco = dataset_split(loaded.config, "val", loaded.checkpoint.parent.parent)
    unknown = sorted(set(coco.mapping.category_ids) - set(loaded.mapping.category_ids))
    if unknown:
        raise ConfigError(f"{coco.annotations_file}: categories {unknown[:5]} were not in the training set of {loaded.checkpoint}")
    coco.mapping = loaded.mapping  # detections carry the ids the model was trained with
    result = Evaluator(loaded.config, coco, loaded.runtime).evaluate(loaded.model)

    output_dir = Path(output) if output else default_eval_dir(loaded.checkpoint)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "detections.json").write_text(json.dumps(result["detections"]))
    metrics = {
        **result["metrics"],
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "weights": "ema" if loaded.uses_weight_average else "model",
        "images": len(coco.records),
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return result, output_dir
