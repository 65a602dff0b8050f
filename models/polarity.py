"""Is this chest radiograph the right way round (air dark, bone bright)?

Why: a clinical review (2026-11-29) found that an image stored inverted under a consistent
MONOCHROME2 header (or MONOCHROME1 pixels already in display polarity) was scored as it was: the
inverted normals doubled their URGENT share (7 -> 14 of 30), with no error anywhere. Nothing in the
header can tell; the pixels can.

How: the Pearson correlation between the centre of the image's 28x28 reduction (the contract's own
`reduce_to_source`, so a full-resolution radiograph and its PneumoniaMNIST-size thumbnail agree) and
the mean of the training split's, each z-scored. Dark lungs either side of a bright mediastinum
correlate positively; an inverted image correlates with exactly the opposite sign. Only the centre
16x16 is compared: bright collimation borders (unexposed detector, white in MONOCHROME2) reached
the whole-image correlation and turned 26% of correct validation and test images negative at a
4-pixel border. The template, its threshold and the figures that chose them sit in one JSON
file written by `pneumonia-train polarity` from the training data (`POLARITY_FILE`).

Numpy only, like the rest of `models/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from models.atomic import write_text
from models.card import MODEL_DIR, strict_json
from models.errors import InvertedImageError
from models.preprocess import reduce_to_source

POLARITY_FILE = MODEL_DIR / "polarity_template.json"
"""The shipped template: made from PneumoniaMNIST's train split by `pneumonia-train polarity`."""
POLARITY_SOURCE = 28
"""Side of the reduction compared, whatever size a model was trained at: the template's own."""
CENTRE_MARGIN = 6
"""Pixels of the 28x28 reduction left out on each side: collimation and padding live there."""
REFUSE_BELOW = -0.1
"""Correlation under which an image is refused as inverted. Correct-polarity validation and test images
(1,148) stayed above it as stored, with bright borders up to 4 of 28 pixels, framed smaller or tighter and
under gamma 0.4-2.5; their inverses fell below it in 1,146-1,148 cases. Borders reaching into the compared
centre (7 and 8 of 28 pixels a side: an exposed field half the image wide or less) were refused too (83 and
943 of 1,148), and so was about one sideways (90-degree) image in ten. The figures are in `POLARITY_FILE`.
An image in between (flat, odd, not a chest) is not judged."""


def centre(small: np.ndarray, margin: int = CENTRE_MARGIN) -> np.ndarray:
    """The central square of a (28, 28) reduction, or of a stack (N, 28, 28)."""
    return small[..., margin:small.shape[-2] - margin, margin:small.shape[-1] - margin]


def standardised(pixels: np.ndarray) -> np.ndarray:
    """Each image (last two axes) flattened, centred and scaled to unit norm; a flat one stays all zeros."""
    flat = np.asarray(pixels, dtype=np.float64).reshape(*pixels.shape[:-2], -1)
    flat = flat - flat.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(flat, axis=-1, keepdims=True)
    return np.divide(flat, norm, out=np.zeros_like(flat), where=norm > 1e-9)


def template_from(images: np.ndarray, margin: int = CENTRE_MARGIN) -> np.ndarray:
    """The mean standardised centre of (N, 28, 28) training images, itself standardised: (side, side)."""
    side = images.shape[-1] - 2 * margin
    mean = standardised(centre(images, margin)).mean(axis=0).reshape(side, side)
    return standardised(mean).reshape(side, side)


def correlations(smalls: np.ndarray, template: np.ndarray, margin: int = CENTRE_MARGIN) -> np.ndarray:
    """Pearson correlation of each (.., 28, 28) reduction's centre with the template, in [-1, 1]."""
    return standardised(centre(smalls, margin)) @ template.reshape(-1)


@dataclass(frozen=True)
class PolarityTemplate:
    """The template, its threshold and where they came from (the file's whole content)."""

    template: np.ndarray
    refuse_below: float = REFUSE_BELOW
    margin: int = CENTRE_MARGIN
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def correlation(self, image: np.ndarray) -> float:
        """Correlation of any-size grayscale `image` (what `preprocess` takes) with the template."""
        return float(correlations(reduce_to_source(image, POLARITY_SOURCE), self.template, self.margin))

    def check(self, image: np.ndarray) -> float:
        """The correlation; `InvertedImageError` when it says the image is shown the wrong way round."""
        value = self.correlation(image)
        if value < self.refuse_below:
            raise InvertedImageError(
                f"pixels look inverted (bright lungs, dark mediastinum): the image correlates at {value:+.2f} with an "
                f"upright frontal chest radiograph (refused below {self.refuse_below:+.2f}); check Photometric "
                "Interpretation and Presentation LUT Shape at the modality. A sideways image or a field collimated to "
                "about half the image width or less can read the same way (TRIAGE_POLARITY_CHECK=off scores such "
                "images as they are)")
        return value

    def to_dict(self) -> dict[str, Any]:
        return {"template": np.round(self.template, 6).tolist(), "refuse_below": self.refuse_below,
                "margin": self.margin, "source_size": POLARITY_SOURCE, **self.provenance}

    def save(self, path: str | Path) -> None:
        write_text(path, strict_json(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path = POLARITY_FILE) -> "PolarityTemplate":
        """ValueError for a file that is not a template this code can use (wrong size, not unit norm)."""
        data = json.loads(Path(path).read_text())
        margin = int(data["margin"])
        side = POLARITY_SOURCE - 2 * margin
        template = np.asarray(data["template"], dtype=np.float64)
        if int(data.get("source_size", 0)) != POLARITY_SOURCE or template.shape != (side, side):
            raise ValueError(f"{Path(path).name}: a polarity template is the {side}x{side} centre of a "
                             f"{POLARITY_SOURCE}x{POLARITY_SOURCE} reduction, not {list(template.shape)}")
        if abs(np.linalg.norm(template) - 1) > 1e-3 or abs(template.mean()) > 1e-3:
            raise ValueError(f"{Path(path).name}: the template is not standardised (zero mean, unit norm)")
        refuse_below = float(data["refuse_below"])
        if not -1 <= refuse_below <= 0:
            raise ValueError(f"{Path(path).name}: refuse_below must be in [-1, 0], not {refuse_below}")
        known = {"template", "refuse_below", "margin", "source_size"}
        return cls(template, refuse_below, margin, {k: v for k, v in data.items() if k not in known})
