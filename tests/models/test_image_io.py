"""Raster reading (`models/image_io.py`): the picture as viewers show it, or a reason."""

import numpy as np
import pytest
from PIL import Image

from models.errors import UnreadableImageError
from models.image_io import read_image

TIFF_PHOTOMETRIC = 262


def gradient16() -> np.ndarray:
    return (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)


@pytest.mark.parametrize("white_is_zero", [False, True])
def test_a_16_bit_tiff_is_read_as_displayed_whatever_its_photometric(tmp_path, white_is_zero):
    """Pillow inverts WhiteIsZero TIFFs of up to 8 bits only: a 16-bit one was scored as a negative."""
    values = gradient16()
    written = 65535 - values if white_is_zero else values
    path = tmp_path / "plate.tif"
    Image.fromarray(written).save(path, tiffinfo={TIFF_PHOTOMETRIC: 0 if white_is_zero else 1})
    with Image.open(path) as check:  # the file says what the test means
        assert check.tag_v2[TIFF_PHOTOMETRIC] == (0 if white_is_zero else 1) and check.mode.startswith("I;16")
    np.testing.assert_array_equal(read_image(path), values)


def test_a_float_raster_is_refused_with_its_own_reason(tmp_path):
    """The specific reason was re-wrapped as 'not a readable image file (UnreadableImageError)'."""
    path = tmp_path / "float.tif"
    Image.fromarray(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)).save(path)
    with pytest.raises(UnreadableImageError, match="^floating-point rasters are not supported"):
        read_image(path)


def test_a_16_bit_white_is_zero_tiff_of_12_bit_data_is_refused(tmp_path):
    """Inverted against 65535, 12-bit WhiteIsZero values became a nearly white picture that passed the
    low-bits check, and normal plates scored high suspicion; nothing says where such a file's white is."""
    values = (gradient16() >> 4)  # 12-bit data, stored unscaled
    path = tmp_path / "plate.tif"
    Image.fromarray(4095 - values).save(path, tiffinfo={TIFF_PHOTOMETRIC: 0})
    with pytest.raises(UnreadableImageError, match="WhiteIsZero image uses only its low 12 bits"):
        read_image(path)


def test_a_dicom_file_without_its_part_10_header_is_refused_saying_so(tmp_path, pneumoniamnist):
    """A raw dataset (no preamble, no 'DICM') read as 'not a readable image file' only, which sent
    the operator looking at the image, not at the export."""
    from worker.samples import make_cxr_dataset, save

    written = save(make_cxr_dataset(pneumoniamnist["test_images"][0], size=(256, 256)), tmp_path / "plate.dcm")
    raw = tmp_path / "raw.dcm"
    raw.write_bytes(written.read_bytes()[132:])
    with pytest.raises(UnreadableImageError, match=r"nor a DICOM Part 10 file \(no 'DICM' prefix at byte 128"):
        read_image(raw)


def test_a_raster_over_the_dicom_pixel_bound_is_refused_before_it_is_decoded(tmp_path):
    """Pillow only warns under 179 megapixels: a 169-megapixel PNG was decoded (2.4 GiB) and scored, where the
    same image as DICOM is refused above 144. The header's size is enough: this file's pixels are never read."""
    import struct
    import zlib

    from PIL import Image

    from models.dicom_io import PixelLimits
    from models.image_io import read_raster

    small = tmp_path / "small.png"
    Image.new("L", (64, 64), 128).save(small)
    data = bytearray(small.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", 13000, 13000)  # width, height
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    big = tmp_path / "big.png"
    big.write_bytes(bytes(data))
    with pytest.raises(UnreadableImageError, match=f"image size 13000x13000 exceeds "
                                                   f"{PixelLimits().max_pixels // 1_000_000} megapixels"):
        read_raster(big)
    assert read_raster(small).shape == (64, 64)
