"""The one preprocessing function shared by training evaluation, ONNX validation,
`PneumoniaDetector` and the Celery workers.

Why this chain: PneumoniaMNIST images were made by centre-cropping each X-ray to its
short side and shrinking it to 28x28 (8-bit). The network was trained on those 28x28
images, upscaled in-batch to 224x224 with bilinear interpolation (PyTorch
``F.interpolate(..., mode="bilinear", align_corners=False)``), replicated to three
channels and normalised with ImageNet statistics. A full-resolution radiograph has to
go through the *same* reduction to 28x28 first, otherwise the model sees detail it
was never trained on (train/serve skew).

Numpy only: resampling is done with separable weight matrices, exact area averaging
for the shrink and PyTorch-compatible bilinear weights for the upscale.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable

import numpy as np

from models.errors import UnreadableImageError

SOURCE_SIZE = 28
"""Side of the PneumoniaMNIST images the model was trained on."""
INPUT_SIZE = 224
"""Side of the network input."""
MAX_ASPECT = 4.0
"""Longest/shortest side beyond which an input is refused: its central square would be a sliver
of the picture (a chest radiograph is about square; a strip is not one)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocessing_id(source_size: int = SOURCE_SIZE) -> str:
    """Recorded in the model card so a consumer can check it speaks the same contract."""
    return f"pneumoniamnist-{source_size}-area/bilinear-{INPUT_SIZE}/imagenet-norm/v1"


PREPROCESSING_ID = preprocessing_id(SOURCE_SIZE)


@lru_cache(maxsize=64)
def area_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) matrix averaging source pixels by their overlap with each target pixel.

    Equivalent to OpenCV's INTER_AREA / PIL's BOX filter for shrinking.
    """
    scale = src / dst
    weights = np.zeros((dst, src), dtype=np.float64)
    for i in range(dst):
        start, stop = i * scale, (i + 1) * scale
        first, last = int(np.floor(start)), int(np.ceil(stop))
        for j in range(first, min(last, src)):
            overlap = min(stop, j + 1) - max(start, j)
            if overlap > 0:
                weights[i, j] = overlap / scale
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=8)
def bilinear_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) matrix reproducing PyTorch bilinear interpolation with align_corners=False."""
    scale = src / dst
    weights = np.zeros((dst, src), dtype=np.float64)
    for i in range(dst):
        x = max((i + 0.5) * scale - 0.5, 0.0)
        x0 = min(int(np.floor(x)), src - 1)
        x1 = min(x0 + 1, src - 1)
        frac = x - x0
        weights[i, x0] += 1.0 - frac
        weights[i, x1] += frac
    weights.setflags(write=False)
    return weights


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """Grayscale array -> float64 (float32 for float32 input) in [0, 1].

    Integer images are scaled by their dtype's full range (uint8 /255, uint16 /65535),
    which is how 8- and 16-bit PNG/JPEG files store display values. Float images must
    already be display values in [0, 1] (what `models.dicom_io.dicom_to_grayscale` returns).
    A 16-bit (or wider) image using less than a quarter of its range, e.g. 12- or 14-bit data stored
    unscaled, would be read almost black and is refused instead; so is one whose values span less than a
    quarter of it (the same data lifted by an offset, read as a flat grey). A masked array with masked values
    is refused (nothing says what a masked pixel reads as); one with nothing masked is read as its data.
    Anything else is refused with `UnreadableImageError` (a `ValueError`), as a bad file is.
    """
    if np.ma.is_masked(image):  # np.asarray drops the mask and reads the values under it as image
        raise UnreadableImageError(f"masked array with {int(np.ma.count_masked(image))} masked values: the mask "
                                   "would be ignored; fill them (array.filled(value)) or pass a plain array")
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:  # (H, W, 1), as some loaders keep a channel axis
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = rgb_to_luminance(array[..., :3])
    if array.ndim != 2:
        raise UnreadableImageError(f"expected a 2-D grayscale image, got shape {array.shape}")
    if array.size == 0:
        raise UnreadableImageError("empty image")
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        if info.min < 0:
            raise UnreadableImageError(f"signed integer images are ambiguous ({array.dtype}); pass display values")
        used = int(array.max()).bit_length()
        if info.bits > 8 and used <= info.bits - 2:
            # Scaled by its type's range it would be read almost black (a 12-bit export in a 16-bit PNG:
            # test AUC 0.96 -> 0.22), and nothing says how many bits it holds (PNG encoders must scale up).
            # 14-bit data (most DR detectors; a DICOM's pixel_array passed as an array) read at a quarter
            # of its brightness put every normal study in high_suspicion (specificity 0.91 -> 0.26); a
            # full-range chest image whose brightest pixel is under a quarter of full scale is not plausible.
            raise UnreadableImageError(f"{info.bits}-bit image uses only its low {used} bits (maximum "
                                       f"{int(array.max())}): raw values stored without scaling? Export it "
                                       f"full-range (8 or {info.bits} bit) or send the DICOM")
        low, high = int(array.min()), int(array.max())
        if info.bits > 8 and high - low < (int(info.max) + 1) // 4:
            # The same unscaled values lifted by an offset (12-bit data + 32768, a signed-to-unsigned slip)
            # pass the rule above and fill a thin grey band: every normal study read high_suspicion
            # (specificity 0.85 -> 0.00 on 60 test normals), with no error. A full-range chest image spans
            # far more than a quarter of its range, whatever its brightest pixel.
            raise UnreadableImageError(f"{info.bits}-bit image spans only {high - low + 1} of its {int(info.max) + 1} "
                                       f"levels ({low}..{high}): an offset or unscaled export? Export it "
                                       f"full-range (8 or {info.bits} bit) or send the DICOM")
        values = array.astype(np.float64)
        values /= float(info.max)  # in place: a second full-size float64 array is the worker's peak on big plates
        return values
    if np.issubdtype(array.dtype, np.floating) or array.dtype == np.bool_:
        # A float32 display image (every DICOM) stays float32: `reduce_to_source` works in float32, and the
        # clip gives the same float32 values either way, at a quarter of the memory (benchmarks/worker_memory.py).
        values = array if array.dtype == np.float32 else array.astype(np.float64)
        if not np.isfinite(values).all():
            raise UnreadableImageError("image contains NaN or infinite values")
        if values.min() < -1e-6 or values.max() > 1 + 1e-6:
            raise UnreadableImageError("float images must hold display values in [0, 1]")
        return np.clip(values, 0.0, 1.0)
    raise UnreadableImageError(f"unsupported image dtype {array.dtype}")


