"""``retinanet-xla predict``: detections drawn on images, and one JSON with all of them."""

import colorsys
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from retinanet_xla import storage
from retinanet_xla.data.coco import CategoryMapping, ImageRecord, load_coco
from retinanet_xla.data.image_io import IMAGE_SUFFIXES, UnreadableImage, read_rgb
from retinanet_xla.data.transforms import letterbox
from retinanet_xla.errors import ConfigError
from retinanet_xla.inference.detector import Detector
from retinanet_xla.inference.loading import LoadedModel
from retinanet_xla.ops.postprocess import to_original_pixels
from retinanet_xla.storage import Location


def collect_images(paths: Sequence[str]) -> List[Location]:
    """Files as given; directories contribute their JPEG/PNG files, sorted. Raises
    ``ConfigError`` for a missing path and when there is no image at all."""
    found = []
    for path in map(storage.location, paths):
        if storage.is_dir(path):
            found += [p for p in storage.glob(path, "*") if storage.name(p).lower().endswith(IMAGE_SUFFIXES)]
        elif storage.is_file(path):
            found.append(path)
        else:
            raise ConfigError(f"{path}: no such image or directory")
    if not found:
        raise ConfigError(f"{', '.join(map(str, paths))}: no {'/'.join(IMAGE_SUFFIXES)} images to predict on")
    return found


def picture_names(paths: Sequence[Location]) -> List[str]:
    """One PNG name per input, from its file name, never the same twice (``a/x.jpg`` and
    ``b/x.jpg`` give ``x.png`` and ``x-2.png``) and never a special name (``..jpg``)."""
    names, used = [], set()
    for path in paths:
        stem = storage.stem(path).strip(".") or "image"
        name, number = f"{stem}.png", 1
        while name in used:
            number += 1
            name = f"{stem}-{number}.png"
        used.add(name)
        names.append(name)
    return names


@dataclass
class PredictSummary:
    json_path: Location
    images: int
    detections: int
    unreadable: List[str]


def _colour(label: int):
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.9, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw(image: Image.Image, detections: List[Dict], scores: bool = True) -> Image.Image:
    """Boxes with a tag each (category, and the score unless ``scores`` is off: ground truth).
    A tag sits above its box, inside the picture; where it would cover an earlier tag it moves
    inside the box's top, then below its bottom, whichever is free first."""
    canvas = image.copy()
    pen = ImageDraw.Draw(canvas)
    placed: List[Tuple[float, float, float, float]] = []
    for detection in detections:
        x, y, w, h = detection["bbox"]
        colour = _colour(detection["label"])
        pen.rectangle([x, y, x + w, y + h], outline=colour, width=2)
        text = f"{detection['category_name']} {detection['score']:.2f}" if scores else str(detection["category_name"])
        left, top, right, bottom = pen.textbbox((0, 0), text)
        tag_w, tag_h = right - left + 3, bottom - top + 3
        tag = _place_tag((x, y, x + w, y + h), tag_w, tag_h, canvas.size, placed)
        placed.append(tag)
        pen.rectangle(tag, fill=colour)
        pen.text((tag[0] + 1 - left, tag[1] + 1 - top), text, fill=(0, 0, 0))
    return canvas


def _place_tag(box, tag_w: float, tag_h: float, size: Tuple[int, int], placed) -> Tuple[float, float, float, float]:
    x1, y1, _, y2 = box
    width, height = size
    left = min(max(x1, 0), max(width - tag_w, 0))  # inside the picture, horizontally

    def at(top: float) -> Tuple[float, float, float, float]:
        top = min(max(top, 0), max(height - tag_h, 0))
        return left, top, left + tag_w, top + tag_h

    candidates = [at(y1 - tag_h), at(y1), at(y2)]  # above, inside the top, below
    for tag in candidates:
        if not any(_overlap(tag, other) for other in placed):
            return tag
    return candidates[0]


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _letterboxed(chunk: Sequence[Image.Image], size, batch_size: int) -> Dict[str, torch.Tensor]:
    """A batch of ``chunk``'s images letterboxed to ``size``, padded to ``batch_size`` images."""
    pixels = np.zeros((batch_size, size[0], size[1], 3), np.uint8)
    content = torch.zeros(batch_size, 2)
    scales = torch.zeros(batch_size, dtype=torch.float64)
    for slot, image in enumerate(chunk):
        pixels[slot], _, scale = letterbox(image, np.zeros((0, 4), np.float32), size)
        content[slot] = torch.tensor([round(image.height * scale), round(image.width * scale)])
        scales[slot] = scale
    return {"images": torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), "content_sizes": content, "scales": scales}


