"""A learnable COCO-format dataset of coloured shapes on textured backgrounds.

It is what the demo, the tests and a first run on a new machine train on: nothing to download,
written in seconds, and easy enough that a tiny model reaches a high AP on it in minutes on a
CPU. Each class is a shape with its own colour family, so both form and colour carry the label.
"""

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [
    {"id": 1, "name": "rectangle", "hue": 0.0},
    {"id": 2, "name": "ellipse", "hue": 0.33},
    {"id": 3, "name": "triangle", "hue": 0.6},
    {"id": 4, "name": "cross", "hue": 0.15},
]


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> Tuple[int, int, int]:
    image = Image.new("HSV", (1, 1), (int(hue * 255) % 256, int(saturation * 255), int(value * 255)))
    return image.convert("RGB").getpixel((0, 0))


def _background(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Low-frequency colour noise plus faint stripes: texture the model must learn to ignore."""
    grid = rng.uniform(60, 200, size=(4, 4, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC), dtype=np.float32)
    period = rng.uniform(6, 20)
    stripes = 12 * np.sin(np.arange(width)[None, :, None] * 2 * np.pi / period + rng.uniform(0, np.pi))
    noise = rng.normal(0, 8, size=(height, width, 3))
    return Image.fromarray(np.clip(base * 0.8 + stripes + noise, 0, 255).astype(np.uint8))


def _overlaps(box: List[float], boxes: List[List[float]], limit: float = 0.3) -> bool:
    for other in boxes:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw > 0 and ih > 0:
            inter = iw * ih
            union = (box[2] - box[0]) * (box[3] - box[1]) + (other[2] - other[0]) * (other[3] - other[1]) - inter
            if inter / union > limit:
                return True
    return False


def _draw(draw: ImageDraw.ImageDraw, name: str, box: List[float], colour: Tuple[int, int, int]) -> None:
    x1, y1, x2, y2 = box
    if name == "rectangle":
        draw.rectangle(box, fill=colour)
    elif name == "ellipse":
        draw.ellipse(box, fill=colour)
    elif name == "triangle":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=colour)
    else:  # cross
        tw, th = (x2 - x1) / 3, (y2 - y1) / 3
        draw.rectangle([x1 + tw, y1, x2 - tw, y2], fill=colour)
        draw.rectangle([x1, y1 + th, x2, y2 - th], fill=colour)


def _image(image_id: int, rng: np.random.Generator, min_size: int, max_size: int) -> Tuple[Image.Image, List[Dict]]:
    width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    image = _background(width, height, rng)
    draw = ImageDraw.Draw(image)
    count = 0 if rng.random() < 0.1 else int(rng.integers(1, 6))
    boxes, annotations = [], []
    for _ in range(count * 5):  # a few tries per object to avoid heavy overlaps
        if len(boxes) == count:
            break
        side = min(width, height)
        w = float(rng.uniform(0.15, 0.55) * side)
        h = float(np.clip(w * rng.uniform(0.6, 1.6), 0.12 * side, 0.7 * side))
        x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
        box = [round(x), round(y), round(x + w), round(y + h)]
        if _overlaps(box, boxes):
            continue
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        colour = _hsv_to_rgb(category["hue"] + rng.uniform(-0.04, 0.04), rng.uniform(0.7, 1.0), rng.uniform(0.55, 1.0))
        _draw(draw, category["name"], box, colour)
        boxes.append(box)
        annotations.append(
            {
                "image_id": image_id,
                "category_id": category["id"],
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                "area": float((box[2] - box[0]) * (box[3] - box[1])),
                "iscrowd": 0,
            }
        )
    return image, annotations


def write_synthetic_dataset(
    output_dir: Path, num_train: int = 256, num_val: int = 64, seed: int = 0, min_size: int = 96, max_size: int = 192
) -> Dict[str, Dict[str, Path]]:
    """Write ``train`` and ``val`` splits in the COCO 2017 layout under ``output_dir``:
    ``annotations/instances_{split}.json`` and ``{split}/*.jpg|png``. Returns the paths."""
    output_dir = Path(output_dir)
    (output_dir / "annotations").mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1_000_003)):
        rng = np.random.default_rng(split_seed)
        image_dir = output_dir / split
        image_dir.mkdir(exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            image_id = index + 1
            image, objects = _image(image_id, rng, min_size, max_size)
            # Mostly JPEG, some PNG: both decoders are exercised.
            file_name = f"{image_id:06d}.png" if index % 5 == 4 else f"{image_id:06d}.jpg"
            image.save(image_dir / file_name, quality=92)
            images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
            for annotation in objects:
                annotation["id"] = len(annotations) + 1
                annotations.append(annotation)
        categories = [{"id": c["id"], "name": c["name"], "supercategory": "shape"} for c in CATEGORIES]
        annotation_file = output_dir / "annotations" / f"instances_{split}.json"
        annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        paths[split] = {"annotations": annotation_file, "images": image_dir}
    return paths
