"""``retinanet_xla.Predictor``: a trained detector from Python, on paths, PIL images, arrays or
tensors, through the same inference path as ``predict`` and ``eval`` (``predict.detect_arrays``).

    from retinanet_xla import Predictor

    predictor = Predictor.load("runs/demo")
    found = predictor("photo.jpg")  # found.boxes [N, 4] x1 y1 x2 y2 in the photo's pixels
"""

from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from retinanet_xla.data.image_io import read_rgb
from retinanet_xla.errors import ConfigError
from retinanet_xla.inference.loading import LoadedModel, load_for_inference
from retinanet_xla.inference.predict import Found, detect_arrays

ImageLike = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]


def as_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path (JPEG or PNG, EXIF orientation applied), a PIL image, an
    ``HxWx3`` (or ``HxW``) uint8 array, or a uint8 tensor ``3xHxW`` or ``HxWx3``."""
    if isinstance(image, (str, Path)):
        return read_rgb(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.permute(1, 2, 0)  # CHW -> HWC
        image = image.numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3)):
            raise ConfigError(f"an image array must be uint8, HxW or HxWx3; got {image.dtype} {tuple(image.shape)}")
        return Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image).convert("RGB")
    raise ConfigError(f"not an image: {type(image).__name__} (a path, PIL image, uint8 array or tensor)")


class Predictor:
    """A checkpoint's detector on one device, ready to call."""

    def __init__(self, loaded: LoadedModel, score_threshold: float = 0.3):
        self.loaded, self.score_threshold = loaded, score_threshold

    @classmethod
    def load(
        cls,
        checkpoint: Union[str, Path],
        device: Optional[str] = None,
        score_threshold: float = 0.3,
        overrides: Sequence[str] = (),
    ) -> "Predictor":
        """``checkpoint``: a run directory (its newest valid checkpoint) or a checkpoint file;
        ``device``: ``runtime.device`` (``cpu``, ``cuda``, ``xla``, ``tpu``; default: the
        checkpoint's config, ``auto``); ``overrides``: ``--set`` items (``eval.batch_size=8``)."""
        settings = [*overrides, *([f"runtime.device={device}"] if device else [])]
        return cls(load_for_inference(str(checkpoint), settings), score_threshold)

    @property
    def names(self) -> List[str]:
        """The classes the model knows, by the names of the dataset it was trained on."""
        mapping = self.loaded.mapping
        return [mapping.names.get(i, str(i)) for i in mapping.category_ids]

    def __call__(self, images: Union[ImageLike, Sequence[ImageLike]]) -> Union[Found, List[Found]]:
        """One image -> its ``Found``; a list -> a list (batched on the device)."""
        single = not isinstance(images, (list, tuple))
        found = detect_arrays(self.loaded, [as_image(image) for image in ([images] if single else images)], self.score_threshold)
        return found[0] if single else found
