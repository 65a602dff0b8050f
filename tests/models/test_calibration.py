"""Calibration fitting and threshold metrics (models/calibration.py) against values computed by hand."""

import math

import numpy as np
import pytest

from models.calibration import (StrataTargets, binary_metrics, bootstrap_ci, calibrate, choose_strata, confusion,
                                fit_temperature, nll, stratum_report, threshold_for_sensitivity,
                                temperature_at_edge, threshold_for_specificity, youden_threshold)
from models.card import Stratum

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


def test_a_probability_that_is_not_a_number_is_refused_not_called_normal():
    """`nan >= 0.5` is False: a diverged model's NaN was counted as a normal call."""
    with pytest.raises(ValueError, match="1 probabilities are not finite"):
        binary_metrics(np.array([1, 0]), np.array([np.nan, 0.2]), 0.5)


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


# ---------------------------------------------------------------------------------------------------------------
# choose_strata + stratum_report as a whole, on tiny hand-made sets (every expected number is worked out by hand).
# Band convention (Stratum docstring, stratum_report): lower <= p < upper, the top band also includes p == 1.

def _not_likely_normal_sensitivity(labels, probability, strata):
    """Share of pneumonia cases with p >= the rule-out cut (i.e. not 'likely_normal')."""
    return float(np.mean(probability[labels == 1] >= strata[0].upper))


def _high_suspicion_specificity(labels, probability, strata):
    """Share of normal cases kept out of 'high_suspicion' (p < the rule-in cut)."""
    return float(np.mean(probability[labels == 0] < strata[2].lower))


# Three bands. 5 pneumonia, 5 normal; a normal case sits exactly on the rule-out cut (0.40) beside a pneumonia one.
THREE_LABELS = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
THREE_PROBS = np.array([0.95, 0.85, 0.60, 0.40, 0.15, 0.70, 0.50, 0.40, 0.10, 0.05])
THREE_TARGETS = StrataTargets(rule_out_sensitivity=0.8, high_suspicion_specificity=0.8)


def test_choose_strata_three_bands_by_hand():
    strata = choose_strata(THREE_LABELS, THREE_PROBS, THREE_TARGETS)
    assert [s.name for s in strata] == ["likely_normal", "indeterminate", "high_suspicion"]
    # rule-out: sensitivity >= 0.8 of 5 positives allows floor(0.2 * 5) = 1 miss;
    #   sorted positives [0.15, 0.40, 0.60, 0.85, 0.95] -> cut = positives[1] = 0.40 (0.15 alone falls below)
    # rule-in: specificity >= 0.8 of 5 negatives needs ceil(0.8 * 5) = 4 strictly below the cut;
    #   sorted negatives [0.05, 0.10, 0.40, 0.50, 0.70] -> cut = the next float above negatives[3] = 0.50
    assert strata[0].lower == 0.0 and strata[0].upper == 0.40
    assert strata[1].lower == 0.40 and strata[1].upper == np.nextafter(0.50, np.inf)
    assert strata[2].lower == np.nextafter(0.50, np.inf) and strata[2].upper == 1.0
    # the cuts are the extreme ones: the next float above 0.40 would lose the 0.40 positive (sens 3/5 < 0.8),
    # a rule-in cut of exactly 0.50 would let the 0.50 negative in (spec 3/5 < 0.8)
    assert binary_metrics(THREE_LABELS, THREE_PROBS, np.nextafter(0.40, np.inf))["sensitivity"] == pytest.approx(3 / 5)
    assert binary_metrics(THREE_LABELS, THREE_PROBS, 0.50)["specificity"] == pytest.approx(3 / 5)


