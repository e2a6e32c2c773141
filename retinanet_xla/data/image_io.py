"""Decoding any image a dataset holds to 8-bit RGB."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# A decompression bomb in an untrusted dataset should fail, not exhaust memory; COCO's largest
# images are far below this.
Image.MAX_IMAGE_PIXELS = 100_000_000


class UnreadableImage(Exception):
    """The file is missing or cannot be decoded; the loader substitutes another image."""


def read_rgb(path: Path) -> Image.Image:
    """Decode ``path`` as RGB, with EXIF orientation applied (phone photos are stored sideways).
    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images all become RGB."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale PNG
                image = Image.fromarray((np.asarray(image, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8))
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise UnreadableImage(f"{path}: {error}") from None
