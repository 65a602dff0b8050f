"""Read a chest X-ray from a path (DICOM, PNG 8/16-bit, JPEG) into a grayscale array.

DICOM is recognised by its content (the DICM magic), not by the file extension,
because PACS exports rarely carry one.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.dicom_io import LutShapeConflict, PixelLimits, dicom_to_grayscale, read_dicom
from models.errors import UnreadableImageError

TIFF_PHOTOMETRIC = 262
TIFF_WHITE_IS_ZERO = 0
TIFF_BITS_PER_SAMPLE = 258
TIFF_SAMPLE_FORMAT = 339
TIFF_SIGNED_INTEGER = 2
TIFF_NEW_SUBFILE_TYPE = 254
TIFF_OLD_SUBFILE_TYPE = 255
TIFF_COMPRESSION = 259
TIFF_UNCOMPRESSED = 1
TIFF_PLANAR_CONFIGURATION = 284
TIFF_SEPARATE_PLANES = 2
EXIF_ORIENTATION = 274
ORIENTATION_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                         6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
"""EXIF Orientation -> the turn that shows the picture upright (Pillow's `ImageOps.exif_transpose` table)."""


def is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            header = handle.read(132)
    except OSError as exc:  # unreadable (permissions, I/O error): a reason, not an OSError quoting the path
        raise UnreadableImageError(f"file could not be read ({type(exc).__name__})") from exc
    return len(header) == 132 and header[128:132] == b"DICM"


def read_raster(path: Path) -> np.ndarray:
    """PNG/JPEG/TIFF -> uint8 or uint16 grayscale array, keeping 16-bit depth."""
    try:
        with Image.open(path) as stored:
            check_raster_size(stored.size)
            check_one_picture(stored)
            check_unsigned(stored)
            check_decodable_planes(stored)
            stored.load()
            image = upright(stored)  # the picture as viewers show it (phone photos of films)
            if image.mode in ("I;16", "I;16B", "I;16L"):
                values = np.asarray(image, dtype=np.uint16)
                if getattr(stored, "tag_v2", {}).get(TIFF_PHOTOMETRIC) == TIFF_WHITE_IS_ZERO:  # the file's tags, not the copy's
                    return white_is_zero_16(values)
                return values
            if image.mode == "I":
                values = np.asarray(image)
                if values.min() < 0 or values.max() > 65535:
                    raise UnreadableImageError("32-bit integer image outside the 16-bit range")
                return values.astype(np.uint16)
            if image.mode in ("F",):
                raise UnreadableImageError("floating-point rasters are not supported; export 8 or 16 bit")
            return np.asarray(image.convert("L"), dtype=np.uint8)
    except UnreadableImageError:  # our own reason (a float raster, say), not to be reworded
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, TypeError,
            struct.error) as exc:  # a TIFF cut short raised TypeError ("Missing dimensions") from n_frames
        raise UnreadableImageError(f"not a readable image file ({type(exc).__name__})") from exc


def upright(stored: Image.Image) -> Image.Image:
    """The picture turned as its EXIF Orientation says. Pillow's `exif_transpose` also rewrites the EXIF of its
    copy, and a tag of the wrong type that viewers ignore (an ASCII ResolutionUnit) made that raise struct.error
    (Pillow issues #8965, #4238, #8605 name others): the picture is then turned from the Orientation alone."""
    try:
        return ImageOps.exif_transpose(stored)
    except (struct.error, TypeError, ValueError, ZeroDivisionError, KeyError):
        method = ORIENTATION_TRANSPOSE.get(stored.getexif().get(EXIF_ORIENTATION))
        return stored.transpose(method) if method is not None else stored.copy()


def check_decodable_planes(stored: Image.Image) -> None:
    """Refuse an uncompressed TIFF of more than 8 bits a sample whose samples are stored as separate planes:
    Pillow's own decoder (used for uncompressed TIFF only; libtiff decodes the rest) read them as 8-bit
    noise: 17 of 20 normal plates went from likely_normal as arrays to high_suspicion, URGENT."""
    tags = getattr(stored, "tag_v2", None)
    if not tags or tags.get(TIFF_PLANAR_CONFIGURATION) != TIFF_SEPARATE_PLANES:
        return
    bits = tags.get(TIFF_BITS_PER_SAMPLE, 1)
    bits = bits if isinstance(bits, tuple) else (bits,)
    if max(bits) > 8 and tags.get(TIFF_COMPRESSION, TIFF_UNCOMPRESSED) == TIFF_UNCOMPRESSED:
        raise UnreadableImageError(f"uncompressed {max(bits)}-bit TIFF with its samples in separate planes "
                                   "(PlanarConfiguration 2) cannot be decoded here; export it interleaved, compressed "
                                   "or grayscale")


