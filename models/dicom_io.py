"""DICOM pixel data -> display grayscale in [0, 1], the way a radiologist's viewer shows it.

Order follows DICOM PS3.3 C.11: stored values -> Modality LUT (rescale slope/intercept
or LUT) -> VOI LUT or window -> presentation (MONOCHROME1 is inverted so that bone
is bright, as in the training images). Padding pixels (Pixel Padding Value) are left out of
the automatic range and shown black; non-square pixels are resampled to square ones and Patient
Orientation turns the picture upright. Every refusal raises `UnreadableImageError` with
a reason that contains no patient data, because the worker stores it verbatim.
"""

from __future__ import annotations

import errno
import logging
import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from pydicom.encaps import generate_frames

from models.codestream import JPEG2000_SYNTAXES, JPEG_SYNTAXES, CodestreamError, check_frame
from models.errors import (PHOTOMETRIC_INTERPRETATIONS, ImageAccessError, UnreadableImageError, quoted_orientation,
                           quoted_term, quoted_uid)
from models.preprocess import MAX_ASPECT

log = logging.getLogger(__name__)


BLANK_SHARE = 0.99
"""A displayed image with more than this share of its pixels (padding left out) at one 8-bit grey
level is refused as blank: a constant or unexposed plate, or a window that saturates the whole
picture. Not one of the 5,856 PneumoniaMNIST images has more than 31% of its pixels at one level,
so the margin is wide; a radiograph with 1% of its area left to show carries nothing to score."""


@dataclass(frozen=True)
class PixelLimits:
    """Sizes outside these bounds are refused rather than guessed at."""

    min_side: int = 64
    max_side: int = 16384
    max_aspect: float = MAX_ASPECT
    max_pixels: int = 12000 * 12000
    """The display chain holds about 12 bytes a pixel at its peak (14 with non-square pixels): a
    16384 x 16384 plate took 3.2 GB, past the worker's 3 GiB cap, where it would be killed three
    times and then recorded as lost instead of refused with a reason. A chest plate is under 20
    megapixels (43 cm at 0.1 mm is 4300 pixels a side)."""


LAZY_DECODE_ERRORS = (pydicom.errors.BytesLengthException, NotImplementedError, struct.error)
"""What pydicom raises when it first decodes a corrupt value (a value length its VR cannot hold, an
unknown VR), which it does lazily, on first access: only the elements the display chain reads are
decoded, so a vendor's private element that pydicom's dictionary misreads does not refuse a plate."""

def read_dicom(path: str, *, stop_before_pixels: bool = False) -> Dataset:
    """Read a DICOM file, turning any parse failure into `UnreadableImageError`.

    An operating-system error (one with an errno: EACCES, EIO, ESTALE, EMFILE...) says nothing
    about the file's content, so it becomes `ImageAccessError`, which the worker retries; a path
    that is not there or not a file is the caller's (the worker checks its spool file first)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except OSError as exc:
        if exc.errno is None or isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            raise UnreadableImageError(f"not a readable DICOM file ({type(exc).__name__})") from exc
        raise ImageAccessError(f"file could not be read ({type(exc).__name__}, "
                               f"{errno.errorcode.get(exc.errno, exc.errno)})") from exc
    except (pydicom.errors.InvalidDicomError, *LAZY_DECODE_ERRORS, EOFError, ValueError, KeyError, TypeError) as exc:
        raise UnreadableImageError(f"not a readable DICOM file ({type(exc).__name__})") from exc



def check_geometry(ds: Dataset, limits: PixelLimits) -> None:
    """Refuse missing pixels, multi-frame objects and absurd dimensions before decoding."""
    if "PixelData" not in ds:
        raise UnreadableImageError("no PixelData element")
    frames = int(_number(ds, "NumberOfFrames") or 1)
    if frames != 1:
        raise UnreadableImageError(f"multi-frame object ({frames} frames); one projection radiograph expected")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if min(rows, cols) < limits.min_side or max(rows, cols) > limits.max_side:
        raise UnreadableImageError(
            f"image size {rows}x{cols} outside {limits.min_side}..{limits.max_side} pixels per side"
        )
    if max(rows, cols) / min(rows, cols) > limits.max_aspect:
        raise UnreadableImageError(f"aspect ratio of {rows}x{cols} exceeds {limits.max_aspect}")
    if rows * cols > limits.max_pixels:
        raise UnreadableImageError(f"image size {rows}x{cols} exceeds {limits.max_pixels // 1_000_000} megapixels")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples not in (1, 3):
        raise UnreadableImageError(f"unsupported SamplesPerPixel {samples}")
    check_samples_match_photometric(ds, samples)
    check_bit_layout(ds)
    check_encapsulated_frame(ds, rows, cols, samples)
    check_native_length(ds, rows, cols, samples)


def check_samples_match_photometric(ds: Dataset, samples: int) -> None:
    """A monochrome image has one sample a pixel, a colour one three: a one-sample codestream
    labelled YBR_FULL aborted the process inside GDCM, and a native one would be read askew."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    expected = 1 if photometric.startswith("MONOCHROME") else 3 if photometric in COLOUR else None
    if expected is not None and samples != expected:
        raise UnreadableImageError(f"Samples per Pixel {samples} contradicts Photometric Interpretation "
                                   f"{quoted_term(photometric, PHOTOMETRIC_INTERPRETATIONS)}")


