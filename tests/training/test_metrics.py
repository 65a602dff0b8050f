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


def test_per_class_metrics_by_hand():
    """TP 3, FP 1, TN 4, FN 2: Normal precision 4/6, recall 4/5, F1 8/11; Pneumonia 3/4, 3/5, 6/9."""
    from models.calibration import per_class_metrics

    labels = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    predicted = np.array([1, 1, 1, 0, 0, 1, 0, 0, 0, 0])
    report = per_class_metrics(labels, predicted)
    assert report["Normal"] == pytest.approx({"precision": 4 / 6, "recall": 4 / 5, "f1": 8 / 11})
    assert report["Pneumonia"] == pytest.approx({"precision": 3 / 4, "recall": 3 / 5, "f1": 6 / 9})
    assert report["macro avg"]["f1"] == pytest.approx((8 / 11 + 6 / 9) / 2)
    assert report["weighted avg"]["recall"] == pytest.approx((4 / 5 * 5 + 3 / 5 * 5) / 10)


@pytest.mark.parametrize("seed", range(5))
def test_per_class_metrics_equal_sklearn_s_report(seed):
    from sklearn.metrics import classification_report

    from models.calibration import per_class_metrics

    rng = np.random.default_rng(seed)
    labels, predicted = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    if seed == 4:
        predicted[:] = 0  # no pneumonia called: its precision is undefined, NaN in both
    ours = per_class_metrics(labels, predicted)
    theirs = classification_report(labels, predicted, target_names=["Normal", "Pneumonia"], output_dict=True,
                                   zero_division=np.nan)
    for name in ours:
        for figure, value in ours[name].items():
            expected = theirs[name][f"{figure}-score" if figure == "f1" else figure]
            assert (math.isnan(value) and math.isnan(expected)) or value == pytest.approx(expected)


def test_full_report_gives_cis_of_the_confusion_and_the_per_class_report_without_moving_the_others():
    from models.calibration import binary_metrics, bootstrap_ci
    from training.evaluate import full_report

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    probability = np.clip(labels * 0.35 + rng.uniform(0, 0.65, 200), 0, 1)
    report = full_report(labels, probability, 0.5, rounds=200, seed=7)
    alone = bootstrap_ci(labels, probability, lambda y, p: {**binary_metrics(y, p, 0.5), "auc": roc_auc(y, p)},
                         rounds=200, seed=7)
    assert report["ci95"] == alone  # the published CIs stay what they were
    for key, count in report["confusion"].items():
        low, high = report["confusion_ci95"][key]
        assert low <= count <= high and low < high
    assert set(report["per_class_ci95"]) == {"Normal", "Pneumonia", "macro avg", "weighted avg"}
    low, high = report["per_class_ci95"]["Normal"]["f1"]
    assert low <= report["per_class"]["Normal"]["f1-score"] <= high and low < high


def test_the_test_calibration_report_carries_cis_and_names_its_ece():
    from training.evaluate import calibration_report

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    logits = np.stack([np.zeros(300), (labels - 0.5) * 3 + rng.normal(0, 1.5, 300)], axis=1)
    report = calibration_report(labels, logits, 1.5, rounds=300, seed=1)
    assert set(report["ci95"]) == {"ece_before", "ece_after", "brier_before", "brier_after"}
    for key in ("brier_before", "brier_after"):
        assert report["ci95"][key][0] <= report[key] <= report["ci95"][key][1]
    assert "10 equal-width bins" in report["definition"] and "P(pneumonia)" in report["definition"]
    assert "ci95" not in calibration_report(labels, logits, 1.5)  # validation's, which fitted the temperature


def test_exact_rate_intervals_by_hand():
    """Clopper-Pearson: no event in 10 gives [0, 1 - 0.025**(1/10)]; all 10 the mirror image; an empty
    denominator (nothing called pneumonia: no PPV) gives NaN."""
    from models.calibration import exact_rate_ci

    intervals = exact_rate_ci({"tp": 10, "fn": 0, "tn": 0, "fp": 0})
    assert intervals["fnr"] == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)))
    assert intervals["sensitivity"] == pytest.approx((0.025 ** (1 / 10), 1.0))
    assert all(math.isnan(v) for v in intervals["specificity"])
    two_in_390 = exact_rate_ci({"tp": 388, "fn": 2, "tn": 164, "fp": 70})["fnr"]
    assert two_in_390[0] > 0.0006 and two_in_390[1] == pytest.approx(0.0184, abs=1e-4)  # the release's FNR
