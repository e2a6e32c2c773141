"""Write the detector in each serving format, with a metadata JSON beside it, and run what was
written (``--check`` and the tests)."""

import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from retinanet_xla.config import ConfigError
from retinanet_xla.export.detector import ExportedDetector
from retinanet_xla.inference.detector import CandidateDetector, Detector
from retinanet_xla.inference.loading import LoadedModel
from retinanet_xla.ops import BoxCoder
from retinanet_xla.ops.postprocess import Candidates, Detections, filter_detections

FORMATS = ("onnx", "torchscript", "exported-program", "stablehlo")
ONNX_OPSET = 17  # NonMaxSuppression (11+) and every op the model uses; ONNX Runtime >= 1.12
OUTPUTS = ["boxes", "scores", "labels", "count"]


@dataclass
class Exported:
    format: str
    path: Path  # the file (or, for StableHLO, the directory) a server loads
    metadata: Path
    with_nms: bool


def example_inputs(batch_size: int, image_size: Sequence[int], uint8_input: bool) -> Tuple[Tensor, Tensor]:
    height, width = image_size
    images = torch.zeros(batch_size, 3, height, width, dtype=torch.uint8 if uint8_input else torch.float32)
    return images, torch.tensor([[height, width]] * batch_size, dtype=torch.int64)


def build_detectors(loaded: LoadedModel, uint8_input: bool) -> Tuple[CandidateDetector, ExportedDetector]:
    config = loaded.config
    if config.eval.max_detections > config.eval.pre_nms_top_k:
        raise ConfigError(
            f"eval.max_detections {config.eval.max_detections} exceeds eval.pre_nms_top_k {config.eval.pre_nms_top_k}"
        )
    model = loaded.model.cpu().float().eval()
    candidates = CandidateDetector(
        model, tuple(config.data.image_size), BoxCoder(config.model.box_coder_weights), config.eval.pre_nms_top_k, uint8_input
    ).eval()
    return candidates, ExportedDetector(candidates, config.eval, config.model.num_classes).eval()


def export(loaded: LoadedModel, fmt: str, output_dir: Path, batch_size: int = 1, uint8_input: bool = True) -> Exported:
    """Write ``fmt`` under ``output_dir`` (``model.onnx``, ``model.torchscript.pt``,
    ``model.pt2`` or ``stablehlo/``) and ``<same>.json`` with what a caller needs."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "stablehlo" and importlib.util.find_spec("torch_xla") is None:
        raise ConfigError("--format stablehlo needs torch-xla's StableHLO writer: pip install 'retinanet-xla[xla]'")
    output_dir.mkdir(parents=True, exist_ok=True)
    candidates, detector = build_detectors(loaded, uint8_input)
    inputs = example_inputs(batch_size, loaded.config.data.image_size, uint8_input)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter chatter; the outputs are checked instead
        if fmt == "onnx":
            path = output_dir / "model.onnx"
            torch.onnx.export(
                detector,
                inputs,
                str(path),
                input_names=["images", "content_sizes"],
                output_names=OUTPUTS,
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        elif fmt == "torchscript":
            path = output_dir / "model.torchscript.pt"
            torch.jit.trace(detector, inputs, check_trace=False).save(str(path))
        elif fmt == "exported-program":
            path = output_dir / "model.pt2"
            torch.export.save(torch.export.export(detector, inputs, strict=False), str(path))
        else:
            path = output_dir / "stablehlo"
            _export_stablehlo(candidates, inputs, path)
    with_nms = fmt != "stablehlo"
    metadata = _write_metadata(loaded, fmt, path, batch_size, uint8_input, with_nms)
    return Exported(fmt, path, metadata, with_nms)


def _export_stablehlo(candidates: CandidateDetector, inputs: Tuple[Tensor, Tensor], path: Path) -> None:
    """torch_xla's StableHLO exporter lowers static shapes only, so this stops at the candidates."""
    from torch_xla.stablehlo import exported_program_to_stablehlo

    program = torch.export.export(candidates, inputs, strict=False)
    exported_program_to_stablehlo(program).save(str(path))