def check_encapsulated_frame(ds: Dataset, rows: int, cols: int, samples: int) -> None:
    """Compressed pixel data: 8 or 16 bits allocated, a complete codestream that agrees with the
    dataset (`models.codestream`: decoders trust the codestream's own header, and some abort the
    process on a contradiction)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or syntax not in JPEG_SYNTAXES | JPEG2000_SYNTAXES | {pydicom.uid.RLELossless}:
        return
    allocated = int(_number(ds, "BitsAllocated") or 0)
    if allocated not in (8, 16) and syntax != pydicom.uid.RLELossless:  # GDCM aborted on 32-bit JPEG; RLE decodes it
        raise UnreadableImageError(f"Bits Allocated {allocated} with compressed pixel data; 8 or 16 expected")
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        header = check_frame(frame, syntax, rows, cols, samples)
    except CodestreamError as exc:
        raise UnreadableImageError(str(exc)) from exc
    except (ValueError, KeyError, TypeError, struct.error, StopIteration) as exc:  # items without tags, lengths past the end
        raise UnreadableImageError(f"encapsulated pixel data is malformed ({type(exc).__name__})") from exc
    if header is not None:
        check_precision(ds, header.precision, samples)


PRECISION_REACH = 0.5
"""A codestream of sample precision below Bits Stored whose values can reach less than this share of the
displayed grey range is refused (`check_precision`). Rescaled to 8, 10 or 11 bits under a 12-bit window its
values reach 6%, 25% or 49.99% of it; holding the modality's own values they reach all of any window set
for them."""


def check_precision(ds: Dataset, precision: int, samples: int) -> None:
    """Refuse a codestream whose sample precision is below Bits Stored where it would be shown wrongly.

    PS3.5 (8.2.4 for JPEG 2000) asks the two to agree, but not every encoder does, and not always wrongly:
    some write the depth the values really use (pydicom users met J2K precision 14 under Bits Stored 16),
    and those values, the modality's own, are shown as their window says. A transcoder that rescaled a
    12-bit plate to 8 bits and left Bits Stored 12 and the 12-bit window did not: the plate was shown at
    0-0.05 grey and 40 of 40 normals went URGENT. What tells the two apart is where the values the precision
    can hold land on the display (Modality LUT, then window or VOI LUT; without either the values' own range
    is shown, which is right in both cases), so only a codestream that cannot reach `PRECISION_REACH` of the
    grey range is refused. A codestream of precision above Bits Stored (DCMTK writes 16 for 12-bit data) is
    cut to Bits Stored instead (`within_bits_stored`)."""
    bits_stored = int(_number(ds, "BitsStored") or 0)
    if not 0 < precision < bits_stored:
        return
    reach = _precision_reach(ds, precision, bits_stored, samples)
    if reach < PRECISION_REACH:
        raise UnreadableImageError(f"codestream sample precision {precision} is below Bits Stored {bits_stored}, and "
                                   f"its values would fill at most {reach:.0%} of the displayed grey range (rescaled "
                                   "to fewer bits without its header being updated?)")


def _precision_reach(ds: Dataset, precision: int, bits_stored: int, samples: int) -> float:
    """The share of the display range [0, 1] that stored values of `precision` bits can reach."""
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    low, high = (-(1 << (precision - 1)), (1 << (precision - 1)) - 1) if signed else (0, (1 << precision) - 1)
    if samples != 1:  # colour is divided by 2**Bits Stored - 1, with no window (`_dicom_to_grayscale`)
        return (high - low) / float(2**bits_stored - 1)
    stored = np.unique(np.rint(np.linspace(low, high, min(high - low + 1, 65536)))).astype(np.int64)
    shown = window_to_unit(modality_values(stored, ds), ds)
    return float(shown.max() - shown.min())


def check_native_length(ds: Dataset, rows: int, cols: int, samples: int) -> None:
    """Native (uncompressed) Pixel Data must be as long as one frame of Rows x Columns x Samples at Bits
    Allocated, plus at most the one byte that pads an odd length.

    Too short, it cannot be decoded, and is refused as such (pydicom raised the same). Too long, pydicom
    keeps the first frame's worth with a warning only: a Columns of 1000 over 1024-wide data was scored as
    a sheared picture (p 0.98, URGENT), a Rows edited for a crop as part of the plate, and two frames with
    no Number of Frames decoded to a 3-D array that was refused for its "aspect ratio". Whatever the header
    got wrong, the pixels cannot be placed, so both are refused before decoding."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    allocated = int(_number(ds, "BitsAllocated") or 0)
    if syntax is None or not syntax.is_transfer_syntax or syntax.is_encapsulated or allocated <= 0:
        return  # the decoder refuses what it cannot read
    expected = (rows * cols * samples * allocated + 7) // 8
    if str(ds.get("PhotometricInterpretation", "")).upper() == "YBR_FULL_422":
        expected = expected // 3 * 2  # two chroma samples shared by each pair of pixels (PS3.3 C.7.6.3.1.2)
    length = len(ds.PixelData or b"")
    if length == expected or length == expected + 1:
        return
    shape = f"{expected} expected for {rows}x{cols} pixels of {samples} sample(s) at {allocated} bits allocated"
    if length < expected:
        raise UnreadableImageError(f"pixel data could not be decoded (native Pixel Data is {length} bytes, {shape}: "
                                   "cut short)")
    raise UnreadableImageError(f"native Pixel Data is {length} bytes, {shape}: Rows, Columns or Bits Allocated is "
                               "wrong, or frames are not counted in Number of Frames")