def check_raster_size(size: tuple[int, int]) -> None:
    """Refuse a raster over the DICOM reader's pixel bound before decoding it. Why: Pillow's own bomb limit
    is 179 megapixels and only warns above 89, so a 169-megapixel RGB PNG was decoded and scored at a 2.4 GiB
    peak, where the same image as DICOM is refused above 144 megapixels (`PixelLimits.max_pixels`)."""
    width, height = size
    limit = PixelLimits().max_pixels
    if width * height > limit:
        raise UnreadableImageError(f"image size {height}x{width} exceeds {limit // 1_000_000} megapixels")


def check_one_picture(stored: Image.Image) -> None:
    """Refuse a multi-page TIFF or an animated GIF/PNG, as a multi-frame DICOM is: only the first frame was
    read, silently, and which picture is the radiograph is not the reader's to guess. An MPO JPEG (a camera's
    or phone's picture with previews, CIPA DC-007) is one picture: its first image is the primary one."""
    frames = getattr(stored, "n_frames", 1)
    if frames > 1 and stored.format != "MPO" and not (stored.format == "TIFF" and tiff_pictures(stored) == [0]):
        raise UnreadableImageError(f"multi-frame image ({frames} frames); one projection radiograph expected")


def tiff_pictures(stored: Image.Image) -> list[int]:
    """The IFDs of a TIFF that are whole pictures: not a reduced-resolution preview (NewSubfileType bit 0, old
    SubfileType 2) nor a transparency mask (bit 2), which Pillow counts as frames too. A scanner's or camera's
    thumbnail IFD made a one-picture TIFF read as "multi-frame". Leaves the file at its first IFD."""
    pictures = []
    try:
        for index in range(stored.n_frames):  # type: ignore[attr-defined]
            stored.seek(index)
            tags = stored.tag_v2  # type: ignore[attr-defined]
            if not int(tags.get(TIFF_NEW_SUBFILE_TYPE, 0)) & 0b101 and tags.get(TIFF_OLD_SUBFILE_TYPE) != 2:
                pictures.append(index)
    finally:
        stored.seek(0)
    return pictures


def check_unsigned(stored: Image.Image) -> None:
    """Refuse a signed 8- or 16-bit TIFF with its own reason. Pillow opens a signed 16-bit one as 32-bit ('I'):
    with negative values it was refused as a "32-bit integer image outside the 16-bit range", without them
    (0..32767) read as unsigned at half brightness; a signed 8-bit one was read with its negatives wrapped to
    bright. Where a signed image's black lies is not written in it (as for a signed array, `to_unit_range`)."""
    tags = getattr(stored, "tag_v2", None)
    if not tags:
        return
    formats, bits = (tags.get(tag, 1) for tag in (TIFF_SAMPLE_FORMAT, TIFF_BITS_PER_SAMPLE))
    formats, bits = (value if isinstance(value, tuple) else (value,) for value in (formats, bits))
    if TIFF_SIGNED_INTEGER in formats and max(bits) <= 16:
        raise UnreadableImageError(f"signed {max(bits)}-bit TIFF: signed pixel values are ambiguous (the file does "
                                   "not say where black lies); export it unsigned (8 or 16 bit) or send the DICOM")


def white_is_zero_16(values: np.ndarray) -> np.ndarray:
    """A 16-bit WhiteIsZero raster as display values (Pillow inverts WhiteIsZero up to 8 bits only).

    Inverted against the full 16-bit range, which is right only for full-range data: 12- or 14-bit
    values stored unscaled would turn into a nearly white picture that passes `to_unit_range`'s
    low-bits check (normal plates scored high suspicion), so such a file is refused, as it was
    before the inversion; nothing in it says where its white is."""
    used = int(values.max()).bit_length()
    if used <= 14:
        raise UnreadableImageError(f"16-bit WhiteIsZero image uses only its low {used} bits: its white level is "
                                   "unknown; export it full-range or BlackIsZero")
    return np.uint16(65535) - values


def read_image(path: str | Path, lut_shape_conflict: LutShapeConflict = "refuse") -> np.ndarray:
    """Any supported file -> 2-D grayscale (uint8, uint16, or float32 in [0, 1] for DICOM). A DICOM whose
    Presentation LUT Shape contradicts its Photometric Interpretation is handled as `lut_shape_conflict`
    says (`dicom_io.dicom_to_grayscale`; the worker's TRIAGE_PRESENTATION_LUT_CONFLICT)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    if is_dicom(path):
        return dicom_to_grayscale(read_dicom(str(path)), lut_shape_conflict=lut_shape_conflict)
    try:
        return read_raster(path)
    except UnreadableImageError as exc:
        if isinstance(exc.__cause__, UnidentifiedImageError):  # neither format: say what DICOM must look like
            raise UnreadableImageError(f"{exc}: not an image Pillow reads, nor a DICOM Part 10 file (no 'DICM' "
                                       "prefix at byte 128; export with the file meta header)") from exc.__cause__
        raise
