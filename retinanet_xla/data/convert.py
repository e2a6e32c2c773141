"""YOLO and Pascal VOC datasets -> one COCO instances file that ``data check`` and training read.

Label files come from others (CVAT, Roboflow, LabelImg exports, hand edits): every line or
object that cannot be placed is counted under a named reason with its first examples
(``file:line``), never a traceback, and left out of the output.

- YOLO: ``SRC/images/**/NAME.jpg`` with ``SRC/labels/**/NAME.txt`` (same relative path), one
  ``class cx cy w h`` line per box, normalised to [0, 1]; class names from ``SRC/classes.txt``
  (one per line) or ``SRC/data.yaml`` (``names:`` as a list or an index mapping). An image
  without a label file has no boxes. Category ids are the class index + 1 (COCO ids start at 1).
  A split (``split``) is ``SRC/images/SPLIT`` with ``SRC/labels/SPLIT`` (Ultralytics) or
  ``SRC/SPLIT/images`` with ``SRC/SPLIT/labels`` (Roboflow): one COCO file per split, so that
  validation images are never trained on; several splits under ``images/`` are merged only when
  asked (``split="all"``).
- VOC: ``SRC/Annotations/*.xml`` with ``SRC/JPEGImages/``; 1-based pixel corners
  (``xmin ymin xmax ymax``, inclusive) become ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``;
  ``difficult`` objects become ``iscrowd: 1``, which training and evaluation ignore, as VOC's
  own evaluation does. Categories are the sorted object names, ids from 1.
"""

import json
import math
import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from retinanet_xla.data.coco import ProblemCounts, resolve_image_path
from retinanet_xla.data.image_io import IMAGE_SUFFIXES, image_size
from retinanet_xla.errors import DatasetError

SOURCES = ("yolo", "voc")  # and coco, to record shards: data/records.py
YOLO_SPLITS = ("train", "val", "valid", "test")  # the split directories exporters write
TOLERANCE = 1e-3  # normalised coordinates this far outside [0, 1] are rounding, and clipped


@dataclass
class Conversion(ProblemCounts):
    coco: Dict
    images_dir: Path  # what data.*.images must name: file names are relative to it
    problems: Counter = field(default_factory=Counter)
    examples: Dict[str, List[str]] = field(default_factory=dict)

    def lines(self, output: Path) -> List[str]:
        out = [
            f"wrote {output}: {len(self.coco['images'])} images, {len(self.coco['annotations'])} boxes, "
            f"{len(self.coco['categories'])} categories; images directory {self.images_dir}"
        ]
        return out + self.problem_lines("left out, ")


def convert(source: str, root: Path, output: Path, split: Optional[str] = None) -> Conversion:
    if source not in SOURCES:
        raise DatasetError(f"--from {source}: expected one of coco, {', '.join(SOURCES)}")
    if split is not None and source != "yolo":
        raise DatasetError(f"--split {split}: only --from yolo has splits (convert each VOC year or split directory on its own)")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory does not exist")
    conversion = from_yolo(root, split) if source == "yolo" else from_voc(root)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(conversion.coco))
    return conversion


