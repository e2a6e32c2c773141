"""Decoding any image a dataset holds to 8-bit RGB, trusting nothing in the file.

Only the formats we document are decoded: JPEG and PNG, whatever the file's name says (Pillow
would otherwise open any of the ~40 formats it knows; an EPS file named ``.jpg`` makes it start
Ghostscript where that is installed). The header's pixel count is checked before any pixel is
decoded: Pillow itself only warns up to twice its own limit, and decodes a 144 M-pixel PNG in
1.5 GB.
"""

import io
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from retinanet_xla import storage
from retinanet_xla.storage import Location

FORMATS = ("JPEG", "PNG")
# A decompression bomb in an untrusted dataset must fail, not exhaust a data worker's memory:
# COCO's largest image has 0.3 M pixels, a 10,000 x 10,000 aerial tile 100 M.
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class UnreadableImage(Exception):
    """The file is missing or cannot be decoded; the loader substitutes another image."""


def read_rgb(path: Location, data: Optional[bytes] = None) -> Image.Image:
    """Decode ``path`` (or its ``data``, already fetched) as RGB, with EXIF orientation applied
    (phone photos are stored sideways). Grayscale, palette, RGBA (alpha dropped), CMYK and
    16-bit images all become RGB."""
    try:
        if data is None:
            data = storage.read_bytes(path)
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise UnreadableImage(f"{path}: {width}x{height} pixels, more than the {MAX_PIXELS:,} allowed")
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale PNG
                image = image.convert("I")  # 32-bit: its top byte of 16 is the 8-bit value
                image = Image.fromarray((np.asarray(image) >> 8).clip(0, 255).astype(np.uint8))
            return image.convert("RGB")
    except Image.UnidentifiedImageError:
        raise UnreadableImage(f"{path}: not a {' or '.join(FORMATS)} image") from None
    except FileNotFoundError:
        raise UnreadableImage(f"{path}: no such file") from None
    except storage.StorageError as error:
        raise UnreadableImage(str(error)) from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise UnreadableImage(f"{path}: {error}") from None
