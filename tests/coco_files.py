"""Small COCO annotation files written by tests."""

import itertools
import json

from PIL import Image


def write_coco(tmp_path, images, annotations, categories=({"id": 1, "name": "a"}, {"id": 7, "name": "b"})):
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    for entry in images:
        if entry.get("create", True):
            Image.new("RGB", (entry["width"], entry["height"]), (90, 90, 90)).save(image_dir / entry["file_name"])
    clean = [{k: v for k, v in entry.items() if k != "create"} for entry in images]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": clean, "annotations": annotations, "categories": list(categories)}))
    return path, image_dir


def image(image_id, name=None, width=100, height=80, create=True):
    return {"id": image_id, "file_name": name or f"{image_id}.png", "width": width, "height": height, "create": create}


# Default annotation ids: unique (a duplicate is a problem data check names), and above any
# id a test gives explicitly.
_ANNOTATION_IDS = itertools.count(100_000)


def box(image_id, bbox, category=1, crowd=0, annotation_id=None):
    return {
        "id": annotation_id or next(_ANNOTATION_IDS),
        "image_id": image_id,
        "bbox": bbox,
        "category_id": category,
        "iscrowd": crowd,
    }
