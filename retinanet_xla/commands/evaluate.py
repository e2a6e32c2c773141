"""``retinanet-xla eval``: a checkpoint, its config, a split -> COCO metrics on disk, with one
replica per local device (``runtime.num_devices``), like ``train``."""

import json
from typing import Dict, Optional, Sequence, Tuple

from retinanet_xla import storage
from retinanet_xla.data.coco import CategoryMapping
from retinanet_xla.data.splits import dataset_split
from retinanet_xla.device.choice import plan_launch
from retinanet_xla.device.runtime import Runtime
from retinanet_xla.distributed.launch import run_on_local_replicas
from retinanet_xla.errors import ConfigError
from retinanet_xla.inference.evaluator import Evaluator, default_eval_dir
from retinanet_xla.inference.loading import inference_config, load_for_inference
from retinanet_xla.inference.report import write_report_or_warn
from retinanet_xla.rundir.directory import local_run_files, open_checkpoint, run_of
from retinanet_xla.storage import Location


def evaluate_checkpoint(
    checkpoint: Location,
    overrides: Sequence[str] = (),
    annotations: Optional[str] = None,
    images: Optional[str] = None,
    output: Optional[str] = None,
) -> Tuple[Dict, Location]:
    """Writes ``detections.json`` and ``metrics.json`` (the 12 COCO numbers, AP per category and
    pycocotools' printed summary) and returns the metrics and the directory."""
    checkpoint, payload = open_checkpoint(checkpoint)
    overrides = [*overrides, *([f"data.val.annotations={annotations}", f"data.val.images={images}"] if annotations else [])]
    config = inference_config(checkpoint, payload, overrides)
    output_dir = storage.location(output) if output else default_eval_dir(checkpoint)
    plan = plan_launch(config.runtime)
    plan.check_batch(config.eval.batch_size, "eval.batch_size")  # fail before starting anything
    coco = dataset_split(config, "val", local_run_files(checkpoint))  # checked, and written once if synthetic
    trained = CategoryMapping.from_dict(payload["category_mapping"])
    unknown = sorted(set(coco.mapping.category_ids) - set(trained.category_ids))
    if unknown:
        raise ConfigError(f"{coco.annotations_file}: categories {unknown[:5]} were not in the training set of {checkpoint}")
    # The same id under another name is another class: the model would be scored on the wrong one.
    renamed = [i for i in coco.mapping.category_ids if coco.mapping.names[i] != trained.names.get(i, coco.mapping.names[i])]
    if renamed:
        first = renamed[0]
        raise ConfigError(
            f"{coco.annotations_file}: category {first} is {coco.mapping.names[first]!r} here but "
            f"{trained.names[first]!r} in the training set of {checkpoint} ({len(renamed)} categories differ)"
        )
    storage.require_writable(output_dir)  # before the evaluation, not after it
    del payload  # each replica loads its own copy
    metrics = run_on_local_replicas(_evaluate_replica, (checkpoint, overrides, output_dir), plan)
    run = run_of(checkpoint)
    # The run's own split, written in the run: the report train drew shows this evaluation too.
    if (
        metrics is not None
        and output is None
        and annotations is None
        and storage.is_file(storage.join(run, "report", "index.html"))
    ):
        write_report_or_warn(run)
    return metrics, output_dir


def _evaluate_replica(runtime: Runtime, checkpoint: Location, overrides: Sequence[str], output_dir: Location) -> Optional[Dict]:
    loaded = load_for_inference(checkpoint, overrides, runtime)
    coco = dataset_split(loaded.config, "val", local_run_files(loaded.checkpoint))
    coco.mapping = loaded.mapping  # detections carry the ids the model was trained with
    result = Evaluator(loaded.config, coco, runtime).evaluate(loaded.model)
    if result is None:  # not the master
        return None
    storage.write_text(storage.join(output_dir, "detections.json"), json.dumps(result["detections"]))
    metrics = {
        **result["metrics"],
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "weights": "ema" if loaded.uses_weight_average else "model",
        "images": len(coco.records),
        "replicas": runtime.replicas.world,
        "compilations": runtime.compilations(),  # graphs compiled by this evaluation's process
        "summary": result["summary"],
    }
    storage.write_text(storage.join(output_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    return metrics
