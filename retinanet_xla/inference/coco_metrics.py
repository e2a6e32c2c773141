"""COCO metrics with pycocotools, computed exactly as its ``COCOeval`` does.

Ground truth is read by us (so custom datasets without ``area`` or ``iscrowd`` still evaluate),
and detections are indexed directly, so an empty result list is a valid input with AP 0.

``eval.backend: faster-coco-eval`` scores the same indexes with faster-coco-eval's C++
``COCOeval_faster``: the same 12 numbers (tested to 1e-6), several times faster
(docs/performance.md holds the figures), which on COCO val is minutes saved at every
evaluation.
"""

import contextlib
import copy
import io
import json
from typing import Dict, List, Optional, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinanet_xla import storage
from retinanet_xla.data.coco import annotation_problem
from retinanet_xla.errors import require_package

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def ground_truth(annotation_file: storage.Location) -> COCO:
    """The file's boxes as pycocotools indexes them, without the annotations the loader drops
    (``annotation_problem``) and numbered anew: pycocotools keys boxes by id, so a duplicate
    id would make one box stand for two (measured: perfect detections scored 0.768 AP)."""
    data = json.loads(storage.read_text(annotation_file))
    image_ids = {image["id"] for image in data["images"]}
    categories = {category["id"] for category in data["categories"]}
    data["annotations"] = [
        annotation
        for annotation in data["annotations"]
        if isinstance(annotation, dict) and annotation_problem(annotation, image_ids, categories) is None
    ]
    for number, annotation in enumerate(data["annotations"], start=1):
        annotation["id"] = number
        annotation.setdefault("iscrowd", 0)
        if "area" not in annotation and isinstance(annotation.get("bbox"), list) and len(annotation["bbox"]) == 4:
            annotation["area"] = float(annotation["bbox"][2] * annotation["bbox"][3])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def results_index(gt: COCO, detections: Sequence[Dict]) -> COCO:
    """What ``COCO.loadRes`` builds for bbox results, without its failure on an empty list."""
    results = COCO()
    annotations = []
    for index, detection in enumerate(detections, start=1):
        x, y, w, h = detection["bbox"]
        annotations.append({**detection, "area": w * h, "id": index, "iscrowd": 0})
    results.dataset = {
        "images": list(gt.dataset["images"]),
        "categories": copy.deepcopy(gt.dataset["categories"]),
        "annotations": annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        results.createIndex()
    return results


def evaluate_detections(
    gt: COCO, detections: Sequence[Dict], image_ids: Optional[Sequence[int]] = None, backend: str = "pycocotools"
) -> Dict:
    """``metrics`` (the 12 standard numbers and AP per category name) and ``summary`` (the 12
    lines pycocotools prints, verbatim). ``image_ids`` restricts the evaluation to the images
    that were actually run (skipped images are not counted as misses)."""
    results = results_index(gt, detections)
    printed = io.StringIO()
    if backend == "faster-coco-eval":
        evaluator = _faster_evaluator(gt, results, lambda line: printed.write(f"{line}\n"))
    else:
        evaluator = COCOeval(gt, results, "bbox")
    if image_ids is not None:
        evaluator.params.imgIds = sorted(image_ids)
    with contextlib.redirect_stdout(printed):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # The 12 standard lines (faster-coco-eval adds AR at IoU 0.50 and 0.75).
    summary = [
        line
        for line in printed.getvalue().splitlines()
        if line.startswith(" Average Precision") or line.startswith(" Average Recall") and "IoU=0.50:0.95" in line
    ]
    metrics = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
    per_category = {}
    precision = evaluator.eval["precision"]  # [IoU, recall, category, area, max dets]
    for index, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, index, 0, -1]
        values = values[values > -1]
        per_category[gt.cats[category_id]["name"]] = float(np.mean(values)) if values.size else -1.0
    metrics["per_category_AP"] = per_category
    return {"metrics": metrics, "summary": summary}


def _faster_evaluator(gt: COCO, results: COCO, print_line):
    """faster-coco-eval's evaluator over the same ground truth and results."""
    require_package("faster_coco_eval", "eval.backend faster-coco-eval", "eval")
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster

    indexes = []
    for source in (gt, results):
        index = FasterCOCO()
        index.dataset = source.dataset
        with contextlib.redirect_stdout(io.StringIO()):
            index.createIndex()
        indexes.append(index)
    return COCOeval_faster(*indexes, "bbox", print_function=print_line)


def ground_truth_as_detections(gt: COCO, image_ids: Optional[Sequence[int]] = None) -> List[Dict]:
    """Every non-crowd ground-truth box as a detection with score 1 (the evaluator's sanity check)."""
    wanted = set(image_ids) if image_ids is not None else None
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
        for a in gt.dataset["annotations"]
        if not a.get("iscrowd", 0) and (wanted is None or a["image_id"] in wanted)
    ]
