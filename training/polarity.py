"""`pneumonia-train polarity`: the serving side's inverted- and turned-image guard (`models.polarity`), made
from the training split, with the figures that justify its thresholds written into the same file.

The template is the training split's only; validation and test (the shifted source) are scored with
it, as they are and inverted, plain and under simulated framing and contrast changes that a site's
radiographs have and PneumoniaMNIST's do not: bright collimation borders (even, one-sided, graded,
curved along their length, a field placed at random), a patient smaller or larger in the field,
another display gamma, an image stored sideways or upside down. Each inverted image is the whole
perturbed image inverted, as a modality that writes the wrong polarity would send it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Callable

import numpy as np

from models.polarity import (AS_TURNED, CENTRE_MARGIN, DIRECTION_MARGIN, FLAT_LINE_LEVELS, MIN_COMPARED,
                             POLARITY_SOURCE, REFUSE_BELOW, TURN_OVER_INVERSION, TURNED_MARGIN, TURNS, UPRIGHT,
                             PolarityTemplate, best_turn, named_turn, template_from, turned_correlations, verdicts)
from training.data import ensure_dataset, load_split


def bright_border(width: int) -> Callable[[np.ndarray], np.ndarray]:
    """Collimation: the unexposed edge of the detector, white in MONOCHROME2."""
    def apply(unit: np.ndarray) -> np.ndarray:
        framed = unit.copy()
        framed[:, :width], framed[:, -width:], framed[:, :, :width], framed[:, :, -width:] = 1.0, 1.0, 1.0, 1.0
        return framed
    return apply


def bright_side(width: int, side: str) -> Callable[[np.ndarray], np.ndarray]:
    """Collimation on one side only (`left` or `top`), the field off-centre."""
    def apply(unit: np.ndarray) -> np.ndarray:
        framed = unit.copy()
        if side == "left":
            framed[:, :, :width] = 1.0
        else:
            framed[:, :width] = 1.0
        return framed
    return apply


def graded_side(width: int) -> Callable[[np.ndarray], np.ndarray]:
    """A left border that is not flat: brighter down the image (0.88 to 1, a heel effect) with a little noise."""
    def apply(unit: np.ndarray) -> np.ndarray:
        framed = unit.copy()
        ramp = np.linspace(0.88, 1.0, unit.shape[-2])[None, :, None]
        noise = np.random.default_rng(1).normal(0.0, 0.004, (len(unit), unit.shape[-2], width))
        framed[:, :, :width] = np.clip(ramp + noise, 0.0, 1.0)
        return framed
    return apply


def curved_side(width: int, dip: float) -> Callable[[np.ndarray], np.ndarray]:
    """A left border brightest mid-way down and `dip` darker at its ends (scatter, vignetting)."""
    def apply(unit: np.ndarray) -> np.ndarray:
        framed = unit.copy()
        along = np.linspace(-1.0, 1.0, unit.shape[-2])
        framed[:, :, :width] = (1.0 - dip * along ** 2)[None, :, None]
        return framed
    return apply


def collimated_fields(low: float = 0.7, high: float = 0.9) -> Callable[[np.ndarray], np.ndarray]:
    """A field covering `low`-`high` of each side, placed at random, white outside: the collimation of
    `benchmarks/display_shutter_study.py`, which chose to leave such borders as stored."""
    def apply(unit: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(0)
        side = unit.shape[-1]
        framed = np.ones_like(unit)
        for index in range(len(unit)):
            height, width = (int(round(side * rng.uniform(low, high))) for _ in range(2))
            top, left = int(rng.integers(0, side - height + 1)), int(rng.integers(0, side - width + 1))
            framed[index, top:top + height, left:left + width] = unit[index, top:top + height, left:left + width]
        return framed
    return apply


def smaller_in_field(side: int, fill: float) -> Callable[[np.ndarray], np.ndarray]:
    """The patient shrunk to `side` pixels in the middle of a field of `fill` (0: air, 1: collimated)."""
    def apply(unit: np.ndarray) -> np.ndarray:
        index = (np.arange(side) * unit.shape[-1] / side).astype(int)
        framed = np.full_like(unit, fill)
        offset = (unit.shape[-1] - side) // 2
        framed[:, offset:offset + side, offset:offset + side] = unit[:, index][:, :, index]
        return framed
    return apply


def tighter_crop(side: int) -> Callable[[np.ndarray], np.ndarray]:
    """Only the central `side` pixels, enlarged to the whole field (a tightly framed chest)."""
    def apply(unit: np.ndarray) -> np.ndarray:
        offset = (unit.shape[-1] - side) // 2
        index = offset + (np.arange(unit.shape[-1]) * side / unit.shape[-1]).astype(int)
        return unit[:, index][:, :, index]
    return apply


def gamma(value: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda unit: unit ** value


PERTURBATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "as_stored": lambda unit: unit,
    "bright_border_4px": bright_border(4), "bright_border_8px": bright_border(8),
    "bright_left_9px": bright_side(9, "left"), "bright_top_9px": bright_side(9, "top"),
    "graded_left_8px": graded_side(8), "curved_left_9px_5pct": curved_side(9, 0.05),
    "curved_left_9px_10pct": curved_side(9, 0.10), "collimated_field_70_90pct": collimated_fields(),
    "smaller_in_field_20px_air": smaller_in_field(20, 0.0), "smaller_in_field_16px_bright": smaller_in_field(16, 1.0),
    "tighter_crop_18px": tighter_crop(18), "gamma_0.4": gamma(0.4), "gamma_2.5": gamma(2.5),
    "sideways_90": lambda unit: np.rot90(unit, 1, axes=(1, 2)), "sideways_270": lambda unit: np.rot90(unit, 3, axes=(1, 2)),
    "turned_180": lambda unit: np.rot90(unit, 2, axes=(1, 2)), "upside_down": lambda unit: unit[:, ::-1],
}
"""Name -> change applied to (N, 28, 28) images in [0, 1], before the result is quantised to 8 bits."""


UPRIGHT_BY = {"sideways_90": 3, "sideways_270": 1, "turned_180": 2}
"""The `np.rot90` k that brings each turning perturbation upright: what its refusals' reasons should name."""


