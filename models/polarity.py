"""Is this chest radiograph the right way round (air dark, bone bright) and the right way up?

Why: a clinical review (2026-11-29) found that an image stored inverted under a consistent
MONOCHROME2 header (or MONOCHROME1 pixels already in display polarity) was scored as it was: the
inverted normals doubled their URGENT share (7 -> 14 of 30), with no error anywhere. Nothing in the
header can tell; the pixels can.

How: the Pearson correlation between the centre of the image's 28x28 reduction (the contract's own
`reduce_to_source`, so a full-resolution radiograph and its PneumoniaMNIST-size thumbnail agree) and
the mean of the training split's, each z-scored. Dark lungs either side of a bright mediastinum
correlate positively; an inverted image correlates with exactly the opposite sign. Only the centre
16x16 is compared, leaving out flat strips along the image's edges (`unframed`): a bright collimation
border (unexposed detector, white in MONOCHROME2) among the compared pixels decides the sign. The
template, its threshold and the figures that chose them sit in one JSON file written by
`pneumonia-train polarity` from the training data (`POLARITY_FILE`).

The same correlation, taken with the reduction turned by 90, 180 and 270 degrees, tells an image stored
sideways or upside down (a portable plate read in landscape, no Patient Orientation to turn it by): it
matches the template better turned than as stored. Scored as they were, sideways test images lost about
10 points of AUC (0.975 -> 0.869 and 0.878) and 14-23% of their pneumonia fell under 0.5; turned 180 degrees,
55% of normals rose over it, and the check catches few of those (README). Such an image is refused with
`RotatedImageError`, naming the turn where it is clear.

Numpy only, like the rest of `models/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from models.atomic import write_text
from models.card import MODEL_DIR, strict_json
from models.errors import InvertedImageError, RotatedImageError
from models.preprocess import reduce_to_source

POLARITY_FILE = MODEL_DIR / "polarity_template.json"
"""The shipped template: made from PneumoniaMNIST's train split by `pneumonia-train polarity`."""
POLARITY_SOURCE = 28
"""Side of the reduction compared, whatever size a model was trained at: the template's own."""
CENTRE_MARGIN = 6
"""Pixels of the 28x28 reduction left out on each side: collimation and padding live there."""
FLAT_LINE_LEVELS = 2.0
"""Spread (standard deviation, grey levels of 255) around a fitted parabola at or under which an edge row or column
of the 28x28 reduction counts as flat (`unframed`). As stored it takes centre pixels from 3 of the 5,856
PneumoniaMNIST images and changes no figure; 3.0 left 298 images with an 8-pixel border unjudged, 2.0 leaves 115."""
MIN_COMPARED = 64
"""Fewest centre pixels left after the flat edges for an image to be judged (a quarter of the 16x16 centre)."""
REFUSE_BELOW = -0.1
"""Correlation under which an image is refused as inverted. Of the correct-polarity validation and test images
(1,148), none fell below it as stored, under simulated collimation (borders on every side, on one side, graded
or curved along their length, fields of 70-90% placed at random), framed smaller or tighter, or under gamma
0.4 or 2.5; their inverses fell below it in 1,145-1,148 cases (1,032 with an 8-pixel border all round, where 115
images keep too little to be judged). Stored sideways (90 degrees), 107 correct images fell below it too, and
were refused as inverted until the turn check named 102 of them turned (`TURN_OVER_INVERSION`). The figures are
in `POLARITY_FILE`; the threshold and `FLAT_LINE_LEVELS` were chosen on them."""
TURNED_MARGIN = 0.5
"""How much better than as stored the image must match the template when turned (by 90, 180 or 270 degrees, or
turned and inverted) to be refused as stored turned. Chosen on the training split, the template's own: at 0.5 none
of its 4,708 images is refused as turned as stored (0.4 refused 1, 0.3 refused 14). On validation and test (1,148)
none is refused as stored and at most 2 under any simulated framing or contrast change, while 89-93% of them
stored sideways and 32% turned 180 degrees are caught (4% flipped upside down: a chest and its mirror image look
alike here); the figures are in `POLARITY_FILE`."""
OFF_SWITCH = (" (TRIAGE_POLARITY_CHECK=off, or PneumoniaDetector(polarity_check=False), scores such images as "
              "they are)")