def _write_metadata(loaded: LoadedModel, fmt: str, path: Path, batch_size: int, uint8_input: bool, with_nms: bool) -> Path:
    config, mapping = loaded.config, loaded.mapping
    height, width = config.data.image_size
    labels = range(mapping.num_labels)
    category_ids = [int(i) for i in mapping.to_category_ids(torch.tensor(list(labels)).numpy())]
    metadata = {
        "format": fmt,
        "file": path.name,
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "weights": "ema" if loaded.uses_weight_average else "model",
        "inputs": {
            "images": {
                "shape": [batch_size, 3, height, width],
                "dtype": "uint8" if uint8_input else "float32",
                "meaning": "RGB, letterboxed: resized keeping the aspect ratio (scale = min(H/h, W/w)) and padded with zeros at the bottom and right",
                "normalisation": "inside the graph"
                if uint8_input
                else {
                    "mean": loaded.model.image_mean.flatten().tolist(),
                    "std": loaded.model.image_std.flatten().tolist(),
                    "of": "pixels / 255",
                },
            },
            "content_sizes": {
                "shape": [batch_size, 2],
                "dtype": "int64",
                "meaning": "round(h * scale), round(w * scale) of each image inside the canvas",
            },
        },
        "outputs": (
            {
                "boxes": f"[{batch_size}, {config.eval.max_detections}, 4] x1, y1, x2, y2 in canvas pixels; divide by scale for original pixels",
                "scores": f"[{batch_size}, {config.eval.max_detections}] descending",
                "labels": f"[{batch_size}, {config.eval.max_detections}] int64 labels (see categories), -1 past count",
                "count": f"[{batch_size}] detections per image; rows past it are padding",
            }
            if with_nms
            else {
                "boxes": f"[{batch_size}, {config.eval.pre_nms_top_k}, 4] candidate boxes, canvas pixels",
                "scores": f"[{batch_size}, {config.eval.pre_nms_top_k}] descending",
                "labels": f"[{batch_size}, {config.eval.pre_nms_top_k}] int64 labels",
                "post_processing_left_to_the_caller": (
                    "StableHLO cannot express NMS's data-dependent output: per image, drop scores under score_threshold and boxes "
                    "without area, run per-class NMS at nms_iou, keep max_detections_per_class per class and max_detections in all"
                ),
            }
        ),
        "post_processing": {
            "score_threshold": config.eval.score_threshold,
            "nms_iou": config.eval.nms_iou,
            "max_detections_per_class": config.eval.max_detections_per_class,
            "max_detections": config.eval.max_detections,
            "pre_nms_top_k": config.eval.pre_nms_top_k,
            "in_graph": with_nms,
        },
        "categories": [
            {"label": label, "id": category_id, "name": mapping.names.get(category_id, str(category_id))}
            for label, category_id in zip(labels, category_ids)
        ],
    }
    if fmt == "onnx":
        metadata["onnx_opset"] = ONNX_OPSET
    target = path.parent / f"{path.name}.json"
    target.write_text(json.dumps(metadata, indent=2) + "\n")
    return target


def run_exported(exported: Exported, images: Tensor, content_sizes: Tensor) -> List[Tensor]:
    """The exported artefact's outputs for these inputs (for ``--check`` and the tests)."""
    if exported.format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
        feeds = {"images": images.numpy(), "content_sizes": content_sizes.numpy()}
        return [torch.from_numpy(array) for array in session.run(OUTPUTS, feeds)]
    if exported.format == "torchscript":
        return list(torch.jit.load(str(exported.path))(images, content_sizes))
    if exported.format == "exported-program":
        return list(torch.export.load(str(exported.path)).module()(images, content_sizes))
    from torch_xla.stablehlo import StableHLOGraphModule

    return [t.cpu() for t in StableHLOGraphModule.load(str(exported.path))(images, content_sizes)]


def compare_with_package(loaded: LoadedModel, exported: Exported, images: Tensor, content_sizes: Tensor) -> Dict[str, float]:
    """Run the exported artefact and the in-package model (the evaluation path: candidates on
    the device, NMS on the host) on the same images; the largest differences found."""
    # The artefact computes in float32 whatever the training precision was.
    package = Detector(
        loaded.model, loaded.config, loaded.runtime, images.shape[0], "fp32", uint8_input=images.dtype == torch.uint8
    )
    expected = package(images.to(loaded.runtime.device), content_sizes.to(loaded.runtime.device))
    with torch.no_grad():
        outputs = run_exported(exported, images, content_sizes)
    if exported.with_nms:
        boxes, scores, labels, count = outputs
        found = [Detections(b[:n], s[:n], k[:n]) for b, s, k, n in zip(boxes, scores, labels, count.tolist())]
    else:
        found = filter_detections(Candidates(*outputs), loaded.config.eval)
    report = {
        "images": len(expected),
        "count_mismatches": 0,
        "label_mismatches": 0,
        "max_box_relative_difference": 0.0,
        "max_score_difference": 0.0,
    }
    for want, got in zip(expected, found):
        if len(want.scores) != len(got.scores):
            report["count_mismatches"] += 1
            continue
        if not len(want.scores):
            continue
        report["label_mismatches"] += int((want.labels != got.labels).sum())
        relative = ((want.boxes - got.boxes).abs() / want.boxes.abs().clamp(min=1.0)).max()
        report["max_box_relative_difference"] = max(report["max_box_relative_difference"], float(relative))
        report["max_score_difference"] = max(report["max_score_difference"], float((want.scores - got.scores).abs().max()))
    return report


def check_passes(report: Dict[str, float]) -> bool:
    """The export issue's tolerances: same detections and labels, boxes within 1e-3 relative,
    scores within 1e-4."""
    return (
        report["count_mismatches"] == 0
        and report["label_mismatches"] == 0
        and report["max_box_relative_difference"] <= 1e-3
        and report["max_score_difference"] <= 1e-4
    )