def test_stratum_report_three_bands_by_hand():
    strata = choose_strata(THREE_LABELS, THREE_PROBS, THREE_TARGETS)
    report = stratum_report(THREE_LABELS, THREE_PROBS, strata)
    assert list(report) == ["likely_normal", "indeterminate", "high_suspicion"]
    # likely_normal [0, 0.40): pneumonia 0.15; normal 0.10, 0.05 -> 3 cases, PPV 1/3, NPV 2/3, 1/5 pneu, 2/5 normal
    assert report["likely_normal"] == pytest.approx({"count": 3, "pneumonia": 1, "normal": 2, "ppv": 1 / 3,
                                                     "npv": 2 / 3, "share_of_pneumonia": 1 / 5,
                                                     "share_of_normal": 2 / 5})
    # indeterminate [0.40, 0.50+): pneumonia 0.40; normal 0.40 (tie on the lower cut), 0.50 -> 3 cases, 1 pneu, 2 normal
    assert report["indeterminate"] == pytest.approx({"count": 3, "pneumonia": 1, "normal": 2, "ppv": 1 / 3,
                                                     "npv": 2 / 3, "share_of_pneumonia": 1 / 5,
                                                     "share_of_normal": 2 / 5})
    # high_suspicion [0.50+, 1]: pneu 0.95, 0.85, 0.60; normal 0.70 -> 4 cases, PPV 3/4, NPV 1/4, 3/5 pneu, 1/5 normal
    assert report["high_suspicion"] == pytest.approx({"count": 4, "pneumonia": 3, "normal": 1, "ppv": 3 / 4,
                                                      "npv": 1 / 4, "share_of_pneumonia": 3 / 5,
                                                      "share_of_normal": 1 / 5})
    # every case in exactly one band: 3 + 3 + 4 = 10; shares add to 1 (1 + 1 + 3 of 5 pneu, 2 + 2 + 1 of 5 normal)
    assert sum(r["count"] for r in report.values()) == 10
    assert sum(r["share_of_pneumonia"] for r in report.values()) == pytest.approx(1.0)
    assert sum(r["share_of_normal"] for r in report.values()) == pytest.approx(1.0)
    # counts are plain ints (they go into the JSON model card)
    assert all(type(r[k]) is int for r in report.values() for k in ("count", "pneumonia", "normal"))


def test_three_band_targets_met_on_calibration_data():
    strata = choose_strata(THREE_LABELS, THREE_PROBS, THREE_TARGETS)
    report = stratum_report(THREE_LABELS, THREE_PROBS, strata)
    # not likely_normal: 0.95, 0.85, 0.60, 0.40 of the 5 positives -> 4/5 = 0.8 >= 0.8
    assert _not_likely_normal_sensitivity(THREE_LABELS, THREE_PROBS, strata) == pytest.approx(4 / 5)
    assert 1 - report["likely_normal"]["share_of_pneumonia"] >= THREE_TARGETS.rule_out_sensitivity - 1e-12
    # outside high_suspicion: 0.50, 0.40, 0.10, 0.05 of the 5 negatives -> 4/5 = 0.8 >= 0.8
    assert _high_suspicion_specificity(THREE_LABELS, THREE_PROBS, strata) == pytest.approx(4 / 5)
    assert 1 - report["high_suspicion"]["share_of_normal"] >= THREE_TARGETS.high_suspicion_specificity - 1e-12


# Clamped: the specificity cut (just above 0.60) would fall below the rule-out cut (0.70), so rule-in = rule-out.
CLAMP_LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
CLAMP_PROBS = np.array([0.90, 0.80, 0.70, 0.55, 0.65, 0.60, 0.30, 0.20, 0.10, 0.05])
CLAMP_TARGETS = StrataTargets(rule_out_sensitivity=0.75, high_suspicion_specificity=0.8)


def test_choose_strata_clamps_rule_in_to_rule_out():
    strata = choose_strata(CLAMP_LABELS, CLAMP_PROBS, CLAMP_TARGETS)
    # rule-out: floor(0.25 * 4) = 1 miss allowed; sorted positives [0.55, 0.70, 0.80, 0.90] -> 0.70
    # specificity alone: ceil(0.8 * 6) = 5 of 6 negatives below; sorted negatives [0.05, 0.10, 0.20, 0.30, 0.60, 0.65]
    #   -> next float above negatives[4] = 0.60, which is < 0.70, so the rule-in cut is raised to 0.70
    assert threshold_for_specificity(CLAMP_LABELS, CLAMP_PROBS, 0.8) == np.nextafter(0.60, np.inf)
    assert [(s.name, s.lower, s.upper) for s in strata] == [("likely_normal", 0.0, 0.70),
                                                            ("indeterminate", 0.70, 0.70),
                                                            ("high_suspicion", 0.70, 1.0)]


