"""Fitting a model's calibration: temperature, operating threshold and confidence strata.

Numpy only, so the same functions serve two callers that must agree exactly:
training (fitted on the validation split, written into the model card) and a
hospital's site calibration (fitted on its own labelled studies, see
`models/site_calibration.py`). Label convention: 1 = pneumonia, 0 = normal.

Strata for worklist triage:

- likely_normal:   p < rule-out cut. The cut is the highest that keeps the sensitivity
                   of "not likely_normal" >= target (0.98 by default).
- indeterminate:   between the cuts.
- high_suspicion:  p >= rule-in cut, the lowest cut keeping specificity >= target.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from models.card import Stratum, validate_strata
from models.detector import calibrated_probability


@dataclass(frozen=True)
class StrataTargets:
    """Targets that fix the confidence-strata cut-points on the calibration data."""

    rule_out_sensitivity: float = 0.98
    """Everything not 'likely_normal' must catch at least this share of pneumonia cases."""
    high_suspicion_specificity: float = 0.95
    """'high_suspicion' must keep at least this share of normal cases out."""

    def __post_init__(self) -> None:
        """A share, not a percentage: 98 (or 1.05) would silently give a rule-out cut above most pneumonia."""
        for name in ("rule_out_sensitivity", "high_suspicion_specificity"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be a share in (0, 1], e.g. 0.98; got {value}")


@dataclass(frozen=True)
class Calibration:
    """What a calibration fit produces; the card (or a site calibration) carries it."""

    temperature: float
    threshold: float
    strata: tuple[Stratum, ...]


def calibrate(labels: np.ndarray, logits: np.ndarray, targets: StrataTargets,
              temperature: float | None = None) -> Calibration:
    """Temperature (min NLL), Youden operating threshold and strata cut-points, all from one labelled set;
    a given `temperature` is kept and only the threshold and cut-points are fitted."""
    temperature = fit_temperature(labels, logits) if temperature is None else temperature
    probability = calibrated_probability(logits, temperature)
    return Calibration(temperature, youden_threshold(labels, probability), choose_strata(labels, probability, targets))


def confusion(labels: np.ndarray, predicted: np.ndarray) -> dict[str, int]:
    labels, predicted = np.asarray(labels).astype(bool), np.asarray(predicted).astype(bool)
    return {"tp": int(np.sum(labels & predicted)), "fp": int(np.sum(~labels & predicted)),
            "tn": int(np.sum(~labels & ~predicted)), "fn": int(np.sum(labels & ~predicted))}


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


RATES = {"accuracy": (("tp", "tn"), ("tp", "tn", "fp", "fn")), "precision": (("tp",), ("tp", "fp")),
         "npv": (("tn",), ("tn", "fn")), "sensitivity": (("tp",), ("tp", "fn")), "specificity": (("tn",), ("tn", "fp")),
         "fnr": (("fn",), ("tp", "fn")), "fpr": (("fp",), ("tn", "fp"))}
"""The threshold metrics that are binomial proportions: (counts in the numerator, counts in the denominator).
The one definition of each: `binary_metrics` computes them from it and `exact_rate_ci` gives their exact CIs."""


def binary_metrics(labels: np.ndarray, probability: np.ndarray, threshold: float) -> dict[str, float]:
    """Threshold metrics; a case is called pneumonia when probability >= threshold. A probability that
    is not a number is refused: `nan >= threshold` is False, so it was counted as a normal call."""
    probability = np.asarray(probability)
    if not np.all(np.isfinite(probability)):
        raise ValueError(f"{int(np.sum(~np.isfinite(probability)))} probabilities are not finite numbers")
    c = confusion(labels, probability >= threshold)
    rates = {name: _ratio(sum(c[k] for k in numerator), sum(c[k] for k in denominator))
             for name, (numerator, denominator) in RATES.items()}
    f1 = _ratio(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"])  # not a proportion of cases: no exact CI
    order = ("accuracy", "precision", "npv", "sensitivity", "specificity", "f1", "fnr", "fpr")
    return {name: f1 if name == "f1" else rates[name] for name in order}


def exact_rate_ci(counts: dict[str, int], alpha: float = 0.05) -> dict[str, tuple[float, float]]:
    """Clopper-Pearson (exact binomial) interval of each rate in `RATES` from the confusion counts; NaN for an
    empty denominator. Why beside the bootstrap: a rate with few events (2 false negatives in 390) gets a
    percentile bootstrap interval of [0, 1.3%], which covers the truth less often than it says (a resample with
    no event collapses to 0), while the exact interval is [0.06%, 1.8%]."""
    from scipy.stats import binomtest

    intervals = {}
    for name, (numerator, denominator) in RATES.items():
        k, n = sum(counts[c] for c in numerator), sum(counts[c] for c in denominator)
        if n == 0:
            intervals[name] = (float("nan"), float("nan"))
            continue
        interval = binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="exact")
        intervals[name] = (float(interval.low), float(interval.high))
    return intervals


def per_class_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict[str, dict[str, float]]:
    """sklearn's classification report figures (precision, recall, F1 per class; macro and support-weighted
    averages) from the confusion counts, NaN where undefined. Why not sklearn itself: the bootstrap asks for
    them thousands of times, and `classification_report` takes about a millisecond each."""
    c = confusion(labels, predicted)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    classes = {
        "Normal": {"precision": _ratio(tn, tn + fn), "recall": _ratio(tn, tn + fp), "f1": _ratio(2 * tn, 2 * tn + fn + fp)},
        "Pneumonia": {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn)},
    }
    support = {"Normal": tn + fp, "Pneumonia": tp + fn}
    macro, weighted = {}, {}
    for figure in ("precision", "recall", "f1"):  # an undefined class figure is left out, as sklearn's zero_division=nan does
        defined = [(classes[k][figure], support[k]) for k in classes if not np.isnan(classes[k][figure])]
        macro[figure] = float(np.mean([v for v, _ in defined])) if defined else float("nan")
        weight = sum(s for _, s in defined)
        weighted[figure] = float(sum(v * s for v, s in defined) / weight) if weight else float("nan")
    return {**classes, "macro avg": macro, "weighted avg": weighted}


def nll(labels: np.ndarray, logits: np.ndarray, temperature: float) -> float:
    p = np.clip(calibrated_probability(logits, temperature), 1e-12, 1 - 1e-12)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


TEMPERATURE_RANGE = (0.05, 20.0)
"""Where `fit_temperature` searches; a fit at either end means the NLL kept falling past it."""


def temperature_at_edge(temperature: float) -> bool:
    """Whether a fitted temperature sits at the end of its search range (1% tolerance)."""
    low, high = TEMPERATURE_RANGE
    return temperature < low * 1.01 or temperature > high * 0.99


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
    """Temperature minimising validation NLL (Guo et al. 2017), by golden-section search in log T."""
    a, b = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(80):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if nll(labels, logits, np.exp(c)) < nll(labels, logits, np.exp(d)):
            b = d
        else:
            a = c
    return float(np.exp((a + b) / 2))


def youden_threshold(labels: np.ndarray, probability: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1 (ties: the higher threshold)."""
    candidates = np.unique(probability)
    scores = [binary_metrics(labels, probability, t) for t in candidates]
    j = np.array([s["sensitivity"] + s["specificity"] - 1 for s in scores])
    best = np.flatnonzero(j == j.max())[-1]
    return float(candidates[best])


