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


def frames_of(pneumoniamnist, count: int) -> list[Image.Image]:
    return [Image.fromarray(image).resize((112, 112), Image.NEAREST) for image in pneumoniamnist["test_images"][:count]]


@pytest.mark.parametrize("name,options", [
    ("study.tif", {}),  # a multi-page TIFF
    ("study.gif", {"duration": 100, "loop": 0}),  # an animated GIF
    ("study.png", {"duration": 100, "loop": 0}),  # an animated PNG (APNG)
])
def test_a_raster_of_several_frames_is_refused_as_a_multi_frame_dicom_is(tmp_path, pneumoniamnist, name, options):
    """Only the first page or frame was scored, silently, where a multi-frame DICOM is refused with a reason:
    which of the pictures is the radiograph is not the reader's guess to make."""
    first, *others = frames_of(pneumoniamnist, 3)
    path = tmp_path / name
    first.save(path, save_all=True, append_images=others, **options)
    with Image.open(path) as check:  # the file holds the three pictures
        assert check.n_frames == 3
    with pytest.raises(UnreadableImageError, match=r"^multi-frame image \(3 frames\); one projection radiograph"):
        read_image(path)
    single = tmp_path / f"single{path.suffix}"
    first.save(single)
    np.testing.assert_array_equal(read_image(single), np.asarray(first))


def test_a_jpeg_with_a_multi_picture_preview_is_read_as_its_primary_image(tmp_path, pneumoniamnist):
    """An MPO (CIPA DC-007) JPEG, as cameras and phones write with a preview, is one picture: its first
    image is the primary one by definition, the others are derived from it."""
    primary, preview = frames_of(pneumoniamnist, 1) * 2
    path = tmp_path / "photo.jpg"
    primary.save(path, format="MPO", save_all=True, append_images=[preview.resize((56, 56))], quality=95)
    with Image.open(path) as check:
        assert check.format == "MPO" and check.n_frames == 2
    assert read_image(path).shape == (112, 112)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("offset", [0, 2 ** 15])