def yolo_class_names(root: Path) -> List[str]:
    classes, data_yaml = root / "classes.txt", root / "data.yaml"
    for named in (classes, data_yaml):
        if named.is_file() and named.stat().st_size > 2**20:  # a class list is a few KB
            raise DatasetError(f"{named}: {named.stat().st_size:,} bytes, more than a list of class names takes")
    if classes.is_file():
        try:
            names = [line.strip() for line in classes.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as error:
            raise DatasetError(f"{classes}: not UTF-8 text (byte {error.start})") from None
        if not names:
            raise DatasetError(f"{classes}: names no class (one name per line)")
        return names
    if data_yaml.is_file():
        try:
            names = (yaml.safe_load(data_yaml.read_text(encoding="utf-8")) or {}).get("names")
        except UnicodeDecodeError as error:
            raise DatasetError(f"{data_yaml}: not UTF-8 text (byte {error.start})") from None
        except (yaml.YAMLError, AttributeError, RecursionError):
            names = None
        if isinstance(names, dict) and all(isinstance(k, int) for k in names):
            names = [str(names[k]) for k in sorted(names)] if sorted(names) == list(range(len(names))) else None
        if isinstance(names, list) and names:
            return [str(name) for name in names]
        raise DatasetError(f"{data_yaml}: 'names' must be a list of class names, or a mapping from 0, 1, ... to names")
    raise DatasetError(f"{root}: no classes.txt or data.yaml naming the YOLO classes")


def yolo_splits(root: Path) -> List[str]:
    """The split directories a YOLO export holds, in either layout."""
    return [name for name in YOLO_SPLITS if (root / "images" / name).is_dir() or (root / name / "images").is_dir()]


def yolo_directories(root: Path, split: Optional[str]) -> Tuple[Path, Path]:
    """The images and labels directories of ``split`` (None: the whole ``images/``, which must
    not hold several splits; "all": the whole ``images/``, splits merged)."""
    if split in (None, "all"):
        images_dir = root / "images"
        splits = yolo_splits(root)
        if split is None and len(splits) > 1:
            raise DatasetError(
                f"{root}: holds the splits {', '.join(splits)}: convert each to its own COCO file with --split NAME "
                "(--split all merges them)"
            )
        if not images_dir.is_dir():
            hint = f" (it has the splits {', '.join(splits)}: --split NAME)" if splits else ""
            raise DatasetError(f"{images_dir}: YOLO images directory does not exist{hint}")
        return images_dir, root / "labels"
    if "/" in split or split in ("", ".", ".."):
        raise DatasetError(f"--split {split!r}: expected the name of a split directory, such as train or val")
    for images_dir, labels_dir in (
        (root / "images" / split, root / "labels" / split),
        (root / split / "images", root / split / "labels"),
    ):
        if images_dir.is_dir():
            return images_dir, labels_dir
    found = f"; it has {', '.join(yolo_splits(root))}" if yolo_splits(root) else ""
    raise DatasetError(f"{root}: no split {split!r} (neither images/{split}/ nor {split}/images/){found}")


def from_yolo(root: Path, split: Optional[str] = None) -> Conversion:
    names = yolo_class_names(root)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # COCO categories are told apart by name (coco.load_coco refuses a repeat)
        raise DatasetError(f"{root}: the class name {repeated[0]!r} is given to more than one class id; give each its own name")
    images_dir, labels_dir = yolo_directories(root, split)
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(names)]
    conversion = Conversion({"images": [], "annotations": [], "categories": categories}, images_dir)
    paths = sorted(p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    for image_id, path in enumerate(paths, 1):
        relative = path.relative_to(images_dir)
        size = image_size(path)
        if size is None:
            conversion.note("image that cannot be read", str(relative))
            continue
        width, height = size
        conversion.coco["images"].append({"id": image_id, "file_name": str(relative), "width": width, "height": height})
        label_file = (labels_dir / relative).with_suffix(".txt")
        if not label_file.is_file():
            continue
        for number, line in enumerate(label_file.read_text(errors="replace").splitlines(), 1):
            if line.strip():
                _yolo_box(conversion, f"{label_file.relative_to(root)}:{number}", line, image_id, width, height, len(names))
    return conversion


def _yolo_box(conversion: Conversion, where: str, line: str, image_id: int, width: int, height: int, classes: int) -> None:
    fields = line.split()
    if len(fields) != 5:  # segmentation polygons (more fields) are not boxes
        conversion.note("line without exactly 5 fields (class cx cy w h)", f"{where}: {line.strip()[:40]}")
        return
    try:
        label, cx, cy, w, h = int(fields[0]), *map(float, fields[1:])
    except ValueError:
        conversion.note("line that is not numbers", f"{where}: {line.strip()[:40]}")
        return
    if not 0 <= label < classes:
        conversion.note(f"class outside 0..{classes - 1}", f"{where}: class {fields[0]}")
        return
    x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    values = (cx, cy, w, h, x1, y1, x2, y2)
    if any(v != v for v in values) or min(x1, y1) < -TOLERANCE or max(x2, y2) > 1 + TOLERANCE:
        conversion.note("box outside the normalised [0, 1] range", f"{where}: {' '.join(fields[1:])}")
        return
    if w <= 0 or h <= 0:
        conversion.note("box with no width or height", f"{where}: {' '.join(fields[1:])}")
        return
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2))
    bbox = [x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height]
    _append(conversion, image_id, label + 1, bbox, crowd=False)