def test_stratum_report_clamped_case_has_empty_indeterminate_band():
    strata = choose_strata(CLAMP_LABELS, CLAMP_PROBS, CLAMP_TARGETS)
    report = stratum_report(CLAMP_LABELS, CLAMP_PROBS, strata)
    # likely_normal [0, 0.70): pneumonia 0.55; all 6 normals -> 7 cases, PPV 1/7, NPV 6/7, 1/4 pneu, 6/6 normal
    assert report["likely_normal"] == pytest.approx({"count": 7, "pneumonia": 1, "normal": 6, "ppv": 1 / 7,
                                                     "npv": 6 / 7, "share_of_pneumonia": 1 / 4,
                                                     "share_of_normal": 1.0})
    # high_suspicion [0.70, 1]: pneumonia 0.90, 0.80 and 0.70 (exactly on the shared cut -> the upper band)
    assert report["high_suspicion"] == pytest.approx({"count": 3, "pneumonia": 3, "normal": 0, "ppv": 1.0,
                                                      "npv": 0.0, "share_of_pneumonia": 3 / 4,
                                                      "share_of_normal": 0.0})
    # indeterminate [0.70, 0.70) holds nothing
    empty = report["indeterminate"]
    assert (empty["count"], empty["pneumonia"], empty["normal"]) == (0, 0, 0)
    assert empty["share_of_pneumonia"] == 0.0 and empty["share_of_normal"] == 0.0
    # 0/0: the code writes NaN today; a separate fix will write None (JSON null) instead -- accept either
    for key in ("ppv", "npv"):
        assert empty[key] is None or math.isnan(empty[key])
    # targets still met: not likely_normal catches 3/4 = 0.75 >= 0.75; high_suspicion keeps 6/6 normals out >= 0.8
    assert _not_likely_normal_sensitivity(CLAMP_LABELS, CLAMP_PROBS, strata) == pytest.approx(3 / 4)
    assert _high_suspicion_specificity(CLAMP_LABELS, CLAMP_PROBS, strata) == 1.0


def test_stratum_report_ties_at_cut_points_go_to_the_upper_band():
    strata = (Stratum("likely_normal", 0.0, 0.3), Stratum("indeterminate", 0.3, 0.7),
              Stratum("high_suspicion", 0.7, 1.0))
    # p:      0.0   0.2   0.3   0.5   0.7   0.9   1.0
    # band:   LN    LN    IND   IND   HS    HS    HS      (lower <= p < upper; 1.0 is in the top band)
    labels = np.array([0, 1, 0, 1, 0, 1, 1])
    probability = np.array([0.0, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0])
    report = stratum_report(labels, probability, strata)
    # LN: 0.0 (normal), 0.2 (pneu) -> 2 cases, 1 pneu; IND: 0.3 (normal), 0.5 (pneu) -> 2, 1;
    # HS: 0.7 (normal), 0.9, 1.0 (pneu) -> 3, 2. 4 pneumonia, 3 normal in all
    assert [(r["count"], r["pneumonia"], r["normal"]) for r in report.values()] == [(2, 1, 1), (2, 1, 1), (3, 2, 1)]
    assert report["high_suspicion"]["ppv"] == pytest.approx(2 / 3)
    assert report["high_suspicion"]["share_of_pneumonia"] == pytest.approx(2 / 4)
    assert report["indeterminate"]["share_of_normal"] == pytest.approx(1 / 3)


