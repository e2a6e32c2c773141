"""Decoding any image a dataset holds to 8-bit RGB, trusting nothing in the file.

Only the formats we document are decoded: JPEG and PNG, whatever the file's name says (Pillow
would otherwise open any of the ~40 formats it knows; an EPS file named ``.jpg`` makes it start
Ghostscript where that is installed). The header's pixel count is checked before any pixel is
decoded: Pillow itself only warns up to twice its own limit, and decodes a 144 M-pixel PNG in
1.5 GB.
"""

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

from retinanet_xla import storage
from retinanet_xla.storage import Location

FORMATS = ("JPEG", "PNG")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # how files of those formats are named, where a folder is listed
# A decompression bomb in an untrusted dataset must fail, not exhaust a data worker's memory:
# COCO's largest image has 0.3 M pixels, a 10,000 x 10,000 aerial tile 100 M. The default of
# data.max_pixels; the header check below replaces Pillow's own (which only warns up to twice
# its limit).
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = None
ORIENTATION_TAG = 0x0112  # EXIF
# The most bytes a JPEG or PNG of N pixels takes: 16-bit RGBA stored uncompressed is 8 bytes a
# pixel; with room for its metadata (EXIF, ICC profiles).
BYTES_PER_PIXEL = 8
HEADER_BYTES = 16 * 2**20


def image_size(path: Path) -> Optional[Tuple[int, int]]:
    """``(width, height)`` from a local JPEG or PNG file's header (no pixel is decoded); None when the
    file is missing or not one of those formats."""
    try:
        with Image.open(path, formats=FORMATS) as image:
            return image.size
    except (OSError, ValueError, SyntaxError):  # UnidentifiedImageError is an OSError
        return None


class UnreadableImage(Exception):
    """The file is missing or cannot be decoded; the loader substitutes another image."""


def read_rgb(
    path: Union[Location, storage.ByteRange], data: Optional[bytes] = None, max_pixels: Optional[int] = None
) -> Image.Image:
    """Decode ``path`` (or its ``data``, already fetched) as RGB, with EXIF orientation applied
    (phone photos are stored sideways). Grayscale, palette, RGBA (alpha dropped), CMYK and
    16-bit images all become RGB."""
    return read_oriented(path, data, max_pixels).image


@dataclass
class OrientedImage:
    image: Image.Image  # as displayed: EXIF orientation applied
    orientation: int  # the EXIF orientation tag (1: stored as displayed)
    stored_size: Tuple[int, int]  # (width, height) of the pixels in the file


def read_oriented(
    path: Union[Location, storage.ByteRange], data: Optional[bytes] = None, max_pixels: Optional[int] = None
) -> OrientedImage:
    """``read_rgb``, and what the EXIF orientation did (boxes in the stored frame follow it)."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    # A file may be short and still claim a huge trailer after its image: never read more than
    # an image of the allowed size can take (a JPEG with a 2 GiB trailer was read whole).
    max_bytes = BYTES_PER_PIXEL * limit + HEADER_BYTES
    try:
        if data is None:
            if isinstance(path, storage.ByteRange) and path.length > max_bytes:
                raise UnreadableImage(f"{path}: {path.length:,} bytes, more than an image of data.max_pixels takes")
            data = storage.read_bytes(path, at_most=max_bytes)
        if len(data) > max_bytes:
            raise UnreadableImage(f"{path}: more than {max_bytes:,} bytes, more than an image of data.max_pixels takes")
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            if width * height > limit:
                raise UnreadableImage(f"{path}: {width}x{height} pixels, more than the {limit:,} allowed (data.max_pixels)")
            orientation = image.getexif().get(ORIENTATION_TAG, 1)
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale PNG
                image = image.convert("I")  # 32-bit: its top byte of 16 is the 8-bit value
                image = Image.fromarray((np.asarray(image) >> 8).clip(0, 255).astype(np.uint8))
            return OrientedImage(image.convert("RGB"), orientation if orientation in range(1, 9) else 1, (width, height))
    except Image.UnidentifiedImageError:
        raise UnreadableImage(f"{path}: not a {' or '.join(FORMATS)} image") from None
    except FileNotFoundError:
        raise UnreadableImage(f"{path}: no such file") from None
    except storage.StorageError as error:
        raise UnreadableImage(str(error)) from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise UnreadableImage(f"{path}: {error}") from None