def threshold_for_sensitivity(labels: np.ndarray, probability: np.ndarray, target: float) -> float:
    """Highest threshold whose sensitivity (p >= t among positives) is at least `target`."""
    positives = np.sort(np.asarray(probability)[np.asarray(labels) == 1])
    if len(positives) == 0:
        return 0.0
    allowed_misses = int(np.floor((1 - target) * len(positives) + 1e-9))
    return float(positives[allowed_misses])


def threshold_for_specificity(labels: np.ndarray, probability: np.ndarray, target: float) -> float:
    """Lowest threshold t such that at least `target` of negatives have p < t."""
    negatives = np.sort(np.asarray(probability)[np.asarray(labels) == 0])
    if len(negatives) == 0:
        return 1.0
    kept_below = int(np.ceil(target * len(negatives) - 1e-9))
    return float(np.nextafter(negatives[kept_below - 1], np.inf)) if kept_below else 0.0



def choose_strata(labels: np.ndarray, probability: np.ndarray, targets: StrataTargets) -> tuple[Stratum, ...]:
    rule_out = threshold_for_sensitivity(labels, probability, targets.rule_out_sensitivity)
    rule_in = max(threshold_for_specificity(labels, probability, targets.high_suspicion_specificity), rule_out)
    if rule_in > 1.0:  # the top band is closed at 1.0, so no cut keeps out normal cases at exactly 1.0
        saturated = int(np.sum((np.asarray(labels) == 0) & (np.asarray(probability) >= 1.0)))
        raise ValueError(f"high_suspicion cannot keep {targets.high_suspicion_specificity} of the normal cases out: "
                         f"{saturated} normal case(s) have a calibrated probability of exactly 1.0")
    strata = (
        Stratum("likely_normal", 0.0, rule_out,
                f"sensitivity of the other strata >= {targets.rule_out_sensitivity} on the calibration data"),
        Stratum("indeterminate", rule_out, rule_in, "between the rule-out and rule-in cut-points"),
        Stratum("high_suspicion", rule_in, 1.0,
                f"specificity >= {targets.high_suspicion_specificity} on the calibration data"),
    )
    validate_strata(strata)
    return strata


