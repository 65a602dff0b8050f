"""Training-side metrics (AUC, Brier, ECE, softmax) against values computed by hand."""

import math

import numpy as np
import pytest

from training.metrics import (brier, expected_calibration_error, roc_auc, sensitivity_at_specificity, softmax_pneumonia,
                              specificity_at_sensitivity)

# 4 positives, 6 negatives. At t=0.5: TP=3 (0.9,0.8,0.6), FN=1 (0.3), FP=2 (0.7,0.55), TN=4
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
PROBS = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.55, 0.4, 0.2, 0.1, 0.05])


def test_auc_by_hand():
    # pairs (pos, neg) ranked correctly: 0.9:6, 0.8:6, 0.6:4 (above 0.55,0.4,0.2,0.1,0.05 -> 5?), count precisely:
    # 0.9 > all 6 negatives; 0.8 > all 6; 0.6 > 0.55,0.4,0.2,0.1,0.05 = 5; 0.3 > 0.2,0.1,0.05 = 3 -> 20/24
    assert roc_auc(LABELS, PROBS) == pytest.approx(20 / 24)
    assert math.isnan(roc_auc(np.ones(3), np.array([0.1, 0.2, 0.3])))


def test_roc_points_by_hand():
    # (sensitivity, specificity) at each score as threshold: 0.9 (.25, 1), 0.8 (.5, 1), 0.7 (.5, 5/6),
    # 0.6 (.75, 5/6), 0.55 (.75, 4/6), 0.4 (.75, 3/6), 0.3 (1, 3/6), 0.2 (1, 2/6) ...
    assert sensitivity_at_specificity(LABELS, PROBS, 0.8) == pytest.approx(0.75)
    assert sensitivity_at_specificity(LABELS, PROBS, 5 / 6) == pytest.approx(0.75)  # "at least" includes equality
    assert sensitivity_at_specificity(LABELS, PROBS, 0.9) == pytest.approx(0.5)
    assert sensitivity_at_specificity(LABELS, PROBS, 0.5) == pytest.approx(1.0)
    assert specificity_at_sensitivity(LABELS, PROBS, 0.75) == pytest.approx(5 / 6)
    assert specificity_at_sensitivity(LABELS, PROBS, 1.0) == pytest.approx(0.5)
    assert specificity_at_sensitivity(LABELS, PROBS, 0.2) == pytest.approx(1.0)
    assert math.isnan(sensitivity_at_specificity(np.zeros(3), np.array([0.1, 0.2, 0.3]), 0.9))


def test_brier_and_ece_by_hand():
    y, p = np.array([1, 0]), np.array([0.8, 0.4])
    assert brier(y, p) == pytest.approx((0.04 + 0.16) / 2)
    # two bins used: [0.4,0.5) holds label 0 (gap 0.4), [0.8,0.9) holds label 1 (gap 0.2); weights 1/2 each
    assert expected_calibration_error(y, p, bins=10) == pytest.approx(0.3)


def test_softmax_and_temperature():
    logits = np.array([[0.0, 2.0], [1.0, -1.0]])
    np.testing.assert_allclose(softmax_pneumonia(logits), [1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))])
    np.testing.assert_allclose(softmax_pneumonia(logits, 2.0), [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))])