def test_a_signed_integer_tiff_is_refused_saying_what_it_is(tmp_path, pneumoniamnist, bits, offset):
    """Pillow opens a signed 16-bit TIFF as 32-bit ('I'): one with negative values was refused as a "32-bit
    integer image outside the 16-bit range", which misleads, and one without (0..32767, a full-range signed
    export) was read as unsigned at half brightness. A signed 8-bit one was read with its negatives wrapped
    to bright. Where a signed image's black lies is not written in it, as for a signed array."""
    image = np.asarray(Image.fromarray(pneumoniamnist["test_images"][0]).resize((64, 64))).astype(np.int32)
    top = 2 ** (bits - 1)
    values = (image * (2 * top - 1) // 255 - top if offset else image * (top - 1) // 255)  # with negatives, or 0..max
    stored = values.astype(np.int8 if bits == 8 else np.int16)
    path = tmp_path / "signed.tif"
    Image.fromarray(stored.view(np.uint8 if bits == 8 else np.uint16)).save(path, tiffinfo={TIFF_SAMPLE_FORMAT: 2})
    with Image.open(path) as check:  # the file says what the test means: signed integers of `bits` bits
        assert check.tag_v2[TIFF_SAMPLE_FORMAT] == (2,) and check.tag_v2[258] == (bits,)
    with pytest.raises(UnreadableImageError, match=rf"^signed {bits}-bit TIFF: signed pixel values are ambiguous"):
        read_image(path)


TIFF_SAMPLE_FORMAT = 339


TIFF_NEW_SUBFILE_TYPE = 254


@pytest.mark.parametrize("subfile_type", [1, 4])  # a reduced-resolution preview; a transparency mask
def test_a_tiff_with_a_preview_or_mask_page_is_read_as_its_one_picture(tmp_path, pneumoniamnist, subfile_type):
    """A TIFF whose second IFD is a reduced-resolution preview (NewSubfileType bit 0, as scanners and
    cameras write a thumbnail) or a transparency mask (bit 2) holds one picture: Pillow counts the IFD as
    a frame, and such a file was refused as "multi-frame" though its first page is the whole image."""
    first, = frames_of(pneumoniamnist, 1)
    preview = first.resize((28, 28)) if subfile_type == 1 else first.convert("1")
    path = tmp_path / "plate.tif"
    first.save(path, save_all=True, append_images=[preview], tiffinfo={TIFF_NEW_SUBFILE_TYPE: 0})
    # Pillow writes one tiffinfo for every page: mark the second IFD's NewSubfileType in place
    tifffile = pytest.importorskip("tifffile")
    with tifffile.TiffFile(path) as tiff:
        tag = tiff.pages[1].tags[TIFF_NEW_SUBFILE_TYPE]
        offset, count, width = tag.valueoffset, tag.count, tag.dtype
    assert (count, width) == (1, 4)  # LONG, held in the IFD entry itself
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(subfile_type.to_bytes(4, "little" if tiff.byteorder == "<" else "big"))
    with Image.open(path) as check:  # the file says what the test means
        assert check.n_frames == 2
        check.seek(1)
        assert check.tag_v2[TIFF_NEW_SUBFILE_TYPE] == subfile_type
    np.testing.assert_array_equal(read_image(path), np.asarray(first))
    pages = tmp_path / "pages.tif"  # two full-size pages (NewSubfileType 0 or bit 1, "page") are still refused
    first.save(pages, save_all=True, append_images=[first], tiffinfo={TIFF_NEW_SUBFILE_TYPE: 2})
    with pytest.raises(UnreadableImageError, match=r"^multi-frame image \(2 frames\)"):
        read_image(pages)


def _exif(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A little-endian EXIF block written by hand: Pillow refuses to write a tag of the wrong type."""
    import struct

    data_at, ifd, extra = 8 + 2 + 12 * len(entries) + 4, struct.pack("<H", len(entries)), b""
    for tag, kind, count, value in entries:
        if len(value) <= 4:
            ifd += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", tag, kind, count, data_at + len(extra))
            extra += value
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + extra


@pytest.mark.parametrize("mistyped", [(296, 2, 4, b"in\0\0"), (282, 5, 1, b"\1\0\0\0\0\0\0\0")],
                         ids=["ascii ResolutionUnit", "XResolution 1/0"])
def test_a_jpeg_whose_exif_pillow_cannot_rewrite_is_still_turned_upright(tmp_path, mistyped):
    """Pillow's exif_transpose re-encodes the EXIF and raised struct.error (or ZeroDivisionError) on a tag of
    the wrong type, a traceback out of predict and calibrate; viewers show the picture turned by Orientation."""
    import struct

    picture = (np.arange(48 * 64).reshape(48, 64) % 251).astype(np.uint8)
    path = tmp_path / "phone.jpg"
    Image.fromarray(picture).save(path, exif=_exif([(274, 3, 1, struct.pack("<H", 6)), mistyped]), quality=100)
    with Image.open(path) as stored:
        decoded = np.asarray(stored.convert("L"))
    np.testing.assert_array_equal(read_image(path), np.rot90(decoded, -1))


def test_a_truncated_tiff_is_refused_as_unreadable(tmp_path):
    """A two-page TIFF of 8448 bytes cut before its first page ends raised TypeError ("Missing dimensions") from
    Pillow's frame count, a traceback out of predict and calibrate; README promises UnreadableImageError."""
    import io

    picture = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    pages = [Image.fromarray(picture), Image.fromarray(255 - picture)]
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    for cut in (122, 2000, 4200):
        path = tmp_path / f"cut{cut}.tif"
        path.write_bytes(buffer.getvalue()[:cut])
        with pytest.raises(UnreadableImageError, match="not a readable image file"):
            read_image(path)


def test_an_uncompressed_16_bit_tiff_of_separate_colour_planes_is_refused(tmp_path):
    """Pillow's own decoder read its planes as 8-bit noise: 17 of 20 normal plates scored high_suspicion.
    libtiff (any compression) decodes them right, and those are read."""
    tifffile = pytest.importorskip("tifffile")  # medmnist's dependency (through scikit-image)
    picture = gradient16()
    planes = np.stack([picture] * 3)
    tifffile.imwrite(tmp_path / "raw.tif", planes, photometric="rgb", planarconfig="separate")
    with pytest.raises(UnreadableImageError, match="PlanarConfiguration 2"):
        read_image(tmp_path / "raw.tif")
    tifffile.imwrite(tmp_path / "deflate.tif", planes, photometric="rgb", planarconfig="separate", compression="zlib")
    tifffile.imwrite(tmp_path / "interleaved.tif", np.moveaxis(planes, 0, -1), photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "deflate.tif"), read_image(tmp_path / "interleaved.tif"))