def turns_named(correct: np.ndarray, read: np.ndarray, k: int) -> dict[str, int]:
    """Of the images refused as turned, how many reasons name the turn `k` that brings them upright, how many
    say the direction is unclear, and how many name another turn (advice that would leave them wrong)."""
    named = [named_turn(row, *best_turn(row)) for row in correct[np.isin(read, AS_TURNED)]]
    right = sum(name == TURNS[k] for name in named)
    unclear = sum("unclear" in name for name in named)
    return {"right": right, "unclear": unclear, "wrong": len(named) - right - unclear}


def as_uint8(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def guard_figures(images: np.ndarray, template: np.ndarray, refuse_below: float, margin: int = CENTRE_MARGIN,
                  turned_margin: float = TURNED_MARGIN) -> dict:
    """For each perturbation: how many correct images are refused (and of them, as stored turned), and how
    many of their inverses are caught; `models.polarity.verdicts` decides, as it does in serving."""
    unit = images.astype(np.float64) / 255.0
    figures = {}
    for name, perturb in PERTURBATIONS.items():
        shown = perturb(unit)
        correct = turned_correlations(as_uint8(shown), template, margin)
        inverted = turned_correlations(as_uint8(1.0 - shown), template, margin)
        read_correct = verdicts(correct, refuse_below, turned_margin)
        figures[name] = {"refused_correct": int((read_correct != UPRIGHT).sum()),
                         "refused_correct_as_turned": int(np.isin(read_correct, AS_TURNED).sum()),
                         "not_judged": int((correct[:, 0] == 0.0).sum()),  # too little left inside flat edges
                         "caught_inverted": int((verdicts(inverted, refuse_below, turned_margin) != UPRIGHT).sum()),
                         "min_correct": round(float(correct[:, 0].min()), 4),
                         "max_inverted": round(float(inverted[:, 0].max()), 4)}
        if name in UPRIGHT_BY:
            figures[name]["turn_named"] = turns_named(correct, read_correct, UPRIGHT_BY[name])
    return {"images": int(len(images)), "by_perturbation": figures}


TURNED_MARGINS_WEIGHED = (0.3, 0.4, 0.5)
"""The margins whose refusals of training images as stored the file records: the choice of `TURNED_MARGIN`."""
TURN_OVER_INVERSION_WEIGHED = (0.0, 0.3, 0.5)
"""The values whose naming of training images under `REFUSE_BELOW` the file records: the choice of
`TURN_OVER_INVERSION` (inverted images told to turn, against sideways ones named turned)."""


def naming_under_threshold(images: np.ndarray, template: np.ndarray, refuse_below: float, margin: int,
                           turned_margin: float) -> dict:
    """For each weighed `turn_over_inversion`: how many of `images` inverted are named turned, and how many of them
    stored sideways (either way) that fall under `refuse_below` are named turned rather than inverted."""
    inverted = turned_correlations(255 - images, template, margin)
    sideways = np.concatenate([turned_correlations(np.rot90(images, k, axes=(1, 2)), template, margin) for k in (1, 3)])
    sideways = sideways[sideways[:, 0] < refuse_below]
    named = {}
    for weighed in TURN_OVER_INVERSION_WEIGHED:
        named[str(weighed)] = {
            "inverted_named_turned": int(np.isin(verdicts(inverted, refuse_below, turned_margin, weighed), AS_TURNED).sum()),
            "sideways_named_turned": int(np.isin(verdicts(sideways, refuse_below, turned_margin, weighed), AS_TURNED).sum())}
    return {"inverted_under_refuse_below": int((inverted[:, 0] < refuse_below).sum()),
            "sideways_under_refuse_below": int(len(sideways)), "by_value": named}


def build_polarity_template(data_root: Path | None, out: Path, refuse_below: float = REFUSE_BELOW,
                            margin: int = CENTRE_MARGIN, turned_margin: float = TURNED_MARGIN) -> PolarityTemplate:
    """Template from the train split, figures on every split; written to `out` and returned."""
    path, md5 = ensure_dataset(data_root, POLARITY_SOURCE)
    train = load_split(data_root, "train", POLARITY_SOURCE)
    template = template_from(train.images, margin)
    held_out = np.concatenate([load_split(data_root, split, POLARITY_SOURCE).images for split in ("val", "test")])
    train_turned = turned_correlations(train.images, template, margin)
    train_correlations = train_turned[:, 0]
    read = verdicts(train_turned, refuse_below, turned_margin)
    provenance = {
        "made_by": "pneumonia-train polarity", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "data": {"file": path.name, "md5": md5, "template_from": "train", "images": int(len(train.images))},
        "figures_made_with": {"flat_line_levels": FLAT_LINE_LEVELS, "min_compared": MIN_COMPARED,
                              "turn_over_inversion": TURN_OVER_INVERSION, "direction_margin": DIRECTION_MARGIN},
        "figures": {
            "train_as_stored": {"images": int(len(train.images)),
                                "refused": int((read != UPRIGHT).sum()),
                                "refused_as_turned": int(np.isin(read, AS_TURNED).sum()),
                                "refused_as_turned_at_margin": {
                                    str(weighed): int(np.isin(verdicts(train_turned, refuse_below, weighed),
                                                              AS_TURNED).sum())
                                    for weighed in TURNED_MARGINS_WEIGHED},
                                "naming_under_refuse_below": naming_under_threshold(
                                    train.images, template, refuse_below, margin, turned_margin),
                                "min": round(float(train_correlations.min()), 4),
                                "median": round(float(np.median(train_correlations)), 4)},
            "val_and_test": guard_figures(held_out, template, refuse_below, margin, turned_margin),
        },
    }
    result = PolarityTemplate(template, refuse_below, margin, provenance, turned_margin)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    return result