def test_choose_strata_ties_among_cases_at_the_cuts():
    # Tied positives at the rule-out cut: sensitivity >= 0.75 of 4 allows 1 miss, but the two lowest positives
    # share p = 0.2, so the cut is 0.2 and both stay out of likely_normal (sens 4/4, not 3/4).
    # Tied negatives at the rule-in cut: specificity >= 0.5 of 4 needs ceil(0.5 * 4) = 2 below; sorted negatives
    # [0.1, 0.5, 0.5, 0.5] -> cut just above negatives[1] = 0.5, which also keeps the other 0.5s out (spec 4/4).
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    probability = np.array([0.2, 0.2, 0.6, 0.8, 0.1, 0.5, 0.5, 0.5])
    strata = choose_strata(labels, probability, StrataTargets(0.75, 0.5))
    assert strata[0].upper == 0.2
    assert strata[2].lower == np.nextafter(0.5, np.inf)
    report = stratum_report(labels, probability, strata)
    # LN [0, 0.2): 0.1 (normal); IND [0.2, 0.5+): 0.2, 0.2 (pneu), 0.5 x3 (normal); HS: 0.6, 0.8 (pneu)
    assert [(r["count"], r["pneumonia"], r["normal"]) for r in report.values()] == [(1, 0, 1), (5, 2, 3), (2, 2, 0)]
    assert _not_likely_normal_sensitivity(labels, probability, strata) == 1.0
    assert _high_suspicion_specificity(labels, probability, strata) == 1.0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("targets", [StrataTargets(), StrataTargets(0.9, 0.8), StrataTargets(1.0, 1.0)])
def test_choose_strata_meets_targets_on_the_calibration_data(seed, targets):
    rng = np.random.default_rng(seed)
    labels = (rng.random(60) < 0.4).astype(int)
    probability = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0.0, 0.999).round(2)  # rounded: plenty of ties
    strata = choose_strata(labels, probability, targets)
    assert _not_likely_normal_sensitivity(labels, probability, strata) >= targets.rule_out_sensitivity
    assert _high_suspicion_specificity(labels, probability, strata) >= targets.high_suspicion_specificity
    report = stratum_report(labels, probability, strata)
    assert sum(r["count"] for r in report.values()) == len(labels)
    assert sum(r["pneumonia"] for r in report.values()) == labels.sum()


def test_rule_in_target_met_when_normals_saturate_at_probability_one():
    # A saturated sigmoid gives exactly 1.0: calibrated_probability([[0, 40]], 1) == 1 / (1 + exp(-40)) == 1.0.
    # 10 normals, two of them at 1.0, and specificity >= 0.9: ceil(0.9 * 10) = 9 below the cut -> next float above
    # sorted negatives[8] = 1.0 -> clamped to 1.0 -> band [1.0, 1.0] still holds both 1.0 normals: spec 8/10 < 0.9.
    logits = np.array([[0.0, x] for x in (-2.2, -1.4, -0.8, -0.4, 0.0, 0.4, 0.8, 1.4, 40.0, 40.0, 2.2, 3.0)])
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    targets = StrataTargets(rule_out_sensitivity=0.98, high_suspicion_specificity=0.9)
    # The top band is closed at 1.0, so no cut can keep them out: refused with the reason, never a silent miss.
    with pytest.raises(ValueError, match="2 normal case.s. have a calibrated probability of exactly 1.0"):
        calibrate(labels, logits, targets, temperature=1.0)


def test_a_temperature_fitted_on_separable_data_is_at_the_edge_of_its_range():
    """Perfectly separated logits keep lowering the NLL as T shrinks: the fit ends at the range's low
    end, which `evaluate` then warns about; ordinary overlapping logits do not."""
    labels = np.array([0, 0, 0, 1, 1, 1])
    separated = np.array([[0.0, -3.0], [0.0, -2.0], [0.0, -1.0], [0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])
    assert temperature_at_edge(fit_temperature(labels, separated))
    overlapping = np.array([[0.0, -1.0], [0.0, 0.5], [0.0, -0.5], [0.0, 1.0], [0.0, -0.2], [0.0, 0.8]])
    assert not temperature_at_edge(fit_temperature(labels, overlapping))
    assert temperature_at_edge(0.05) and temperature_at_edge(20.0) and not temperature_at_edge(1.0)
