"""Calibration fitting and threshold metrics (models/calibration.py) against values computed by hand."""

import math

import numpy as np
import pytest

from models.calibration import (binary_metrics, bootstrap_ci, confusion, fit_temperature, nll,
                                threshold_for_sensitivity, threshold_for_specificity, youden_threshold)

# 4 positives, 6 negatives. At t=0.5: TP=3 (0.9,0.8,0.6), FN=1 (0.3), FP=2 (0.7,0.55), TN=4
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
PROBS = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.55, 0.4, 0.2, 0.1, 0.05])


def test_confusion_and_threshold_metrics_by_hand():
    assert confusion(LABELS, PROBS >= 0.5) == {"tp": 3, "fp": 2, "tn": 4, "fn": 1}
    m = binary_metrics(LABELS, PROBS, 0.5)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["npv"] == pytest.approx(4 / 5)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["fnr"] == pytest.approx(1 / 4)
    assert m["fpr"] == pytest.approx(2 / 6)


def test_undefined_ratios_are_nan():
    m = binary_metrics(np.array([0, 0]), np.array([0.1, 0.2]), 0.5)
    assert math.isnan(m["sensitivity"]) and math.isnan(m["precision"]) and m["specificity"] == 1.0


def test_fitted_temperature_recovers_overconfidence():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 4000)
    labels = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    logits = np.stack([np.zeros(4000), 3.0 * true_logit], axis=1)  # 3x overconfident
    temperature = fit_temperature(labels, logits)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert nll(labels, logits, temperature) < nll(labels, logits, 1.0)


def test_thresholds_meet_their_targets_by_hand():
    # sensitivity >= 0.75 allows one miss of 4 positives: highest such threshold is the 2nd lowest positive (0.6)
    assert threshold_for_sensitivity(LABELS, PROBS, 0.75) == 0.6
    assert threshold_for_sensitivity(LABELS, PROBS, 1.0) == 0.3
    # specificity >= 5/6: five of six negatives strictly below t -> just above 0.55
    t = threshold_for_specificity(LABELS, PROBS, 5 / 6)
    assert 0.55 < t < 0.5500001
    assert binary_metrics(LABELS, PROBS, t)["specificity"] == pytest.approx(5 / 6)
    # Youden: t=0.6 gives sens 3/4, spec 5/6 -> J = 0.5833, the maximum here
    assert youden_threshold(LABELS, PROBS) == 0.6


def test_bootstrap_ci_brackets_the_point_estimate():
    ci = bootstrap_ci(LABELS, PROBS, lambda y, p: binary_metrics(y, p, 0.5), rounds=300, seed=1)
    low, high = ci["accuracy"]
    assert low <= 0.7 <= high and 0 <= low < high <= 1