def check_bit_layout(ds: Dataset) -> None:
    """Refuse a High Bit other than Bits Stored - 1 (PS3.5 8.1.1 now requires it).

    pydicom keeps the low Bits Stored bits of each word; a legacy layout with the data in the high
    bits (Bits Stored 12, High Bit 15) decoded as noise and was scored as a chest."""
    high_bit, bits_stored = _number(ds, "HighBit"), _number(ds, "BitsStored")
    if high_bit is not None and bits_stored is not None and int(high_bit) != int(bits_stored) - 1:
        raise UnreadableImageError(f"High Bit {int(high_bit)} with Bits Stored {int(bits_stored)}: only High Bit = "
                                   "Bits Stored - 1 is supported")


COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"})
"""Photometric interpretations of three samples a pixel (PS3.3 C.7.6.3.1.2)."""

PRESENTATION_LUT_SHAPES = {"MONOCHROME1": "INVERSE", "MONOCHROME2": "IDENTITY"}
"""The Presentation LUT Shape (2050,0020) each Photometric Interpretation requires (DX IOD, PS3.3 C.8.11.7)."""

LutShapeConflict = Literal["refuse", "follow_photometric", "follow_shape"]
"""What to do when the Presentation LUT Shape contradicts the Photometric Interpretation: refuse the
image (the default), or follow one of the two, for a site whose modality is known to write the
other wrongly (dcm4chee offers the same switch for such CR/DX objects)."""


def inverted_for_display(ds: Dataset, photometric: str, conflict: LutShapeConflict = "refuse") -> bool:
    """Whether the windowed image is inverted to show bone bright: MONOCHROME1, unless a contradicting
    Presentation LUT Shape says otherwise and the site chose to follow it.

    A contradicting file means one of two opposite pictures and viewers disagree on which: DCMTK
    follows the shape, pydicom and most web viewers the photometric interpretation (some CR/DX
    vendors write a wrong shape). Either guess scores the negative of the other for some sites, so
    by default neither is made."""
    by_photometric = photometric == "MONOCHROME1"
    value = ds.get("PresentationLUTShape")
    if _is_empty(value):
        return by_photometric
    shape = str(_values(value)[0]).strip().upper()
    expected = PRESENTATION_LUT_SHAPES.get(photometric)
    if expected is None or shape not in PRESENTATION_LUT_SHAPES.values() or shape == expected:
        return by_photometric
    if conflict == "follow_photometric":
        return by_photometric
    if conflict == "follow_shape":
        return shape == "INVERSE"
    raise UnreadableImageError(f"Photometric Interpretation {photometric} contradicts Presentation LUT Shape "
                               f"{shape}: whether the image is inverted cannot be told (TRIAGE_PRESENTATION_LUT_CONFLICT)")


def decode_pixels(ds: Dataset) -> np.ndarray:
    """Decode stored values (any supported transfer syntax) into a numpy array.

    Decoders raise many types, and pylibjpeg-rle's Rust code raises a panic, which is a
    BaseException: it escaped every handler and left the instance `processing` with its message
    acknowledged. Only an interpreter exit and billiard's time limits (the worker records those
    itself) pass through."""
    try:
        return ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        if type(exc).__module__.split(".")[0] == "billiard":  # SoftTimeLimitExceeded: not the image's fault
            raise
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise UnreadableImageError(
            f"pixel data could not be decoded (transfer syntax {quoted_uid(syntax)}: {type(exc).__name__})"
        ) from exc


def window_to_unit(values: np.ndarray, ds: Dataset, padding: np.ndarray | None = None) -> np.ndarray:
    """Apply the VOI transform and map its output to [0, 1].

    A VOI LUT sequence or a window (first of several) is honoured; without either we use
    the full range of the modality values, which is what viewers do. Padding pixels (a mask,
    see `padding_mask`) take no part in that range.
    """
    if ds.get("VOILUTSequence"):  # an empty sequence is absent, as for pydicom and viewers
        return voi_lut_to_unit(values, ds)
    center, width = _number(ds, "WindowCenter"), _number(ds, "WindowWidth")
    if center is not None and width is not None and width > 0:
        return _window(values, center, width, str(ds.get("VOILUTFunction", "LINEAR")).upper())
    image = values if padding is None else values[~padding]
    if image.size == 0:
        raise UnreadableImageError("image is blank (every pixel is padding)")
    low, high = float(image.min()), float(image.max())
    if high <= low:
        raise UnreadableImageError("image is blank (all pixels equal)")
    return (values - np.float32(low)) / np.float32(high - low)