TURN_OVER_INVERSION = 0.3
"""Below `REFUSE_BELOW` an image is refused whatever the reason; a turned reading names it (not "inverted") when it
beats the inverted reading by this. Chosen on the training split: at 0.3, 12 of its 4,705 inverted images are told
to turn (0: 147, 0.5: none) while 988 of the 1,070 of its sideways images that fall below `REFUSE_BELOW` are named
turned (0.5: 735). On validation and test: no inverted image told to turn, 206 of 221 sideways ones named turned."""
DIRECTION_MARGIN = 0.2
"""How much better than the next best other turn a turn must match to be named in a reason (`named_turn`)."""
TURNS = {1: "90 degrees counter-clockwise", 2: "180 degrees", 3: "90 degrees clockwise"}
"""The `np.rot90` k that, applied to the stored image, brings it upright -> how a reason says that turn."""


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


def _detrended_spread(line: np.ndarray) -> float:
    """Standard deviation of a line around its least-squares parabola: an unexposed border is brighter or darker
    along its length (a heel effect, scatter peaking mid-border), which a straight line does not follow (a border
    dipping 5% at its ends refused 844 of 1,148 correct images when only a straight line was removed)."""
    return float(np.std(line - _parabola_projection(line.size) @ line))


@lru_cache(maxsize=32)
def _parabola_projection(length: int) -> np.ndarray:
    """(length, length) matrix taking a line to its least-squares parabola (one per length, read-only)."""
    design = np.vander(np.linspace(-1.0, 1.0, length), 3)
    projection = design @ np.linalg.pinv(design)
    projection.setflags(write=False)
    return projection


def _is_flat(line: np.ndarray) -> bool:
    return line.size > 3 and _detrended_spread(line) <= FLAT_LINE_LEVELS


