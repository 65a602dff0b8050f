"""Clinical metrics as pure numpy functions (MONAI-style), tested against hand-computed values.

Label convention: 1 = pneumonia (positive), 0 = normal.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.metrics import roc_auc_score

from models.detector import calibrated_probability

THRESHOLD_METRICS = ("accuracy", "precision", "npv", "sensitivity", "specificity", "f1", "fnr", "fpr")


def softmax_pneumonia(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """P(pneumonia) from two-class logits: the serving contract's own function, so the two cannot drift."""
    return calibrated_probability(logits, temperature)


def confusion(labels: np.ndarray, predicted: np.ndarray) -> dict[str, int]:
    labels, predicted = np.asarray(labels).astype(bool), np.asarray(predicted).astype(bool)
    return {"tp": int(np.sum(labels & predicted)), "fp": int(np.sum(~labels & predicted)),
            "tn": int(np.sum(~labels & ~predicted)), "fn": int(np.sum(labels & ~predicted))}


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def binary_metrics(labels: np.ndarray, probability: np.ndarray, threshold: float) -> dict[str, float]:
    """Threshold metrics; a case is called pneumonia when probability >= threshold."""
    c = confusion(labels, np.asarray(probability) >= threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    precision, sensitivity = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "precision": precision,
        "npv": _ratio(tn, tn + fn),
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "fnr": _ratio(fn, tp + fn),
        "fpr": _ratio(fp, tn + fp),
    }


def roc_auc(labels: np.ndarray, probability: np.ndarray) -> float:
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, probability))


def brier(labels: np.ndarray, probability: np.ndarray) -> float:
    return float(np.mean((np.asarray(probability, dtype=np.float64) - np.asarray(labels)) ** 2))


def expected_calibration_error(labels: np.ndarray, probability: np.ndarray, bins: int = 10) -> float:
    """ECE of the positive-class probability over equal-width bins (weighted |accuracy - confidence|)."""
    labels, probability = np.asarray(labels, dtype=np.float64), np.asarray(probability, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(probability, edges[1:-1], right=False), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.mean() * abs(labels[members].mean() - probability[members].mean())
    return float(total)


def reliability_curve(labels: np.ndarray, probability: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    labels, probability = np.asarray(labels, dtype=np.float64), np.asarray(probability, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(probability, edges[1:-1]), 0, bins - 1)
    mean_p, observed, counts = [], [], []
    for b in range(bins):
        members = index == b
        counts.append(int(members.sum()))
        mean_p.append(float(probability[members].mean()) if members.any() else float("nan"))
        observed.append(float(labels[members].mean()) if members.any() else float("nan"))
    return {"mean_predicted": mean_p, "observed": observed, "count": counts}


def nll(labels: np.ndarray, logits: np.ndarray, temperature: float) -> float:
    p = np.clip(softmax_pneumonia(logits, temperature), 1e-12, 1 - 1e-12)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_temperature(labels: np.ndarray, logits: np.ndarray, low: float = 0.05, high: float = 20.0) -> float:
    """Temperature minimising validation NLL (Guo et al. 2017), by golden-section search in log T."""
    a, b = np.log(low), np.log(high)
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


def bootstrap_ci(labels: np.ndarray, probability: np.ndarray, statistic: Callable[[np.ndarray, np.ndarray], dict],
                 rounds: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CI of every entry of `statistic(labels, probability)`, resampling cases."""
    rng = np.random.default_rng(seed)
    labels, probability = np.asarray(labels), np.asarray(probability)
    draws: dict[str, list[float]] = {}
    for _ in range(rounds):
        index = rng.integers(0, len(labels), len(labels))
        for key, value in statistic(labels[index], probability[index]).items():
            draws.setdefault(key, []).append(value)
    return {key: (float(np.nanpercentile(v, 100 * alpha / 2)), float(np.nanpercentile(v, 100 * (1 - alpha / 2))))
            for key, v in draws.items()}