def voi_lut_to_unit(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The first VOI LUT of the VOI LUT Sequence (PS3.3 C.11.2.1.1), output scaled to [0, 1].

    Done here, not with pydicom's `apply_voi`: pydicom 3.0 builds its index array in the LUT's
    *output* type, so with 8-bit entries (descriptor `4096\\0\\8`, common on CR) every input of
    256 or more wraps around. Input values are clipped to [first mapped, first mapped + entries - 1]
    and looked up with an integer index; the output is divided by 2**bits - 1 (bits: the
    descriptor's third value).

    A LUT whose largest entry is below an eighth of its declared range (a descriptor claiming 16
    bits whose entries stop at 4095, as some CR vendors write) is scaled by the depth its entries
    really use, as Horos and Cornerstone do: read literally it would display almost black, which
    no viewer shows the radiologist, and refusing it would refuse every image of such a modality.
    A 16-bit PNG is refused below a quarter of its range (`preprocess.to_unit_range`), where
    nothing tells us the depth; here the LUT's own entries do, so the looser eighth suffices.

    The other way round, a LUT whose entries exceed its declared bits (descriptor `4096\\0\\8`, entries
    up to 4095) is scaled by the depth of its largest entry too, as DCMTK does: read literally, 96% of a
    normal plate was white and it scored 0.999, URGENT, while dcm2pnm showed it as the 12-bit LUT it is.
    """
    entries, first, bits, lut = _voi_lut(ds)
    depth = int(lut.max()).bit_length()
    if depth > bits or bits - 3 >= depth:
        bits = max(depth, 1)
    index = np.clip(np.rint(values.astype(np.float64)) - first, 0, entries - 1).astype(np.intp)
    return np.clip(lut[index].astype(np.float32) / np.float32(2**bits - 1), 0.0, 1.0)


def _voi_lut(ds: Dataset) -> tuple[int, int, int, np.ndarray]:
    """(entries, first mapped input, bits per entry, LUT data) of the first VOI LUT, checked."""
    return _first_lut(ds, "VOILUTSequence", "VOI LUT")


def _first_lut(ds: Dataset, sequence: str, name: str) -> tuple[int, int, int, np.ndarray]:
    """(entries, first mapped input, bits per entry, LUT data) of a LUT sequence's first item, checked.

    Read here for both the Modality and the VOI LUT: LUT Data with 8-bit entries is packed two to
    a 16-bit word when sent as OW (PS3.3 C.11.1.1.1, C.11.2.1.1), which pydicom reads as if each
    entry had a word of its own (its `apply_modality_lut` fails on such a LUT)."""
    try:
        item = ds[sequence][0]
        descriptor = item.LUTDescriptor
        if isinstance(descriptor, bytes):  # ambiguous VR left unresolved: US, little endian
            descriptor = np.frombuffer(descriptor, "<u2").tolist()
        entries, first, bits = (int(v) for v in descriptor)
        data_element = item["LUTData"]
    except Exception as exc:  # absent items or elements, wrong multiplicity; values are not repeated
        raise UnreadableImageError(f"{name} could not be read ({type(exc).__name__})") from exc
    entries = entries or 65536  # PS3.3 C.11.2.1.1: 0 means 2**16 entries
    if int(ds.get("PixelRepresentation", 0) or 0) == 1 and first >= 32768:
        first -= 65536  # first mapped of signed input, stored as US
    if not 8 <= bits <= 16:
        raise UnreadableImageError(f"{name} with {bits} bits per entry (8 to 16 expected)")
    raw = data_element.value
    if isinstance(raw, (bytes, bytearray)):  # OW
        little = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        big_endian = little is not None and getattr(little, "is_little_endian", True) is False
        if len(raw) == 2 * entries:
            lut = np.frombuffer(raw, ">u2" if big_endian else "<u2")
        elif bits == 8 and len(raw) in (entries, entries + 1):  # 8-bit entries packed two to a word
            lut = np.frombuffer(raw[:entries], np.uint8)
        else:
            lut = np.zeros(0, np.uint16)
    else:
        lut = np.atleast_1d(np.asarray(raw, dtype=np.int64))
    if lut.size != entries or (lut.size and lut.min() < 0):
        raise UnreadableImageError(f"{name} Data does not match its descriptor ({lut.size} entries, "
                                   f"{entries} declared)")
    return entries, first, bits, lut.astype(np.int64)


def _number(ds: Dataset, keyword: str) -> float | None:
    """A numeric element's (first) value, or None when it is absent or sent empty.

    Window, rescale and frame-count elements are optional (type 3 or 1C) and some modalities
    send them empty; viewers then behave as if they were absent, and so do we. Text that is not
    a number is refused without being repeated: it could be anything, a patient's name included.
    """
    if keyword not in ds:
        return None
    try:
        value = ds[keyword].value
        if isinstance(value, pydicom.multival.MultiValue):
            value = value[0] if len(value) else None
        if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
            return None
        number = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UnreadableImageError(f"invalid {keyword}") from exc
    if not np.isfinite(number):
        raise UnreadableImageError(f"invalid {keyword}")
    return number


def padding_mask(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Stored pixels that are padding, not image (PS3.3 C.7.5.1.1.2), or None when there are none.

    Pixel Padding Value (0028,0120) marks them; with Pixel Padding Range Limit (0028,0121)
    every stored value between the two, inclusive, does. Both are stored values, compared
    before the modality LUT. A value written as US for signed pixels (or as SS for unsigned
    ones) is read in the pixels' own representation. A value outside Bits Stored (0xFFFF around
    unsigned 12-bit pixels, -32768 around signed ones, as some writers fill whole words) is looked for
    in the words as written, since the decoder cuts every pixel to Bits Stored: 0xFFFF padding would
    then be 4095, a real white pixel too (a lead marker, metal), and -32768 would be 0, a mid-grey one.
    Compressed data has no such words: where the codec cut every value to Bits Stored (RLE, JPEG
    lossless) the padding is looked for as cut, so a real top-value pixel is painted black with it; left in, the padding would stretch the
    displayed range and dim the picture, which moved a normal plate to high suspicion.
    """
    value = _number(ds, "PixelPaddingValue")
    if value is None:
        return None
    limit = _number(ds, "PixelPaddingRangeLimit")
    bits = int(ds.get("BitsAllocated", 16) or 16)
    bits_stored = int(ds.get("BitsStored", bits) or bits)
    signed = stored.dtype.kind == "i"
    stored_min = -(2 ** (bits_stored - 1)) if signed else 0  # the values Bits Stored holds
    stored_max = 2 ** (bits_stored - 1) - 1 if signed else 2**bits_stored - 1
    bounds = []
    for number in (value, value if limit is None else limit):
        number = int(number)
        if stored.dtype.kind == "i" and number >= 2 ** (bits - 1):
            number -= 2**bits
        elif stored.dtype.kind == "u" and number < 0:
            number += 2**bits
        bounds.append(number)
    low, high = min(bounds), max(bounds)
    searched = stored
    if low < stored_min or high > stored_max:
        written = _words_as_written(ds, stored.shape, signed)
        if written is not None:
            searched = written
        elif stored_min <= int(stored.min()) and int(stored.max()) <= stored_max:
            # a codec (RLE, JPEG lossless) cut every value, the padding's too
            low, high = _cut_to_bits(low, bits_stored, signed), _cut_to_bits(high, bits_stored, signed)
            if low != high:  # a range cut apart maps onto no range of cut values
                return None
        # else the decoder kept whole words (JPEG-LS gives 0xFFFF back): the values are searched as they are
    mask = (searched >= low) & (searched <= high)
    return mask if mask.any() else None


def _cut_to_bits(value: int, bits: int, signed: bool) -> int:
    """`value` as a decoder gives it back cut to `bits` bits (and sign-extended from the top one if signed)."""
    cut = value & ((1 << bits) - 1)
    return cut - (1 << bits) if signed and cut >= 1 << (bits - 1) else cut


def within_bits_stored(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Each pixel cut to its Bits Stored bits, and sign-extended from the top one when Pixel Representation is
    signed, as pydicom already does for native data and as PS3.5 8.1.1 asks of a receiver (the bits above
    Bits Stored are not image: an overlay in bit 12, a writer's leftovers). Why here too: a JPEG-LS or
    JPEG 2000 codestream of precision 16 (DCMTK's `dcmcjpls` in its default raw mode) keeps those bits,
    and the decoders give them back; the same plate with an overlay in bit 12 scored 0.0015 sent native
    and 0.235, URGENT, sent as JPEG-LS. Likewise, signed 12-bit pixels came back from JPEG-LS without
    their sign (8 to 4087 for -2048 to 1662)."""
    if stored.dtype.kind not in "iu":
        return stored
    bits = int(ds.get("BitsStored", 0) or 0)
    if not 0 < bits < 8 * stored.dtype.itemsize:
        return stored
    top = 1 << (bits - 1)
    if stored.dtype.kind == "u":
        return stored if int(stored.max()) < 2 * top else stored & np.array(2 * top - 1, dtype=stored.dtype)
    if -top <= int(stored.min()) and int(stored.max()) < top:
        return stored
    cut = stored.astype(np.int64) & (2 * top - 1)
    return ((cut ^ top) - top).astype(stored.dtype)


def _words_as_written(ds: Dataset, shape: tuple[int, ...], signed: bool = False) -> np.ndarray | None:
    """The 16-bit words (signed ones for signed pixels) of native, single-frame, single-sample Pixel Data
    before the decoder cuts them to Bits Stored, or None for anything else."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or syntax.is_compressed or int(ds.get("BitsAllocated", 0) or 0) != 16 or len(shape) != 2:
        return None
    data = ds.get("PixelData")
    count = shape[0] * shape[1]
    if data is None or len(data) < 2 * count:
        return None
    kind = "i2" if signed else "u2"
    return np.frombuffer(data, dtype=("<" if syntax.is_little_endian else ">") + kind, count=count).reshape(shape)


def modality_values(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> modality values (PS3.3 C.11.1) as float32.

    Rescale is applied as pydicom's `apply_modality_lut` does (only with both slope and
    intercept present), but an empty slope or intercept counts as absent instead of failing.
    A Modality LUT Sequence is looked up here (stored values below its first mapped value take the
    first entry, above its last the last one, as pydicom does), because pydicom cannot read one
    whose 8-bit entries are packed two to a word (`_first_lut`).
    """
    if ds.get("ModalityLUTSequence"):  # an empty sequence is absent, as for pydicom and viewers
        entries, first, _, lut = _first_lut(ds, "ModalityLUTSequence", "Modality LUT")
        index = np.clip(stored.astype(np.int32) - first, 0, entries - 1)  # int32 holds any 16-bit value and offset
        return lut[index].astype(np.float32)
    slope, intercept = _number(ds, "RescaleSlope"), _number(ds, "RescaleIntercept")
    if slope is None or intercept is None or (slope == 1.0 and intercept == 0.0):
        return stored.astype(np.float32)  # exact for <=24-bit values, and half the cost of float64 downstream
    with np.errstate(over="ignore", invalid="ignore"):
        values = (stored.astype(np.float64) * slope + intercept).astype(np.float32)
    if not np.isfinite(values).all():  # a slope of 1e39 read as "blank", one of 1e308 as an internal error
        raise UnreadableImageError("Rescale Slope and Intercept give values beyond single precision")
    return values


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window functions, output scaled to [0, 1].

    Computed in place in `values` (float32, the caller's own copy from `modality_values`): on an
    8192 x 8192 plate each temporary is 256 MiB, and they were the worker's peak memory
    (benchmarks/worker_memory.py). The operations and their order are those of the formulas, so
    the result is the same to the bit."""
    c, w = np.float32(center), np.float32(width)
    if function == "SIGMOID":  # 1 / (1 + exp(-4 (x - c) / w))
        values -= c
        values *= np.float32(-4.0)
        values /= w
        np.exp(values, out=values)
        values += np.float32(1.0)
        return np.divide(np.float32(1.0), values, out=values)
    if function == "LINEAR_EXACT":  # clip((x - (c - w/2)) / w)
        values -= c - w / 2
        values /= w
        return np.clip(values, 0.0, 1.0, out=values)
    if w <= 1:  # the standard's limit case: x <= c - 0.5 is the minimum, anything above the maximum
        return (values > c - np.float32(0.5)).astype(np.float32)
    values -= c - np.float32(0.5)  # clip((x - (c - 0.5)) / (w - 1) + 0.5)
    values /= w - np.float32(1.0)
    values += np.float32(0.5)
    return np.clip(values, 0.0, 1.0, out=values)


SQUARE_TOLERANCE = 0.01
"""Pixels whose height and width differ by at most this fraction count as square and are left
untouched (bit for bit): the train/serve contract does not move for them."""


def pixel_aspect(ds: Dataset) -> float | None:
    """Height / width of a pixel, or None when nothing usable says (square is then assumed).

    From Pixel Spacing (0028,0030: row spacing, i.e. vertical, then column spacing), else Imager
    Pixel Spacing (0018,1164, same order), else Pixel Aspect Ratio (0028,0034: vertical\\horizontal).
    All three are optional for CR and serve here only to find non-square pixels, so an empty or
    unusable one (not two positive numbers: `0\\0`, comma decimals, one value) is passed over
    for the next, and with none usable the pixels are taken as square, as before they were read.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "PixelAspectRatio"):
        numbers = _positive_pair(ds, keyword)
        if numbers is not None:
            return numbers[0] / numbers[1]
        if keyword in ds and not _is_empty(ds[keyword].value):
            log.warning("unusable %s passed over (pixel shape taken from the next attribute or as square)", keyword)
    return None


def _positive_pair(ds: Dataset, keyword: str) -> tuple[float, float] | None:
    """The element's two values when both are finite positive numbers, else None."""
    if keyword not in ds:
        return None
    try:
        value = ds[keyword].value
        numbers = [float(v) for v in _values(value)]
    except (TypeError, ValueError, OverflowError):
        return None
    if len(numbers) != 2 or not all(np.isfinite(n) and n > 0 for n in numbers):
        return None
    return numbers[0], numbers[1]


def _values(value: object) -> list:
    """An element's value as a list: a multi-valued one's values, else the one value."""
    return list(value) if isinstance(value, (pydicom.multival.MultiValue, list, tuple)) else [value]


def _is_empty(value: object) -> bool:
    values = _values(value)
    return not values or all(v is None or (isinstance(v, (str, bytes)) and not v.strip()) for v in values)


def square_pixels(image: np.ndarray, aspect: float | None) -> np.ndarray:
    """Resample a display image with non-square pixels (height/width `aspect`) to square ones.

    The denser axis is area-averaged down to the other's spacing (no detail is invented, and the
    contract area-shrinks to 28x28 next anyway), so the centre crop that follows is a square of
    the patient, not of the detector's pixel grid. Within SQUARE_TOLERANCE the image is returned
    as it is.
    """
    if aspect is None or abs(aspect - 1.0) <= SQUARE_TOLERANCE:
        return image
    rows, cols = image.shape
    if aspect > 1:  # pixels taller than wide: the columns are denser
        return area_resample(image, max(1, round(cols / aspect)), axis=1)
    return area_resample(image, max(1, round(rows * aspect)), axis=0)


def area_resample(image: np.ndarray, size: int, axis: int, strip: int = 256) -> np.ndarray:
    """Area-average a 2-D `image` to `size` samples along `axis`: the weights of `preprocess.area_weights`,
    computed from the running sum in O(pixels) instead of a dense matrix product.

    The running sums are float64 (their differences must keep 8-bit detail at 16k pixels) and so
    are made `strip` lines at a time: over the whole plate they took about 40 bytes a pixel, 2.9 GiB
    for an 8192-square plate with 0.1 x 0.2 mm pixels, next to the worker's 3 GiB cap. Each line is
    resampled on its own, so the result does not depend on `strip`."""
    moved = np.moveaxis(image, axis, 0)
    src = moved.shape[0]
    edges = np.arange(size + 1) * (src / size)
    whole = np.minimum(np.floor(edges).astype(np.intp), src - 1)
    frac = (edges - whole)[:, None]
    resampled = np.empty((size, moved.shape[1]), dtype=image.dtype)
    for start in range(0, moved.shape[1], strip):
        lines = moved[:, start:start + strip].astype(np.float64)
        running = np.concatenate([np.zeros((1, lines.shape[1])), np.cumsum(lines, axis=0)])
        integral = running[whole] + frac * lines[whole]  # sum of the source up to each edge
        resampled[:, start:start + strip] = np.diff(integral, axis=0) / (src / size)
    return np.moveaxis(resampled, 0, axis)


ROW_DIRECTIONS, COLUMN_DIRECTIONS = ("L", "R"), ("F", "H")
"""Patient Orientation letters of a frontal chest: left/right across, feet/head down (PS3.3 C.7.6.1.1.1)."""


@dataclass(frozen=True)
class Orientation:
    """How to bring a stored frontal chest into the standard display: rows toward the patient's
    left, columns toward the feet (Patient Orientation L\\F, a PA chest as radiologists read it)."""

    transpose: bool = False
    flip_rows: bool = False  # upside down: top to bottom
    flip_columns: bool = False  # mirrored: left to right

    def apply(self, image: np.ndarray) -> np.ndarray:
        if self.transpose:
            image = image.T
        if self.flip_rows:
            image = image[::-1]
        if self.flip_columns:
            image = image[:, ::-1]
        return np.ascontiguousarray(image)


def display_orientation(ds: Dataset) -> Orientation:
    """The transform from Patient Orientation (0020,0020), identity when it or one of its values is empty.

    Its two values name the patient direction of the rows (increasing column index) and of the
    columns (increasing row index); the first letter of each is the principal one. A frontal
    chest has one value among L/R and the other among F/H: it is turned by a multiple of 90
    degrees (and mirrored to L\\F: the model was trained with horizontal flips, so that part is
    harmless). Anything else (a lateral's A/P, two left-right values, one value) is refused:
    scored as stored it would be read sideways or upside down.
    """
    value = ds.get("PatientOrientation")
    if value is None:
        return Orientation()
    values = [str(v).strip().upper() for v in _values(value)]
    shown = "\\".join(quoted_orientation(v) for v in values)
    if all(values) and len(values) != 2:
        raise UnreadableImageError(f"patient orientation {shown} has {len(values)} value{'s' * (len(values) != 1)}, 2 expected")
    if any(v[:1] in ("A", "P") for v in values):  # rows or columns front to back: a lateral, even beside an empty value
        raise UnreadableImageError(f"patient orientation {shown} is not a frontal chest orientation")
    if not all(values):  # Type 2C: an empty value (`L\`) says nothing of the orientation
        return Orientation()
    across, down = (v[:1] for v in values)
    transpose = across in COLUMN_DIRECTIONS and down in ROW_DIRECTIONS
    if transpose:
        across, down = down, across
    if not (across in ROW_DIRECTIONS and down in COLUMN_DIRECTIONS):
        raise UnreadableImageError(f"patient orientation {shown} is not a frontal chest orientation")
    return Orientation(transpose=transpose, flip_rows=down == "H", flip_columns=across == "R")


def check_not_blank(display: np.ndarray, padding: np.ndarray | None = None) -> None:
    """Refuse a displayed image (in [0, 1]) that is constant or almost entirely one grey level.

    Checked after the window or VOI LUT, so a blank plate is refused whether or not its file
    carries a window (with one, a constant image showed mid-grey and was scored). The share is
    counted on a grid of at most about 512 x 512 pixels: a full 3000 x 3000 plate took 30 ms,
    a third of the worker's time per instance, for a share that the grid measures as well.
    """
    step = max(1, max(display.shape[:2]) // 512)
    display = display[::step, ::step]
    padding = None if padding is None else padding[::step, ::step]
    shown = display if padding is None else display[~padding]
    if shown.size == 0:
        raise UnreadableImageError("image is blank (every pixel is padding)")
    levels = np.bincount(np.rint(shown.ravel() * np.float32(255)).astype(np.intp), minlength=256)
    level = int(levels.argmax())
    share = levels[level] / shown.size
    if share > BLANK_SHARE:
        what = "black" if level == 0 else "white" if level == 255 else f"grey level {level}/255"
        shown_share = np.floor(share * 1000) / 10  # rounded down: 100.0% means every pixel
        raise UnreadableImageError(f"image is blank as displayed ({shown_share:.1f}% of pixels {what})")


END_QUARTER = 0.25
"""A displayed image whose every pixel (padding left out) lies in the darkest or the brightest quarter of
the grey range is refused: its window or VOI LUT is for other (deeper) pixels than it holds."""


def check_not_in_an_end_quarter(display: np.ndarray, padding: np.ndarray | None = None) -> None:
    """Refuse a displayed image (in [0, 1]) held wholly in the darkest or brightest quarter of the grey range.

    A 10-bit detector's pixels in a JPEG-LS or JPEG lossless codestream of precision 16 under a 12-bit
    header and window cannot be told from 12-bit pixels by the header (`check_precision` sees only a
    codestream of lower precision): shown in the darkest quarter (the brightest as MONOCHROME1), 40 of 40
    normal plates scored URGENT. Every PneumoniaMNIST image reaches above half of the range (its brightest
    pixel at 0.51 at least) and below three quarters (its darkest at 0.725 at most). The whole image is
    tested, not a percentile: a low-contrast picture or an undeclared black background is not refused, and
    one pixel outside the quarter lets an image through. Pixels one bit short of their header (11-bit under
    a 12-bit window) fill half the range and are scored, except a picture that even so stays in one quarter."""
    shown = None if padding is None else ~padding
    if shown is not None and not shown.any():
        return
    darkest = float(display.min() if shown is None else np.min(display, where=shown, initial=1.0))
    brightest = float(display.max() if shown is None else np.max(display, where=shown, initial=0.0))
    advice = "the window, VOI LUT or Bits Stored may be for other pixels than these (10-bit ones under a 12-bit header?)"
    if brightest <= END_QUARTER:
        raise UnreadableImageError(f"image nearly black as displayed (every pixel in the darkest quarter of the "
                                   f"grey range): {advice}")
    if darkest >= 1.0 - END_QUARTER:
        raise UnreadableImageError(f"image nearly white as displayed (every pixel in the brightest quarter of the "
                                   f"grey range): {advice}")


def dicom_to_grayscale(ds: Dataset, limits: PixelLimits = PixelLimits(),
                       lut_shape_conflict: LutShapeConflict = "refuse") -> np.ndarray:
    """One projection radiograph -> float32 2-D display image in [0, 1]; a corrupt element it reads is
    refused as `UnreadableImageError`, not raised as whatever pydicom's lazy decoding raised."""
    try:
        return _dicom_to_grayscale(ds, limits, lut_shape_conflict)
    except LAZY_DECODE_ERRORS as exc:
        raise UnreadableImageError(f"a DICOM element could not be read ({type(exc).__name__})") from exc


def _dicom_to_grayscale(ds: Dataset, limits: PixelLimits, lut_shape_conflict: LutShapeConflict) -> np.ndarray:
    check_geometry(ds, limits)
    orientation = display_orientation(ds)
    aspect = pixel_aspect(ds)
    stored = decode_pixels(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    padding = None
    if stored.ndim == 3:  # colour (pydicom already converted YBR to RGB)
        rgb = stored.astype(np.float64)
        bits = int(ds.get("BitsStored", 8) or 8)
        luma = (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114) / float(2**bits - 1)
        display = np.clip(luma, 0.0, 1.0).astype(np.float32)
    elif photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnreadableImageError(f"unsupported PhotometricInterpretation {quoted_term(photometric, PHOTOMETRIC_INTERPRETATIONS)}")
    else:
        invert = inverted_for_display(ds, photometric, lut_shape_conflict)
        padding = padding_mask(stored, ds)  # before the cut: padding may be written in whole words
        values = modality_values(within_bits_stored(stored, ds), ds)
        display = window_to_unit(values, ds, padding)
        if invert:
            display = 1.0 - display
        if padding is not None:
            display[padding] = 0.0  # padding is not image: black, as viewers paint it
        display = display.astype(np.float32)
    check_not_blank(display, padding)
    if stored.ndim == 2:
        check_not_in_an_end_quarter(display, padding)
    shown = orientation.apply(square_pixels(display, aspect))  # the spacing is the stored grid's
    rows, cols = shown.shape
    if max(rows, cols) / min(rows, cols) > limits.max_aspect:  # square pixels can lengthen the picture
        raise UnreadableImageError(f"aspect ratio of {rows}x{cols} (square pixels) exceeds {limits.max_aspect}")
    return shown