def rgb_to_luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, the same weights PIL uses for convert('L'); keeps the input dtype kind."""
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    if np.issubdtype(rgb.dtype, np.integer):
        return np.clip(np.rint(luma), 0, np.iinfo(rgb.dtype).max).astype(rgb.dtype)
    return luma


def center_crop_square(image: np.ndarray) -> np.ndarray:
    """Crop the central square whose side is the short side (as MedMNIST did)."""
    height, width = image.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top : top + side, left : left + side]


def reduce_to_source(image: np.ndarray, source_size: int = SOURCE_SIZE) -> np.ndarray:
    """Any-size grayscale -> the uint8 image PneumoniaMNIST(+) would have stored at `source_size`."""
    unit = to_unit_range(image)
    if max(unit.shape) / min(unit.shape) > MAX_ASPECT:
        raise UnreadableImageError(f"aspect ratio of {unit.shape[0]}x{unit.shape[1]} exceeds {MAX_ASPECT}")
    square = center_crop_square(unit)
    side = square.shape[0]
    if side < source_size:
        raise UnreadableImageError(f"image side {side} is smaller than the model's source size {source_size}")
    weights = area_weights(side, source_size).astype(np.float32)  # float32 halves the cost on 2048^2 inputs
    small = (weights @ np.asarray(square, dtype=np.float32) @ weights.T).astype(np.float64)
    return np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)


def preprocess(image: np.ndarray, source_size: int = SOURCE_SIZE) -> np.ndarray:
    """Grayscale image of any size -> float32 (3, 224, 224) network input.

    The chain: to [0, 1] -> centre-crop to the short side -> area-shrink to 28x28 and
    quantise to 8 bits -> bilinear upscale to 224 -> replicate to RGB -> ImageNet norm.
    A 28x28 uint8 PneumoniaMNIST image passes the first steps unchanged. `source_size`
    is the MedMNIST+ size the model was trained at (28, 64, 128 or 224; the card says).
    """
    small = reduce_to_source(image, source_size).astype(np.float64) / 255.0
    up = bilinear_weights(source_size, INPUT_SIZE)
    large = up @ small @ up.T
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float64)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float64)[:, None, None]
    return ((large[None, :, :] - mean) / std).astype(np.float32)


def preprocess_batch(images: Iterable[np.ndarray], source_size: int = SOURCE_SIZE) -> np.ndarray:
    """Stack `preprocess` over several images -> float32 (N, 3, 224, 224)."""
    batch = [preprocess(image, source_size) for image in images]
    if not batch:
        return np.zeros((0, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    return np.stack(batch)