def _append(conversion: Conversion, image_id: int, category_id: int, bbox: List[float], crowd: bool) -> None:
    annotations = conversion.coco["annotations"]
    annotations.append(
        {
            "id": len(annotations) + 1,
            "image_id": image_id,
            "category_id": category_id,
            "bbox": [round(v, 3) for v in bbox],
            "area": round(bbox[2] * bbox[3], 3),
            "iscrowd": int(crowd),
        }
    )


def from_voc(root: Path) -> Conversion:
    annotations_dir, images_dir = root / "Annotations", root / "JPEGImages"
    for needed in (annotations_dir, images_dir):
        if not needed.is_dir():
            raise DatasetError(f"{needed}: Pascal VOC directory does not exist")
    parsed = []
    conversion = Conversion({"images": [], "annotations": [], "categories": []}, images_dir)
    for xml_file in sorted(annotations_dir.glob("*.xml")):
        try:
            # The standard library's expat (>= 2.4.1) refuses entity-expansion bombs.
            parsed.append((xml_file, ElementTree.parse(xml_file).getroot()))
        except ElementTree.ParseError as error:
            conversion.note("annotation file that is not XML", f"{xml_file.name}: {error}")
        except OSError as error:  # a directory named *.xml, a file that cannot be read
            conversion.note("annotation file that cannot be read", f"{xml_file.name}: {error.strerror or error}")
    names = sorted({(obj.findtext("name") or "").strip() for _, tree in parsed for obj in tree.iter("object")} - {""})
    if not names:  # a COCO file needs its categories
        raise DatasetError(f"{annotations_dir}: no annotation file names an object (<object><name>...</name>)")
    ids = {name: index + 1 for index, name in enumerate(names)}
    conversion.coco["categories"] = [{"id": ids[name], "name": name} for name in names]
    for image_id, (xml_file, tree) in enumerate(parsed, 1):
        file_name = (tree.findtext("filename") or f"{xml_file.stem}.jpg").strip()
        path = resolve_image_path(images_dir, file_name)
        if path is None:  # the output's file names must stay inside JPEGImages, as data check requires
            conversion.note("image path outside the images directory", f"{xml_file.name} -> {file_name!r}")
            continue
        size = image_size(path)
        if size is None:
            conversion.note("image missing or unreadable", f"{xml_file.name} -> {file_name}")
            continue
        width, height = size  # the pixels' size: a wrong <size> in the XML is common
        conversion.coco["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for number, obj in enumerate(tree.iter("object"), 1):
            where = f"{xml_file.name} object {number}"
            name, box = (obj.findtext("name") or "").strip(), obj.find("bndbox")
            try:
                x1, y1, x2, y2 = corners = [float(box.findtext(key)) for key in ("xmin", "ymin", "xmax", "ymax")]
            except (AttributeError, TypeError, ValueError):
                conversion.note("object without a numeric bndbox", where)
                continue
            if not all(math.isfinite(corner) for corner in corners):  # float() reads "nan" and "inf"
                conversion.note("object without a numeric bndbox", f"{where}: {' '.join(map(str, corners))}")
                continue
            if not name:
                conversion.note("object without a name", where)
            elif (
                x2 < x1
                or y2 < y1
                or x1 < 1 - TOLERANCE
                or y1 < 1 - TOLERANCE
                or x2 > width + TOLERANCE
                or y2 > height + TOLERANCE
            ):
                conversion.note("bndbox outside the image or inverted", f"{where}: {x1:g} {y1:g} {x2:g} {y2:g}")
            else:
                difficult = (obj.findtext("difficult") or "0").strip() == "1"
                _append(conversion, image_id, ids[name], [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], crowd=difficult)
    return conversion