def stratum_indices(probability: np.ndarray, strata: tuple[Stratum, ...]) -> np.ndarray:
    """Index in `strata` of each probability's stratum (the top one closed at its upper end), -1 for none:
    one rule for the pooled counts and for the per-case figures bootstrapped from them."""
    probability = np.asarray(probability)
    index = np.full(probability.shape, -1, dtype=np.int64)
    for i, stratum in enumerate(strata):
        upper_ok = probability <= stratum.upper if i == len(strata) - 1 else probability < stratum.upper
        index[(probability >= stratum.lower) & upper_ok & (index < 0)] = i
    return index


def target_figures(labels: np.ndarray, index: np.ndarray, top: int) -> dict[str, float]:
    """The two figures `StrataTargets` sets, from each case's stratum index (`stratum_indices`; `top`, that of
    high_suspicion): the share of pneumonia kept out of likely_normal (index 0) and of normals kept out of
    high_suspicion. NaN for a class with no case."""
    labels, index = np.asarray(labels), np.asarray(index)
    positives, negatives = index[labels == 1], index[labels == 0]
    return {"rule_out_sensitivity": _ratio(np.sum(positives != 0), len(positives)),
            "high_suspicion_specificity": _ratio(np.sum(negatives != top), len(negatives))}


def stratum_report(labels: np.ndarray, probability: np.ndarray, strata: tuple[Stratum, ...]) -> dict[str, dict]:
    """Per stratum: count, pneumonia share (the PPV of calling it pneumonia) and normal share (NPV)."""
    labels, index = np.asarray(labels), stratum_indices(probability, strata)
    report = {}
    for i, stratum in enumerate(strata):
        members = index == i
        n = int(members.sum())
        positives = int(labels[members].sum())
        report[stratum.name] = {
            "count": n,
            "pneumonia": positives,
            "normal": n - positives,
            "ppv": positives / n if n else float("nan"),
            "npv": (n - positives) / n if n else float("nan"),
            "share_of_pneumonia": positives / max(int(labels.sum()), 1),
            "share_of_normal": (n - positives) / max(int((1 - labels).sum()), 1),
        }
    return report


def bootstrap_ci(labels: np.ndarray, probability: np.ndarray, statistic: Callable[[np.ndarray, np.ndarray], dict],
                 rounds: int = 2000, seed: int = 0, alpha: float = 0.05,
                 groups: np.ndarray | None = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CI of every entry of `statistic(labels, probability)`, resampling cases, or whole
    `groups` (the images of one study) where given: a study's images are not independent draws, and
    resampling them one by one would narrow the CI as if they were."""
    rng = np.random.default_rng(seed)
    labels, probability = np.asarray(labels), np.asarray(probability)
    clusters = group_members(groups)
    draws: dict[str, list[float]] = {}
    for _ in range(rounds):
        if clusters is None:  # the same draws as before groups existed, so singletons give the same CI
            index = rng.integers(0, len(labels), len(labels))
        else:
            index = np.concatenate([clusters[i] for i in rng.integers(0, len(clusters), len(clusters))])
        for key, value in statistic(labels[index], probability[index]).items():
            draws.setdefault(key, []).append(value)
    with warnings.catch_warnings():  # a metric undefined in every draw (no positives called...) has a NaN CI
        warnings.simplefilter("ignore", RuntimeWarning)
        return {key: (float(np.nanpercentile(v, 100 * alpha / 2)), float(np.nanpercentile(v, 100 * (1 - alpha / 2))))
                for key, v in draws.items()}


def group_members(groups: np.ndarray | None) -> list[np.ndarray] | None:
    """Case indices of each group, in order of first appearance; None when every case is its own group."""
    if groups is None:
        return None
    groups = np.asarray(groups)
    ids, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    if len(ids) == len(groups):
        return None
    return [np.flatnonzero(inverse == g) for g in np.argsort(first, kind="stable")]
