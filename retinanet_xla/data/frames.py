"""Where an annotation file's boxes lie on the decoded image, and back: the one mapping that
training's targets and evaluation's detections both use.

A COCO file gives each image a width and a height, and its boxes in that frame. The image as
decoded (EXIF orientation applied, ``image_io.read_oriented``) can differ from it in two ways
that the docs accept (docs/data.md): the JSON describes the file's stored pixels, which EXIF
orientations 5-8 turn on their side, or the JSON was written for another resolution of the same
picture. ``AnnotationFrame.to_image`` takes boxes onto the decoded pixels, where the model sees
them; ``to_annotation`` takes detections back, so that pycocotools compares them with the file's
own boxes. Both are 2x3 affine matrices: ``[x', y'] = M @ [x, y, 1]``.
"""

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from retinanet_xla.data.image_io import OrientedImage

IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def orientation_matrix(orientation: int, stored_size: Tuple[int, int]) -> np.ndarray:
    """A point of the stored pixels moved as ``ImageOps.exif_transpose`` moves it, for the
    orientations that swap width and height (5-8; the others keep the frame's size, and a JSON
    of that size describes the image as displayed)."""
    width, height = stored_size
    moves = {
        5: [[0, 1, 0], [1, 0, 0]],  # transposed: (x, y) -> (y, x)
        6: [[0, -1, height], [1, 0, 0]],  # turned 90 degrees clockwise: (x, y) -> (H - y, x)
        7: [[0, -1, height], [-1, 0, width]],  # transversed: (x, y) -> (H - y, W - x)
        8: [[0, 1, 0], [-1, 0, width]],  # turned 90 degrees counter-clockwise: (x, y) -> (y, W - x)
    }
    return np.array(moves[orientation], dtype=np.float64) if orientation in moves else IDENTITY.copy()


def invert(matrix: np.ndarray) -> np.ndarray:
    square = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return np.linalg.inv(square)[:2]


def map_boxes(matrix: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Boxes ``[N, 4]`` (x1, y1, x2, y2) through ``matrix``: both corners moved, then ordered
    (a turn or a flip swaps them). Exact for the maps made here, which keep boxes axis-aligned."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    linear, offset = matrix[:, :2], matrix[:, 2]
    first = boxes[:, 0:2] @ linear.T + offset
    second = boxes[:, 2:4] @ linear.T + offset
    return np.concatenate([np.minimum(first, second), np.maximum(first, second)], axis=1).astype(np.float32)


@dataclass(frozen=True)
class AnnotationFrame:
    to_image: np.ndarray  # annotation frame -> decoded pixels
    how: str  # "same" | "turned" (EXIF, the JSON describing the stored pixels) | "rescaled"

    @classmethod
    def of(cls, annotated_size: Tuple[int, int], oriented: OrientedImage) -> "AnnotationFrame":
        """``annotated_size``: the JSON's (width, height) of the image ``oriented`` decodes."""
        decoded = (oriented.image.width, oriented.image.height)
        if annotated_size == decoded:
            return cls(IDENTITY.copy(), "same")
        if annotated_size == oriented.stored_size and oriented.orientation in (5, 6, 7, 8):
            return cls(orientation_matrix(oriented.orientation, oriented.stored_size), "turned")
        (width, height), (to_width, to_height) = annotated_size, decoded
        return cls(np.array([[to_width / width, 0.0, 0.0], [0.0, to_height / height, 0.0]]), "rescaled")

    @property
    def to_annotation(self) -> np.ndarray:
        """Decoded pixels -> the annotation frame (where detections are written and scored)."""
        return invert(self.to_image)