@dataclass
class Found:
    """One image's detections in its own pixels: ``boxes`` [N, 4] (x1, y1, x2, y2), ``scores``
    [N], ``labels`` [N] (the model's), ``category_ids`` [N] (the dataset's), highest score first."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    category_ids: np.ndarray
    names: List[str]


@torch.no_grad()
def detect_arrays(loaded: LoadedModel, images: Sequence[Image.Image], score_threshold: float) -> List[Found]:
    """Every image's detections, in batches padded to ``eval.batch_size`` so that one graph
    serves them all: the inference path of predict, the report and ``Predictor``."""
    config, runtime = loaded.config, loaded.runtime
    postprocess = dataclasses.replace(config.eval, score_threshold=score_threshold)
    size, batch_size = tuple(config.data.image_size), config.eval.batch_size
    detector = Detector(loaded.model, config, runtime, batch_size)
    chunks = [images[start : start + batch_size] for start in range(0, len(images), batch_size)]
    batches = runtime.device_batches((_letterboxed(chunk, size, batch_size) for chunk in chunks), host_keys=("scales",))
    found_all: List[Found] = []
    try:
        for chunk, batch in zip(chunks, batches):
            detected = detector(batch["images"], batch["content_sizes"], postprocess)
            for image, scale, found in zip(chunk, batch["scales"].tolist(), detected):
                boxes = to_original_pixels(found.boxes, scale, image.height, image.width).numpy()
                ids = loaded.mapping.to_category_ids(found.labels.numpy())
                names = [loaded.mapping.names.get(int(i), str(int(i))) for i in ids]
                found_all.append(Found(boxes, found.scores.numpy(), found.labels.numpy(), ids, names))
    finally:
        batches.close()
    return found_all


def detect(loaded: LoadedModel, images: Sequence[Image.Image], score_threshold: float) -> List[List[Dict]]:
    """``detect_arrays`` as COCO-style entries (``bbox`` [x, y, w, h] in each image's pixels,
    score, label, category id and name), what predict's JSON and the report draw."""
    return [
        [
            {
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(float(score), 4),
                "label": int(label),
                "category_id": int(category_id),
                "category_name": name,
            }
            for (x1, y1, x2, y2), score, label, category_id, name in zip(
                found.boxes.tolist(), found.scores.tolist(), found.labels.tolist(), found.category_ids.tolist(), found.names
            )
        ]
        for found in detect_arrays(loaded, images, score_threshold)
    ]


@torch.no_grad()
def predict(
    loaded: LoadedModel, paths: Sequence[str], output: str, score_threshold: float, ground_truth: Optional[str] = None
) -> PredictSummary:
    """Run the model on every image (batches padded to ``eval.batch_size``, so one graph), write
    ``OUTPUT/<name>.png`` per image (``picture_names``) and ``OUTPUT/detections.json``."""
    output_dir, images = storage.location(output), collect_images(paths)  # nothing is written without images
    truth = ground_truth_by_name(loaded, ground_truth) if ground_truth else None
    with storage.written_through(output_dir) as local:
        done = _predict(loaded, images, local, score_threshold, truth)
    return dataclasses.replace(done, json_path=storage.join(output_dir, storage.name(done.json_path)))


def ground_truth_boxes(record: ImageRecord, model_mapping: CategoryMapping, names: Dict[int, str]) -> List[Dict]:
    """A record's boxes in ``draw``'s format, coloured by the model's labels (by category id
    where the model does not know a category) and named by ``names``."""
    known = set(record.category_ids.tolist()) <= set(model_mapping.category_ids)
    labels = model_mapping.to_labels(record.category_ids) if known else record.category_ids
    return [
        {"bbox": [x1, y1, x2 - x1, y2 - y1], "label": int(label), "category_name": names.get(int(c), str(c))}
        for (x1, y1, x2, y2), label, c in zip(record.boxes.tolist(), labels.tolist(), record.category_ids.tolist())
    ]


def ground_truth_by_name(loaded: LoadedModel, annotations: str) -> Dict[str, List[Dict]]:
    """The boxes of a COCO file by image file name (its last part), checked as training checks
    them, in the drawing format."""
    coco = load_coco(annotations, storage.parent(storage.location(annotations)), check_files=False)
    by_name: Dict[str, List[Dict]] = {}
    for record in coco.records:
        by_name.setdefault(storage.name(record.path), ground_truth_boxes(record, loaded.mapping, coco.mapping.names))
    return by_name


def beside(left: Image.Image, right: Image.Image, gap: int = 8) -> Image.Image:
    """Two pictures side by side on white."""
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas


def _predict(
    loaded: LoadedModel,
    images: List[Location],
    output_dir: Path,
    score_threshold: float,
    truth: Optional[Dict[str, List[Dict]]] = None,
) -> PredictSummary:
    pictures = picture_names(images)  # by position: the same file may be given twice
    results, unreadable = [], []
    batch_size = loaded.config.eval.batch_size
    for start in range(0, len(images), batch_size):
        decoded = []
        for index, path in enumerate(images[start : start + batch_size], start):
            try:
                decoded.append((index, path, read_rgb(path, max_pixels=loaded.config.data.max_pixels)))
            except UnreadableImage as error:
                results.append((index, {"file": str(path), "error": str(error), "detections": []}))
                unreadable.append(str(error))
        found = detect(loaded, [image for _, _, image in decoded], score_threshold) if decoded else []
        for (index, path, image), detections in zip(decoded, found):
            picture = draw(image, detections)
            entry = {"file": str(path), "picture": pictures[index], "width": image.width, "height": image.height}
            if truth is not None:  # ground truth on the left, detections on the right
                boxes = truth.get(storage.name(path))
                entry["ground_truth_boxes"] = None if boxes is None else len(boxes)
                picture = beside(draw(image, boxes or [], scores=False), picture)
            picture.save(output_dir / pictures[index])
            results.append((index, {**entry, "detections": detections}))
    results = [entry for _, entry in sorted(results, key=lambda item: item[0])]  # the order of the inputs
    json_path = output_dir / "detections.json"
    json_path.write_text(
        json.dumps({"checkpoint": str(loaded.checkpoint), "score_threshold": score_threshold, "images": results}, indent=1)
    )
    return PredictSummary(json_path, len(images), sum(len(entry["detections"]) for entry in results), unreadable)
