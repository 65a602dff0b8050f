"""Clinical metrics as pure numpy functions (MONAI-style), tested against hand-computed values.

Label convention: 1 = pneumonia (positive), 0 = normal.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.metrics import roc_auc_score

from models.calibration import binary_metrics
from models.detector import calibrated_probability

THRESHOLD_METRICS = ("accuracy", "precision", "npv", "sensitivity", "specificity", "f1", "fnr", "fpr")


def softmax_pneumonia(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """P(pneumonia) from two-class logits: the serving contract's own function, so the two cannot drift."""
    return calibrated_probability(logits, temperature)


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
