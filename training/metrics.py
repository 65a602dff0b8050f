"""Clinical metrics as pure numpy functions (MONAI-style), tested against hand-computed values.

Label convention: 1 = pneumonia (positive), 0 = normal.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

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


def sensitivity_at_specificity(labels: np.ndarray, probability: np.ndarray, specificity: float) -> float:
    """Highest sensitivity of any threshold whose specificity is at least `specificity`.

    A point of the ROC curve, threshold-free like AUC: it says whether the model *can* reach
    an operating point (the original design reports sensitivity at a specificity), not which
    threshold would reach it on unseen cases. Only thresholds at the scores count (no
    interpolation between ROC vertices).
    """
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, probability, drop_intermediate=False)
    return float(tpr[fpr <= 1.0 - specificity + 1e-9].max())


def specificity_at_sensitivity(labels: np.ndarray, probability: np.ndarray, sensitivity: float) -> float:
    """Highest specificity of any threshold whose sensitivity is at least `sensitivity` (see above)."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, probability, drop_intermediate=False)
    return float((1.0 - fpr[tpr >= sensitivity - 1e-9]).max())


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