def _flat_edges(small: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): flat lines peeled from each edge of one reduction, each line judged over the
    span the other sides leave (a bright left border under a dark top strip is still a border)."""
    height, width = small.shape
    edges = [0, 0, 0, 0]
    peeled = True
    while peeled:
        peeled = False
        for side in range(4):
            top, bottom, left, right = edges
            if top + bottom >= height - 1 or left + right >= width - 1:
                return tuple(edges)
            rows, columns = slice(top, height - bottom), slice(left, width - right)
            line = (small[top, columns], small[height - 1 - bottom, columns],
                    small[rows, left], small[rows, width - 1 - right])[side]
            if _is_flat(line):
                edges[side] += 1
                peeled = True
    return tuple(edges)


def unframed(smalls: np.ndarray) -> np.ndarray:
    """(N, 28, 28) -> bool mask, True for the pixels the flat edge strips (collimation, padding, air) enclose.

    A collimated border is flat as stored, bright in MONOCHROME2 and dark inverted, but a border on one side
    decides the sign of a correlation that includes it: 8 of 28 pixels on the left refused a third of correct
    images (review, 2026-11-30). Lines are flat when their spread around a fitted parabola is at most
    `FLAT_LINE_LEVELS` (a border brighter along its length is still a border); they are peeled from each edge
    inwards, with the mixed line where the field begins. Inverting an image keeps its mask."""
    values = np.asarray(smalls, dtype=np.float64)
    kept = np.zeros(values.shape, dtype=bool)
    height, width = values.shape[-2:]
    for index in np.ndindex(values.shape[:-2]):
        top, bottom, left, right = (run + 1 if run else 0 for run in _flat_edges(values[index]))
        kept[index][top:max(top, height - bottom), left:max(left, width - right)] = True
    return kept


def correlations(smalls: np.ndarray, template: np.ndarray, margin: int = CENTRE_MARGIN) -> np.ndarray:
    """Pearson correlation, in [-1, 1], of each (.., 28, 28) reduction's centre with the template, over the centre's
    pixels that flat edge strips enclose (`unframed`, the strips left out); 0 (not judged) where fewer than
    `MIN_COMPARED` remain."""
    smalls = np.asarray(smalls)
    batch = smalls.reshape(-1, *smalls.shape[-2:])
    kept = centre(unframed(batch), margin).reshape(len(batch), -1).astype(np.float64)
    pixels = centre(batch, margin).reshape(len(batch), -1).astype(np.float64)
    reference = np.broadcast_to(template.reshape(1, -1), pixels.shape)
    count = kept.sum(axis=-1, keepdims=True)
    per_pixel = np.maximum(count, 1)
    image = (pixels - (pixels * kept).sum(axis=-1, keepdims=True) / per_pixel) * kept
    expected = (reference - (reference * kept).sum(axis=-1, keepdims=True) / per_pixel) * kept
    scale = np.sqrt((image ** 2).sum(axis=-1) * (expected ** 2).sum(axis=-1))
    value = np.divide((image * expected).sum(axis=-1), scale, out=np.zeros(len(batch)), where=scale > 1e-9)
    value = np.where(count[:, 0] >= MIN_COMPARED, value, 0.0)
    return value.reshape(smalls.shape[:-2])


def turned_correlations(smalls: np.ndarray, template: np.ndarray, margin: int = CENTRE_MARGIN) -> np.ndarray:
    """(N, 28, 28) reductions -> (N, 4): `correlations` of each turned by `np.rot90` k = 0 (as stored), 1, 2, 3."""
    smalls = np.asarray(smalls)
    return np.stack([correlations(np.rot90(smalls, k, axes=(-2, -1)), template, margin) for k in range(4)], axis=-1)


@dataclass(frozen=True, eq=False)
class PolarityTemplate:
    """The template, its threshold and where they came from (the file's whole content)."""

    template: np.ndarray
    refuse_below: float = REFUSE_BELOW
    margin: int = CENTRE_MARGIN
    provenance: Mapping[str, Any] = field(default_factory=dict)
    turned_margin: float = TURNED_MARGIN

    def __post_init__(self) -> None:
        """Read-only, as the frozen object holding it: a caller's edit would change every later check."""
        template = np.array(self.template, dtype=np.float64)
        template.setflags(write=False)
        object.__setattr__(self, "template", template)

    def correlation(self, image: np.ndarray) -> float:
        """Correlation of any-size grayscale `image` (what `preprocess` takes) with the template."""
        return float(correlations(reduce_to_source(image, POLARITY_SOURCE), self.template, self.margin))

    def turned_correlations(self, image: np.ndarray) -> np.ndarray:
        """(4,): the correlation of `image`'s reduction turned by `np.rot90` k = 0 (as stored), 1, 2 and 3."""
        return turned_correlations(reduce_to_source(image, POLARITY_SOURCE)[None], self.template, self.margin)[0]

    def check(self, image: np.ndarray) -> float:
        """The correlation, or the refusal of an image shown the wrong way round (`InvertedImageError`: below
        `refuse_below`, or a better match inverted and turned) or stored turned (`RotatedImageError`: a better
        match turned by `turned_margin`). A refused image is named by the best of those readings (`verdicts`)."""
        turned = self.turned_correlations(image)
        verdict = int(verdicts(turned[None], self.refuse_below, self.turned_margin)[0])
        value = float(turned[0])
        if verdict == UPRIGHT:
            return value
        if verdict == INVERTED:
            raise InvertedImageError(
                f"pixels look inverted (bright lungs, dark mediastinum): the image correlates at {value:+.2f} with an "
                f"upright frontal chest radiograph (refused below {self.refuse_below:+.2f}); check Photometric "
                f"Interpretation and Presentation LUT Shape at the modality{OFF_SWITCH}")
        k, sign = best_turn(turned)
        as_turned = (f"the image correlates at {value:+.2f} with an upright frontal chest radiograph as stored, "
                     f"{sign * float(turned[k]):+.2f} {'inverted back and ' if sign < 0 else ''}turned "
                     f"{named_turn(turned, k, sign)}")
        if verdict == INVERTED_TURNED:
            raise InvertedImageError(
                f"pixels look inverted (bright lungs, dark mediastinum) and stored turned: {as_turned}; check "
                f"Photometric Interpretation and Presentation LUT Shape at the modality, and the plate's "
                f"orientation{OFF_SWITCH}")
        raise RotatedImageError(f"pixels look stored turned: {as_turned}; check the plate's orientation and the Patient "
                                f"Orientation the modality writes{OFF_SWITCH}")

    def to_dict(self) -> dict[str, Any]:
        return {"template": np.round(self.template, 6).tolist(), "refuse_below": self.refuse_below,
                "turned_margin": self.turned_margin, "margin": self.margin, "source_size": POLARITY_SOURCE,
                **self.provenance}

    def save(self, path: str | Path) -> None:
        write_text(path, strict_json(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path = POLARITY_FILE) -> "PolarityTemplate":
        """ValueError for a file that is not a template this code can use (wrong size, not unit norm)."""
        data = json.loads(Path(path).read_text())
        margin = data["margin"]
        side = POLARITY_SOURCE - 2 * margin if isinstance(margin, int) and margin >= 0 else 0
        if side <= 0 or side * side < MIN_COMPARED:
            raise ValueError(f"{Path(path).name}: margin must be a whole number of pixels from 0 that leaves a centre "
                             f"of at least {MIN_COMPARED} pixels (every image would go unjudged), not {margin!r}")
        template = np.asarray(data["template"], dtype=np.float64)
        if int(data.get("source_size", 0)) != POLARITY_SOURCE or template.shape != (side, side):
            raise ValueError(f"{Path(path).name}: a polarity template is the {side}x{side} centre of a "
                             f"{POLARITY_SOURCE}x{POLARITY_SOURCE} reduction, not {list(template.shape)}")
        if abs(np.linalg.norm(template) - 1) > 1e-3 or abs(template.mean()) > 1e-3:
            raise ValueError(f"{Path(path).name}: the template is not standardised (zero mean, unit norm)")
        refuse_below = float(data["refuse_below"])
        if not -1 <= refuse_below <= 0:
            raise ValueError(f"{Path(path).name}: refuse_below must be in [-1, 0], not {refuse_below}")
        turned_margin = float(data.get("turned_margin", TURNED_MARGIN))  # absent: a template from before the turn check
        if not 0 < turned_margin <= 2:
            raise ValueError(f"{Path(path).name}: turned_margin must be in (0, 2], not {turned_margin}")
        known = {"template", "refuse_below", "turned_margin", "margin", "source_size"}
        return cls(template, refuse_below, margin, {k: v for k, v in data.items() if k not in known}, turned_margin)


UPRIGHT, INVERTED, TURNED, INVERTED_TURNED = 0, 1, 2, 3
"""What `verdicts` reads an image as: passed, or refused as inverted, as stored turned, or as both."""
AS_TURNED = (TURNED, INVERTED_TURNED)
"""The verdicts whose reason names a turn (`np.isin(verdicts(...), AS_TURNED)`)."""


def verdicts(turned: np.ndarray, refuse_below: float = REFUSE_BELOW, turned_margin: float = TURNED_MARGIN,
             turn_over_inversion: float = TURN_OVER_INVERSION) -> np.ndarray:
    """(N, 4) correlations as stored and turned by `np.rot90` k = 1-3 -> (N,) verdicts, the one rule that `check`
    applies and the template's figures count. Above `refuse_below` a reading turned (inverted or not) refuses the
    image when it beats as stored by `turned_margin`; below, the image is refused either way, and a turned reading
    names it when it beats the inverted one by `turn_over_inversion`."""
    turned = np.asarray(turned, dtype=np.float64)
    stored = turned[:, 0]
    best, (_, sign) = _best_alternative(turned)
    low = stored < refuse_below
    by_turn = best >= np.where(low, turn_over_inversion - stored, stored + turned_margin)
    as_turned = np.where(sign < 0, INVERTED_TURNED, TURNED)
    return np.where(by_turn, as_turned, np.where(low, INVERTED, UPRIGHT))


def _best_alternative(turned: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """(N, 4) -> the best correlation other than as stored, and its (k, sign): turned by `np.rot90` k (1-3),
    inverted too where sign is -1. `verdicts` and `best_turn` read the same choice."""
    alternatives = np.concatenate([turned[:, 1:], -turned[:, 1:]], axis=1)
    index = alternatives.argmax(axis=1)
    return alternatives.max(axis=1), (index % 3 + 1, np.where(index >= 3, -1, 1))


def best_turn(turned: np.ndarray) -> tuple[int, int]:
    """(k, sign) of the best match other than as stored, for one image's (4,) correlations."""
    _, (k, sign) = _best_alternative(np.asarray(turned, dtype=np.float64)[None])
    return int(k[0]), int(sign[0])


def named_turn(turned: np.ndarray, k: int, sign: int) -> str:
    """The turn that brings the image upright, as a reason says it: named only when it beats the next best turn
    by `DIRECTION_MARGIN`. An upside-down chest matches the template almost as well as an upright one, and without
    the margin 10 and 27 of the sideways validation and test images refused were told the wrong way."""
    score = sign * np.asarray(turned, dtype=np.float64)
    runner_up = max((j for j in (1, 2, 3) if j != k), key=lambda j: score[j])
    if score[k] - score[runner_up] >= DIRECTION_MARGIN:
        return TURNS[k]
    if {k, runner_up} == {1, 3}:
        return "90 degrees (which way is unclear)"
    return f"{TURNS[k]} or {TURNS[runner_up]} (which is unclear)"
