"""Label-free estimators of a dataset shift, for judging whether validation can see it.

Why: validation shares the training source; a site (or PneumoniaMNIST's test split) is
another. What a site has in volume is unlabeled studies, so the two standard label-free
corrections are measured here (results/shift_diagnosis/PLAN.md):

- covariate shift: a domain classifier separates source from target inputs, and its odds
  weight each source case (importance-weighted validation, Sugiyama et al. 2007);
- label shift: the target's prevalence is estimated from the model's outputs (adjusted
  classify-and-count, Forman 2008 / BBSE, Lipton et al. 2018; EM, Saerens et al. 2002), and the
  posterior is moved from the source prior to the estimated one.

Pure numpy functions (plus scikit-learn's logistic regression), tested against hand-computed
values. Label convention: 1 = pneumonia (positive), 0 = normal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


@dataclass(frozen=True)
class DomainShift:
    """A cross-fitted domain classifier's verdict and the importance weights it implies."""

    auc: float
    """Source-vs-target AUC of held-out predictions: 0.5 when the inputs are indistinguishable."""
    source_weights: np.ndarray
    """p(target | x) / p(source | x), rescaled to mean 1 over the source cases."""
    effective_sample_size: float


def kish_effective_sample_size(weights: np.ndarray) -> float:
    """(sum w)^2 / sum w^2: how many equally weighted cases the weighted sample is worth."""
    weights = np.asarray(weights, dtype=np.float64)
    return float(weights.sum() ** 2 / np.square(weights).sum())


def domain_shift(source: np.ndarray, target: np.ndarray, *, components: int | None = None,
                 strength: float = 0.1, folds: int = 5, seed: int = 0) -> DomainShift:
    """Fit source-vs-target logistic regression, cross-fitted so no case weighs itself.

    Held-out probabilities give both the AUC (is there a shift the inputs show?) and the
    source weights; the class ratio is taken out of the odds so that equal distributions give
    weights of 1 whatever the two sample sizes.
    """
    inputs = np.concatenate([source, target]).astype(np.float64)
    is_target = np.r_[np.zeros(len(source)), np.ones(len(target))]
    steps = [StandardScaler()]
    if components:
        steps.append(PCA(components, random_state=seed))
    steps.append(LogisticRegression(C=strength, max_iter=5000))
    held_out = cross_val_predict(make_pipeline(*steps), inputs, is_target,
                                 cv=StratifiedKFold(folds, shuffle=True, random_state=seed), method="predict_proba")[:, 1]
    held_out = np.clip(held_out, 1e-6, 1 - 1e-6)
    odds = held_out[: len(source)] / (1 - held_out[: len(source)]) * len(source) / len(target)
    weights = odds / odds.mean()
    return DomainShift(auc=float(roc_auc_score(is_target, held_out)), source_weights=weights,
                       effective_sample_size=kish_effective_sample_size(weights))


def weighted_auc(labels: np.ndarray, probability: np.ndarray, weights: np.ndarray) -> float:
    return float(roc_auc_score(labels, probability, sample_weight=weights))


def weighted_specificity(labels: np.ndarray, probability: np.ndarray, weights: np.ndarray, threshold: float) -> float:
    """Weighted share of negatives called negative (p < threshold)."""
    negatives = np.asarray(labels) == 0
    called_negative = np.asarray(probability) < threshold
    return float(np.sum(weights * (negatives & called_negative)) / np.sum(weights * negatives))


def weighted_youden_threshold(labels: np.ndarray, probability: np.ndarray, weights: np.ndarray) -> float:
    """Threshold maximising weighted sensitivity + specificity - 1 (ties: the higher threshold).

    Same convention as `models.calibration.youden_threshold` (positive when p >= threshold).
    """
    fpr, tpr, thresholds = roc_curve(labels, probability, sample_weight=weights, drop_intermediate=False)
    j = tpr - fpr
    best = np.flatnonzero(j == j.max())
    return float(min(thresholds[best].max(), 1.0))


def adjusted_count_prevalence(source_labels: np.ndarray, source_probability: np.ndarray,
                              target_probability: np.ndarray, threshold: float = 0.5) -> float:
    """Target prevalence from the share of target cases called positive, corrected by the source's TPR and FPR.

    q = pi * TPR + (1 - pi) * FPR, so pi = (q - FPR) / (TPR - FPR): exact under pure label
    shift (p(x | y) the same in both sources), clipped to [0, 1].
    """
    labels = np.asarray(source_labels)
    called = np.asarray(source_probability) >= threshold
    tpr, fpr = called[labels == 1].mean(), called[labels == 0].mean()
    if tpr <= fpr:
        raise ValueError("the classifier does not separate the source classes (TPR <= FPR)")
    called_target = float(np.mean(np.asarray(target_probability) >= threshold))
    return float(np.clip((called_target - fpr) / (tpr - fpr), 0.0, 1.0))


def prior_odds_ratio(source_prevalence: float, target_prevalence: float) -> float:
    """By how much the odds of pneumonia change when the prior moves from source to target."""
    return (target_prevalence / (1 - target_prevalence)) / (source_prevalence / (1 - source_prevalence))


def shift_prior(probability: np.ndarray, source_prevalence: float, target_prevalence: float) -> np.ndarray:
    """Bayes' rule for a new prior: posterior odds scale by the ratio of the prior odds."""
    p = np.asarray(probability, dtype=np.float64)
    ratio = prior_odds_ratio(source_prevalence, target_prevalence)
    return ratio * p / (ratio * p + (1 - p))


def em_prevalence(target_probability: np.ndarray, source_prevalence: float, tolerance: float = 1e-10,
                  max_iterations: int = 10_000) -> float:
    """Saerens et al. (2002): the prior at which the re-weighted posteriors average to it."""
    prevalence = source_prevalence
    for _ in range(max_iterations):
        updated = float(np.mean(shift_prior(target_probability, source_prevalence, prevalence)))
        if abs(updated - prevalence) < tolerance:
            return updated
        prevalence = updated
    return prevalence


def threshold_for_prior(source_prevalence: float, target_prevalence: float) -> float:
    """The source-calibrated probability at which the prior-shifted posterior is 0.5."""
    return float(1 / (1 + prior_odds_ratio(source_prevalence, target_prevalence)))
