"""Confidence strata for worklist triage, with cut-points chosen on validation.

- likely_normal:   p < rule_out cut. The cut is the highest that keeps validation
                   sensitivity of "not likely_normal" >= target (0.98 by default).
- indeterminate:   between the cuts.
- high_suspicion:  p >= rule_in cut, the lowest cut keeping validation specificity >= target.
"""

from __future__ import annotations

import numpy as np

from models.card import Stratum, validate_strata
from training.config import StrataTargets
from training.metrics import threshold_for_sensitivity, threshold_for_specificity


def choose_strata(labels: np.ndarray, probability: np.ndarray, targets: StrataTargets) -> tuple[Stratum, ...]:
    rule_out = threshold_for_sensitivity(labels, probability, targets.rule_out_sensitivity)
    rule_in = max(threshold_for_specificity(labels, probability, targets.high_suspicion_specificity), rule_out)
    rule_in = min(rule_in, 1.0)
    strata = (
        Stratum("likely_normal", 0.0, rule_out,
                f"validation sensitivity of the other strata >= {targets.rule_out_sensitivity}"),
        Stratum("indeterminate", rule_out, rule_in, "between the rule-out and rule-in cut-points"),
        Stratum("high_suspicion", rule_in, 1.0,
                f"validation specificity >= {targets.high_suspicion_specificity}"),
    )
    validate_strata(strata)
    return strata


def stratum_report(labels: np.ndarray, probability: np.ndarray, strata: tuple[Stratum, ...]) -> dict[str, dict]:
    """Per stratum: count, pneumonia share (the PPV of calling it pneumonia) and normal share (NPV)."""
    labels, probability = np.asarray(labels), np.asarray(probability)
    report = {}
    for i, stratum in enumerate(strata):
        upper_ok = probability <= stratum.upper if i == len(strata) - 1 else probability < stratum.upper
        members = (probability >= stratum.lower) & upper_ok
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
