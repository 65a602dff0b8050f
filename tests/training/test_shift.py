"""Label-free shift estimators against hand-computed values."""

import numpy as np
import pytest

from models.calibration import youden_threshold
from training.shift import (adjusted_count_prevalence, domain_shift, em_prevalence, kish_effective_sample_size,
                            shift_prior, threshold_for_prior, weighted_auc, weighted_specificity,
                            weighted_youden_threshold)

LABELS = np.array([0, 0, 1, 1])
SCORES = np.array([0.1, 0.6, 0.4, 0.9])


def test_kish_effective_sample_size() -> None:
    assert kish_effective_sample_size(np.ones(7)) == pytest.approx(7)
    assert kish_effective_sample_size(np.array([1.0, 1.0, 2.0])) == pytest.approx(16 / 6)


def test_weighted_auc_counts_each_pair_by_its_weights() -> None:
    assert weighted_auc(LABELS, SCORES, np.ones(4)) == pytest.approx(3 / 4)
    # the negative at 0.6 counts twice: ordered pair weight 4 of 6
    assert weighted_auc(LABELS, SCORES, np.array([1, 2, 1, 1])) == pytest.approx(4 / 6)


def test_weighted_specificity() -> None:
    assert weighted_specificity(LABELS, SCORES, np.ones(4), 0.5) == pytest.approx(1 / 2)
    assert weighted_specificity(LABELS, SCORES, np.array([1, 2, 1, 1]), 0.5) == pytest.approx(1 / 3)


def test_weighted_youden_threshold_moves_with_the_weights() -> None:
    # unit weights: J = 0.5 at 0.9 and at 0.4; ties go to the higher threshold
    assert weighted_youden_threshold(LABELS, SCORES, np.ones(4)) == pytest.approx(0.9)
    # the positive at 0.4 weighs 3: J(0.9) = 0.25, J(0.4) = 1 - 0.5 = 0.5
    assert weighted_youden_threshold(LABELS, SCORES, np.array([1, 1, 3, 1])) == pytest.approx(0.4)


def test_unit_weights_reproduce_the_shipped_youden_threshold() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
    assert weighted_youden_threshold(labels, scores, np.ones(300)) == pytest.approx(youden_threshold(labels, scores))


def test_adjusted_count_prevalence_inverts_tpr_and_fpr() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.2, 0.1])  # TPR 3/4, FPR 1/4
    assert adjusted_count_prevalence(labels, scores, np.array([0.9, 0.1, 0.8, 0.2])) == pytest.approx(0.5)
    assert adjusted_count_prevalence(labels, scores, np.array([0.9, 0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1])) == pytest.approx(0.75)
    assert adjusted_count_prevalence(labels, scores, np.array([0.1, 0.1])) == 0.0  # clipped


def test_adjusted_count_refuses_a_classifier_that_does_not_separate() -> None:
    with pytest.raises(ValueError, match="TPR <= FPR"):
        adjusted_count_prevalence(np.array([1, 0]), np.array([0.2, 0.8]), np.array([0.5]))


def test_shift_prior_and_its_threshold() -> None:
    # prior 0.5 -> 0.8: odds x4, so p = 0.5 becomes 0.8
    assert shift_prior(np.array([0.5]), 0.5, 0.8)[0] == pytest.approx(0.8)
    assert shift_prior(np.array([0.3]), 0.6, 0.6)[0] == pytest.approx(0.3)
    # prior 0.75 -> 0.5: odds / 3, so the posterior reaches 0.5 at p = 0.75
    assert threshold_for_prior(0.75, 0.5) == pytest.approx(0.75)
    assert shift_prior(np.array([0.75]), 0.75, 0.5)[0] == pytest.approx(0.5)


def test_em_prevalence_fixed_points() -> None:
    assert em_prevalence(np.array([1.0, 1.0, 1.0, 0.0]), 0.5) == pytest.approx(0.75)
    assert em_prevalence(np.array([0.2, 0.8]), 0.5) == pytest.approx(0.5)
    # posteriors that average above the source prior pull the estimate up, beyond their mean
    estimate = em_prevalence(np.array([0.9, 0.9, 0.9, 0.3]), 0.5)
    assert estimate > 0.75
    assert np.mean(shift_prior(np.array([0.9, 0.9, 0.9, 0.3]), 0.5, estimate)) == pytest.approx(estimate, abs=1e-8)


def test_domain_shift_sees_no_shift_between_draws_of_one_distribution() -> None:
    rng = np.random.default_rng(0)
    result = domain_shift(rng.normal(size=(400, 3)), rng.normal(size=(300, 3)))
    assert abs(result.auc - 0.5) < 0.08
    assert result.source_weights.mean() == pytest.approx(1.0)
    assert result.effective_sample_size > 0.9 * 400


def test_domain_shift_weights_source_cases_towards_the_target() -> None:
    rng = np.random.default_rng(1)
    source = rng.normal(0.0, 1.0, size=(400, 1))
    result = domain_shift(source, rng.normal(1.5, 1.0, size=(400, 1)))
    assert 0.78 < result.auc < 0.92  # Phi(1.5 / sqrt 2) = 0.856 for the true density ratio
    order = np.argsort(source[:, 0])
    assert np.corrcoef(source[order, 0], np.log(result.source_weights[order]))[0, 1] > 0.99
    assert result.effective_sample_size < 0.5 * 400
