"""Image decoding: the documented formats only, any mode to RGB, EXIF orientation, the pixel cap from the header."""

import numpy as np
import pytest
from PIL import Image

from retinanet_xla.data.image_io import UnreadableImage, read_rgb


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_any_image_mode_decodes_to_rgb(tmp_path, mode):
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    Image.new(mode, (12, 9)).save(path)
    decoded = read_rgb(path)
    assert decoded.mode == "RGB" and decoded.size == (12, 9)


def test_exif_orientation_is_honoured(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # white left band
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    decoded = np.asarray(read_rgb(path))
    assert decoded.shape == (40, 20, 3)
    assert decoded[:10].mean() > 200 and decoded[15:].mean() < 50  # the band is now on top


def test_only_jpeg_and_png_are_decoded_whatever_the_file_name(tmp_path):
    disguised = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(disguised, format="BMP")
    with pytest.raises(UnreadableImage, match=r"photo.jpg: not a JPEG or PNG image"):
        read_rgb(disguised)
    eps = tmp_path / "vector.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(UnreadableImage, match="not a JPEG or PNG image"):
        read_rgb(eps)


def test_the_pixel_count_is_refused_from_the_header_before_decoding(tmp_path, monkeypatch):
    from retinanet_xla.data import image_io

    path = tmp_path / "large.png"
    Image.new("L", (300, 200)).save(path)
    monkeypatch.setattr(image_io, "MAX_PIXELS", 50_000)
    with pytest.raises(UnreadableImage, match=r"large.png: 300x200 pixels, more than the 50,000 allowed \(data.max_pixels\)"):
        read_rgb(path)
    assert read_rgb(path, max_pixels=60_000).size == (300, 200)  # the config's limit wins
    with pytest.raises(UnreadableImage, match=r"more than the 59,999 allowed"):
        read_rgb(path, max_pixels=59_999)


def test_sixteen_bit_png_keeps_its_top_byte(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 256, 65535, 40000]], dtype=np.uint16)).save(path)
    assert np.asarray(read_rgb(path))[0, :, 0].tolist() == [0, 1, 255, 156]


def test_a_file_longer_than_any_allowed_image_is_not_read_whole(tmp_path, monkeypatch):
    """A valid JPEG followed by a trailer: decoders ignore it, so it was read whole, however long."""
    from retinanet_xla import storage
    from retinanet_xla.data import image_io

    path = tmp_path / "trailer.jpg"
    Image.new("RGB", (20, 10)).save(path)
    head = path.read_bytes()
    limit = image_io.BYTES_PER_PIXEL * 1000 + image_io.HEADER_BYTES
    with path.open("ab") as handle:
        handle.write(b"\0" * (limit + 4096 - len(head)))
    read, original = [], storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda p, at_most=None: read.append(at_most) or original(p, at_most))
    with pytest.raises(
        UnreadableImage, match=f"trailer.jpg: more than {limit:,} bytes, more than an image of data.max_pixels takes"
    ):
        read_rgb(path, max_pixels=1000)
    assert read == [limit]
    monkeypatch.undo()
    assert read_rgb(path, max_pixels=2000).size == (20, 10)  # the same file, within a larger limit
