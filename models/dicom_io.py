"""DICOM pixel data -> display grayscale in [0, 1], the way a radiologist's viewer shows it.

Order follows DICOM PS3.3 C.11: stored values -> Modality LUT (rescale slope/intercept
or LUT) -> VOI LUT or window -> presentation (MONOCHROME1 is inverted so that bone
is bright, as in the training images). Every refusal raises `UnreadableImageError` with
a reason that contains no patient data, because the worker stores it verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi

from models.errors import UnreadableImageError, quoted_code, quoted_uid
from models.preprocess import MAX_ASPECT


@dataclass(frozen=True)
class PixelLimits:
    """Sizes outside these bounds are refused rather than guessed at."""

    min_side: int = 64
    max_side: int = 16384
    max_aspect: float = MAX_ASPECT


def read_dicom(path: str, *, stop_before_pixels: bool = False) -> Dataset:
    """Read a DICOM file, turning any parse failure into `UnreadableImageError`."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except (pydicom.errors.InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
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
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples not in (1, 3):
        raise UnreadableImageError(f"unsupported SamplesPerPixel {samples}")


def decode_pixels(ds: Dataset) -> np.ndarray:
    """Decode stored values (any supported transfer syntax) into a numpy array."""
    try:
        return ds.pixel_array
    except Exception as exc:  # decoders raise many types; the reason is what matters
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise UnreadableImageError(
            f"pixel data could not be decoded (transfer syntax {quoted_uid(syntax)}: {type(exc).__name__})"
        ) from exc


def window_to_unit(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the VOI transform and map its output to [0, 1].

    A VOI LUT sequence or a window (first of several) is honoured; without either we use
    the full range of the modality values, which is what viewers do.
    """
    if "VOILUTSequence" in ds:
        try:
            out_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2]) or 16
            voi = apply_voi(values, ds, index=0).astype(np.float64)
        except Exception as exc:  # a malformed LUT raises many types; its values are not repeated
            raise UnreadableImageError(f"VOI LUT could not be applied ({type(exc).__name__})") from exc
        return np.clip(voi / float(2**out_bits - 1), 0.0, 1.0)
    center, width = _number(ds, "WindowCenter"), _number(ds, "WindowWidth")
    if center is not None and width is not None and width > 0:
        return _window(values, center, width, str(ds.get("VOILUTFunction", "LINEAR")).upper())
    low, high = float(values.min()), float(values.max())
    if high <= low:
        raise UnreadableImageError("image is blank (all pixels equal)")
    return (values - np.float32(low)) / np.float32(high - low)


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


def modality_values(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> modality values (PS3.3 C.11.1) as float32.

    Rescale is applied as pydicom's `apply_modality_lut` does (only with both slope and
    intercept present), but an empty slope or intercept counts as absent instead of failing.
    """
    if "ModalityLUTSequence" in ds:
        try:
            return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
        except Exception as exc:  # a malformed LUT raises many types; its values are not repeated
            raise UnreadableImageError(f"Modality LUT could not be applied ({type(exc).__name__})") from exc
    slope, intercept = _number(ds, "RescaleSlope"), _number(ds, "RescaleIntercept")
    if slope is None or intercept is None or (slope == 1.0 and intercept == 0.0):
        return stored.astype(np.float32)  # exact for <=24-bit values, and half the cost of float64 downstream
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window functions, output scaled to [0, 1]."""
    c, w = np.float32(center), np.float32(width)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.float32(-4.0) * (values - c) / w))
    if function == "LINEAR_EXACT":
        return np.clip((values - (c - w / 2)) / w, 0.0, 1.0)
    if w <= 1:  # the standard's limit case: x <= c - 0.5 is the minimum, anything above the maximum
        return (values > c - np.float32(0.5)).astype(np.float32)
    return np.clip(((values - (c - np.float32(0.5))) / (w - np.float32(1.0))) + np.float32(0.5), 0.0, 1.0)


def dicom_to_grayscale(ds: Dataset, limits: PixelLimits = PixelLimits()) -> np.ndarray:
    """One projection radiograph -> float32 2-D display image in [0, 1]."""
    check_geometry(ds, limits)
    stored = decode_pixels(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if stored.ndim == 3:  # colour (pydicom already converted YBR to RGB)
        rgb = stored.astype(np.float64)
        bits = int(ds.get("BitsStored", 8) or 8)
        luma = (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114) / float(2**bits - 1)
        return np.clip(luma, 0.0, 1.0).astype(np.float32)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnreadableImageError(f"unsupported PhotometricInterpretation {quoted_code(photometric)}")
    values = modality_values(stored, ds)
    display = window_to_unit(values, ds)
    if photometric == "MONOCHROME1":
        display = 1.0 - display
    return display.astype(np.float32)
