"""COCO instances JSON -> validated, in-memory image records.

Annotation files come from others, so nothing in them is trusted: the structure is checked at
start-up (one clear error for a file that is not COCO instances format), every per-image or
per-box problem is counted under a named reason instead of crashing a run hours in, and image
paths must stay inside the images directory.
"""

import json
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Container, Dict, List, Optional, Tuple, Union

import numpy as np

from retinanet_xla import storage
from retinanet_xla.errors import DatasetError, shown
from retinanet_xla.storage import Location

MAX_SIDE = 2**31 - 1  # PNG's own limit; JPEG's is 65,535
MAX_ID = 2**63 - 1  # image and category ids are int64 in batches and checkpoints

LABEL_MAPPINGS = ("contiguous", "raw")


@dataclass
class ImageRecord:
    image_id: int
    path: Union[Location, storage.ByteRange]  # a file, or a record in a shard (data/records.py)
    width: int  # from the JSON; the decoded size wins when they differ
    height: int
    boxes: np.ndarray  # [N, 4] float32, x1 y1 x2 y2 in original pixels, clipped to the image
    category_ids: np.ndarray  # [N] int64, the dataset's own ids
    crowd: np.ndarray  # [N] bool


@dataclass
class CategoryMapping:
    """How dataset category ids become training labels, and back.

    ``contiguous``: sorted ids -> 0..K-1. ``raw``: label = category id (COCO's 91 slots, as the
    reference recipe and torchvision's COCO models)."""

    mode: str
    category_ids: List[int]
    names: Dict[int, str]

    def __post_init__(self):
        if self.mode not in LABEL_MAPPINGS:
            raise DatasetError(f"data.label_mapping must be one of {', '.join(LABEL_MAPPINGS)}, got {self.mode!r}")
        self.category_ids = sorted(self.category_ids)

    @property
    def num_labels(self) -> int:
        """The smallest ``model.num_classes`` that covers every label."""
        if self.mode == "raw":
            return max(self.category_ids, default=-1) + 1
        return len(self.category_ids)

    def to_labels(self, category_ids: np.ndarray) -> np.ndarray:
        if self.mode == "raw":
            return category_ids.astype(np.int64)
        return np.searchsorted(np.asarray(self.category_ids), category_ids).astype(np.int64)

    def to_category_ids(self, labels: np.ndarray) -> np.ndarray:
        if self.mode == "raw":
            return labels.astype(np.int64)
        return np.asarray(self.category_ids, dtype=np.int64)[labels]

    def to_dict(self) -> dict:
        """Plain data for checkpoints and detections files."""
        return {"mode": self.mode, "category_ids": list(self.category_ids), "names": {str(k): v for k, v in self.names.items()}}

    @classmethod
    def from_dict(cls, data: Any) -> "CategoryMapping":
        """``to_dict``'s data back, checked field by field (it comes from a file): ``ValueError``
        saying what is wrong, for the caller to name the file."""
        if not isinstance(data, dict) or set(data) != {"mode", "category_ids", "names"}:
            raise ValueError("must be a mapping of mode, category_ids and names")
        mode, ids, names = data["mode"], data["category_ids"], data["names"]
        if mode not in LABEL_MAPPINGS:
            raise ValueError(f"mode must be one of {', '.join(LABEL_MAPPINGS)}, got {shown(mode)}")
        if not isinstance(ids, list) or not ids or not all(_integer(i) and 0 <= i <= MAX_ID for i in ids):
            raise ValueError(f"category_ids must be a non-empty list of ids in 0..{MAX_ID}")
        if len(set(ids)) != len(ids):
            raise ValueError("category_ids lists an id twice")
        if not isinstance(names, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
            raise ValueError("names must map category ids (as text) to names")
        by_id = {}
        for key, name in names.items():
            if not key.isdigit() or int(key) not in ids:
                raise ValueError(f"names has {shown(key)}, which is not one of its category_ids")
            by_id[int(key)] = name
        if len(set(by_id.values())) != len(by_id):
            raise ValueError("two categories share a name")
        return cls(mode, list(ids), by_id)


class ProblemCounts:
    """Problems counted by reason, with the first few examples of each: what a dataset reader
    or converter leaves out instead of failing. For dataclasses with ``problems`` (a Counter)
    and ``examples`` (reason -> descriptions) fields."""

    problems: Counter
    examples: Dict[str, List[str]]

    def note(self, reason: str, example: str) -> None:
        self.problems[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(example)

    def problem_lines(self, prefix: str = "") -> List[str]:
        """``PREFIXreason: count (e.g. first; second; third)``, one per reason, sorted."""
        return [
            f"{prefix}{reason}: {count} (e.g. {'; '.join(self.examples[reason])})"
            for reason, count in sorted(self.problems.items())
        ]


@dataclass
class CocoDataset(ProblemCounts):
    annotations_file: Location
    images_dir: Location
    records: List[ImageRecord]
    mapping: CategoryMapping
    problems: Counter = field(default_factory=Counter)  # reason -> count
    examples: Dict[str, List[str]] = field(default_factory=dict)  # reason -> first few descriptions

    @property
    def usable_boxes(self) -> int:
        """Boxes a model can learn from or be scored on: crowd regions are neither (training
        ignores the anchors they cover; pycocotools ignores detections matching them)."""
        return sum(int((~record.crowd).sum()) for record in self.records)

    def no_usable_boxes(self) -> str:
        """Why a split has no usable box, as the one line ``dataset_split`` and ``data check`` give."""
        crowd = sum(int(record.crowd.sum()) for record in self.records)
        line = f"{self.annotations_file}: no usable boxes in any image (run 'retinanet-xla data check' for details)"
        return line + (f": its {crowd} box(es) are all crowd regions (iscrowd 1)" if crowd else "")


def _check_unique_names(categories: Dict[int, str], path: Location) -> None:
    """Category names are what a person reads per-category AP and box counts by, and what
    ``model.init_from`` matches classes by: two categories of one name would be counted and
    scored as one."""
    by_name: Dict[str, List[int]] = {}
    for category_id, name in categories.items():
        by_name.setdefault(name, []).append(category_id)
    shared = [(name, ids) for name, ids in by_name.items() if len(ids) > 1]
    if shared:
        name, ids = shared[0]
        more = f" ({len(shared)} names are shared)" if len(shared) > 1 else ""
        raise DatasetError(
            f"{path}: categories {ids} share the name {name!r}{more}: per-category counts and AP, and "
            "model.init_from's class matching, go by name; give each category its own name"
        )


def _require(condition: bool, path: Location, problem: str) -> None:
    if not condition:
        raise DatasetError(f"{path}: not a COCO instances file: {problem}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _integer(value) -> bool:
    """A JSON integer (``true`` and ``5.0`` are not ids)."""
    return isinstance(value, int) and not isinstance(value, bool)


def annotation_problem(entry: dict, image_ids: Container, categories: Container) -> Optional[Tuple[str, str]]:
    """Why an annotation cannot be used (the reason and an example for ``data check``), or
    None. Training and evaluation's ground truth drop the same ones."""
    image_id, category_id, crowd, bbox = (
        entry.get("image_id"),
        entry.get("category_id"),
        entry.get("iscrowd", 0),
        entry.get("bbox"),
    )
    if not (_integer(image_id) and _integer(category_id)):
        return (
            "annotation without an integer image_id and category_id",
            f"annotation {entry.get('id')}: image_id {image_id!r}, category_id {category_id!r}",
        )
    if image_id not in image_ids:
        return "annotation for an unknown or skipped image", f"annotation {entry.get('id')} -> image {image_id}"
    if category_id not in categories:
        return "annotation with an unknown category", f"annotation {entry.get('id')} -> category {category_id}"
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
        return "malformed bbox", f"annotation {entry.get('id')}: {bbox!r}"
    if crowd not in (0, 1) or isinstance(crowd, float):  # "0" is a string, true as a bool
        return "iscrowd that is not 0 or 1", f"annotation {entry.get('id')}: iscrowd {crowd!r}"
    return None


def resolve_image_path(images_dir: Location, file_name: str) -> Optional[Location]:
    """The image's path, or None when ``file_name`` would leave the images directory
    (absolute paths, ``..``, symlinks pointing out; on object storage, keys outside the prefix)."""
    if "\0" in file_name:  # no file system takes it (Path.resolve raises on it)
        return None
    if storage.is_url(images_dir):
        relative = posixpath.normpath(file_name)
        outside = relative.startswith(("/", "../")) or relative in (".", "..") or "://" in file_name
        return None if outside else storage.join(images_dir, relative)
    root = Path(images_dir).resolve()
    try:
        candidate = (root / file_name).resolve()
    except (RuntimeError, OSError):  # a symlink loop: no file there, but where it lies is known
        candidate = Path(os.path.normpath(root / file_name))
    return candidate if candidate.is_relative_to(root) and candidate != root else None


def _local_file_exists(path: Location) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # a name longer than the file system takes (ENAMETOOLONG), a denied folder
        return False


def _file_check(images_dir: Location) -> Callable[[Location], bool]:
    """Whether an image file exists: one listing of a bucket prefix instead of one request per image."""
    if not storage.is_url(images_dir):
        return _local_file_exists
    present = storage.files_below(images_dir)
    return lambda path: str(path)[len(str(images_dir)) + 1 :] in present


def read_annotations(path: Location, missing: str = "annotation file does not exist") -> dict:
    """The parsed JSON of an annotation file; a missing file (``missing`` says what it is) or one
    that is not JSON is a ``DatasetError``."""
    if not storage.is_file(path):
        raise DatasetError(f"{path}: {missing}")
    try:
        return json.loads(storage.read_text(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:  # [[[[... nested beyond what the parser's recursion can hold
        raise DatasetError(f"{path}: nested too deeply to be an annotation file") from None


def load_coco(
    annotations_file: Location,
    images_dir: Location,
    label_mapping: str = "contiguous",
    min_box_size: float = 1.0,
    check_files: bool = True,
    data: Optional[dict] = None,
) -> CocoDataset:
    """Read and validate a COCO instances file. Structural problems raise ``DatasetError``;
    problems with single images or boxes are counted in ``dataset.problems`` and those entries
    dropped (boxes are clipped to the image first; a box narrower or shorter than
    ``min_box_size`` pixels after clipping is degenerate). ``data``: the file's content, when
    the caller has read it already."""
    annotations_file, images_dir = storage.location(annotations_file), storage.location(images_dir)
    if data is None and not storage.is_file(annotations_file):
        raise DatasetError(f"{annotations_file}: annotation file does not exist")
    if check_files and not storage.is_dir(images_dir):
        raise DatasetError(f"{images_dir}: images directory does not exist")
    if data is None:
        data = read_annotations(annotations_file)
    _require(isinstance(data, dict), annotations_file, "the top level must be an object")
    for key in ("images", "annotations", "categories"):
        _require(isinstance(data.get(key), list), annotations_file, f"missing list '{key}'")

    categories = {}
    for entry in data["categories"]:
        _require(
            isinstance(entry, dict) and isinstance(entry.get("id"), int), annotations_file, "every category needs an integer 'id'"
        )
        _require(0 <= entry["id"] <= MAX_ID, annotations_file, f"category id {entry['id']} is outside 0..{MAX_ID}")
        _require(entry["id"] not in categories, annotations_file, f"category id {entry['id']} is listed twice")
        categories[entry["id"]] = str(entry.get("name", entry["id"]))
    _require(bool(categories), annotations_file, "'categories' is empty")
    _check_unique_names(categories, annotations_file)
    mapping = CategoryMapping(label_mapping, list(categories), categories)
    dataset = CocoDataset(annotations_file, images_dir, [], mapping)

    images = {}
    file_exists = _file_check(images_dir) if check_files else None
    ids = Counter(entry.get("id") for entry in data["images"] if isinstance(entry, dict) and _integer(entry.get("id")))
    for entry in data["images"]:
        _require(
            isinstance(entry, dict) and _integer(entry.get("id")) and isinstance(entry.get("file_name"), str),
            annotations_file,
            "every image needs an integer 'id' and a string 'file_name'",
        )
        if not 0 <= entry["id"] <= MAX_ID:  # ids become int64 tensors in the data workers
            dataset.note(f"image id outside 0..{MAX_ID} (skipped)", f"id {entry['id']}: {entry['file_name']}")
            continue
        if ids[entry["id"]] > 1:  # whose boxes are whose is unknowable: none of them is used
            dataset.note("duplicate image id (every image with it skipped)", f"id {entry['id']}: {entry['file_name']}")
            continue
        path = resolve_image_path(images_dir, entry["file_name"])
        if path is None:
            dataset.note("image path outside the images directory", entry["file_name"])
            continue
        if check_files and not file_exists(path):
            dataset.note("missing image file", str(path))
            continue
        width, height = entry.get("width"), entry.get("height")
        if not (_number(width) and _number(height) and width >= 1 and height >= 1):
            dataset.note("image without a width and height of at least 1 pixel", f"{entry['file_name']}: {width}x{height}")
            continue
        if width > MAX_SIDE or height > MAX_SIDE:  # an int64 overflow in the data worker, not an image
            dataset.note(f"image wider or taller than {MAX_SIDE} pixels", f"{entry['file_name']}: {width}x{height}")
            continue
        images[entry["id"]] = (path, int(width), int(height), [])

    # Only integer ids are compared (training does not use them; evaluation numbers them anew).
    annotation_ids = Counter(
        entry.get("id") for entry in data["annotations"] if isinstance(entry, dict) and _integer(entry.get("id"))
    )
    for entry in data["annotations"]:
        _require(isinstance(entry, dict), annotations_file, "every annotation must be an object")
        if _integer(entry.get("id")) and annotation_ids[entry["id"]] > 1:
            dataset.note("duplicate annotation id (evaluation numbers them anew)", f"annotation {entry.get('id')!r}")
        problem = annotation_problem(entry, images, categories)
        if problem is not None:
            dataset.note(*problem)
        else:
            images[entry["image_id"]][3].append((entry["bbox"], entry["category_id"], bool(entry.get("iscrowd", 0))))

    for image_id, (path, width, height, annotations) in images.items():
        boxes, category_ids, crowd = [], [], []
        for (x, y, w, h), category_id, is_crowd in annotations:
            if w <= 0 or h <= 0:
                dataset.note("box with non-positive size", f"image {image_id}: {[x, y, w, h]}")
                continue
            clipped = [min(max(x, 0), width), min(max(y, 0), height), min(max(x + w, 0), width), min(max(y + h, 0), height)]
            if clipped != [x, y, x + w, y + h]:
                dataset.note("box outside the image (clipped)", f"image {image_id}: {[x, y, w, h]}")
            if clipped[2] - clipped[0] < min_box_size or clipped[3] - clipped[1] < min_box_size:
                dataset.note("box degenerate after clipping", f"image {image_id}: {[x, y, w, h]}")
                continue
            boxes.append(clipped)
            category_ids.append(category_id)
            crowd.append(is_crowd)
        dataset.records.append(
            ImageRecord(
                image_id,
                path,
                width,
                height,
                np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                np.asarray(category_ids, dtype=np.int64),
                np.asarray(crowd, dtype=bool),
            )
        )
    dataset.records.sort(key=lambda record: record.image_id)
    return dataset
