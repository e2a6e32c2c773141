"""``retinanet-xla data check``: every problem of a dataset, without training."""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from retinanet_xla import storage
from retinanet_xla.data.coco import CocoDataset, load_coco
from retinanet_xla.data.frames import AnnotationFrame
from retinanet_xla.data.image_io import UnreadableImage, read_oriented


@dataclass
class CheckReport:
    dataset: CocoDataset
    num_images: int
    num_boxes: int
    num_crowd: int
    boxes_per_category: Dict[str, int]
    turned: int = 0  # images the JSON describes by their stored pixels, which EXIF turns

    @property
    def ok(self) -> bool:
        return not self.dataset.problems

    def lines(self) -> List[str]:
        mapping = self.dataset.mapping
        out = [
            f"{self.dataset.annotations_file}: {self.num_images} usable images, {self.num_boxes} boxes "
            f"({self.num_crowd} crowd), {len(mapping.category_ids)} categories",
            "boxes per category: " + ", ".join(f"{name} {count}" for name, count in self.boxes_per_category.items()),
        ]
        if self.turned:
            out.append(
                f"{self.turned} image(s) described in the JSON by their stored pixels, which their EXIF orientation "
                "turns: their boxes turn with them in training and evaluation"
            )
        if self.ok:
            out.append("no problems found")
        out += self.dataset.problem_lines()
        folder = self.folder_holding_the_images()
        if folder is not None:
            out.append(f"the missing images are in {folder}: pass --images {folder}")
        return out

    def folder_holding_the_images(self) -> Optional[Path]:
        """Where the images are when none was found where ``--images`` says (a folder one level
        down, as a zip or a tool that adds ``images/`` leaves them), else None."""
        missing = self.dataset.examples.get("missing image file", [])
        if self.num_images or not missing or storage.is_url(self.dataset.images_dir):
            return None
        root = Path(self.dataset.images_dir)
        try:
            name = Path(missing[0]).relative_to(root)
            folders = sorted(entry for entry in root.iterdir() if entry.is_dir())
        except (ValueError, OSError):
            return None
        return next((folder for folder in folders if (folder / name).is_file()), None)


def check_dataset(annotations: str, images: str, decode: bool = True) -> CheckReport:
    """Load with the training defaults and, with ``decode``, decode every image as training would."""
    dataset = load_coco(annotations, images)
    turned = 0
    if decode:
        readable = []
        for record in dataset.records:
            try:
                oriented = read_oriented(record.path)
            except UnreadableImage as error:
                dataset.note("unreadable image", str(error))
                continue
            image = oriented.image
            # The JSON may give the displayed size or, for an EXIF-turned photo, the stored one
            # (training and evaluation map between them: data/frames.py).
            frame = AnnotationFrame.of((record.width, record.height), oriented)
            turned += frame.how == "turned"
            if frame.how == "rescaled":
                dataset.note(
                    "image size differs from the JSON (boxes rescaled to the file in training and evaluation)",
                    f"{storage.name(record.path)}: {image.width}x{image.height} vs {record.width}x{record.height}",
                )
            readable.append(record)
        dataset.records = readable
    if not dataset.usable_boxes:
        dataset.note("no usable boxes in any image", dataset.no_usable_boxes())
    counts = {mapping_id: 0 for mapping_id in dataset.mapping.category_ids}
    for record in dataset.records:
        for category_id in record.category_ids.tolist():
            counts[category_id] += 1
    return CheckReport(
        dataset,
        num_images=len(dataset.records),
        num_boxes=sum(len(r.boxes) for r in dataset.records),
        num_crowd=sum(int(r.crowd.sum()) for r in dataset.records),
        boxes_per_category={dataset.mapping.names[k]: v for k, v in counts.items()},
        turned=turned,
    )
