"""Site calibration on a shifted source: PneumoniaMNIST's test split playing a hospital's local studies.

Why: the released card's threshold and strata were fitted on validation, which comes from
the training distribution; on the test split (another source) they over-call pneumonia
(results/summary.md). This measures what `pneumonia-worker calibrate` recovers when a site
labels some of its own studies, and how many it needs:

1. the fit `pneumonia-worker calibrate` makes, on all 624 test images each as its own study
   (same fit, same printout): the shipped card vs the stratified 5-fold estimate. The command
   itself refuses the split's 3 byte-identical pairs as copies (README "Site calibration" shows
   its printout for the 621 distinct images); this study, written before that check, keeps them;
2. a learning curve: fit on n labelled cases drawn (stratified) from the test split, score
   the cut-points on the remaining, disjoint test cases; mean ± sd over repeats.

Test labels are used here on purpose, as a stand-in for a site's local labels. These are
site-adaptation figures, not the model's headline figures, which stay validation-only.

    python benchmarks/site_calibration_study.py --data-root ../shared/data --out results/site_calibration
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from models.calibration import StrataTargets, binary_metrics, stratum_report
from models.detector import PneumoniaDetector, calibrated_probability
from models.site_calibration import SiteCalibration, case_logits, fit_calibration, fit_site_calibration, read_cases
from worker.cli import summary
from worker.samples import load_pneumoniamnist, write_labelled_cases

CURVE_METRICS = ("sensitivity", "specificity", "accuracy", "f1", "rule_out_miss_rate", "high_suspicion_ppv")


def draw_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Stratified draw of n cases (the split's class ratio); boolean mask."""
    mask = np.zeros(len(labels), dtype=bool)
    positives = int(round(n * labels.mean()))
    for cls, count in ((1, positives), (0, n - positives)):
        mask[rng.choice(np.flatnonzero(labels == cls), count, replace=False)] = True
    return mask


def held_out_figures(labels: np.ndarray, logits: np.ndarray, fitted_on: np.ndarray,
                     card_temperature: float) -> dict[str, float]:
    """A site of `fitted_on` cases, fitted as `pneumonia-worker calibrate` fits it, scored on the rest."""
    fit = fit_calibration(labels[fitted_on], logits[fitted_on], StrataTargets(), card_temperature)
    rest = ~fitted_on
    probability = calibrated_probability(logits[rest], fit.temperature)
    decision = binary_metrics(labels[rest], probability, fit.threshold)
    strata = stratum_report(labels[rest], probability, fit.strata)
    return {**{k: decision[k] for k in ("sensitivity", "specificity", "accuracy", "f1")},
            "rule_out_miss_rate": strata["likely_normal"]["share_of_pneumonia"],
            "high_suspicion_ppv": strata["high_suspicion"]["ppv"]}


def learning_curve(labels: np.ndarray, logits: np.ndarray, sizes: list[int], repeats: int,
                   card_temperature: float) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    curve = {}
    for n in sizes:
        runs = [held_out_figures(labels, logits, draw_subset(labels, n, rng), card_temperature)
                for _ in range(repeats)]
        curve[str(n)] = {k: {"mean": float(np.nanmean([r[k] for r in runs])),
                             "sd": float(np.nanstd([r[k] for r in runs], ddof=1))} for k in CURVE_METRICS}
    return curve


def markdown(site: SiteCalibration, curve: dict, command: str, repeats: int) -> str:
    def row(name: str, part: dict) -> str:
        m, ci = part["at_threshold"], part["at_threshold_ci95"]
        return f"| {name} | " + " | ".join(f"{100 * m[k]:.2f} ({100 * ci[k][0]:.1f}–{100 * ci[k][1]:.1f})" for k in
                                           ("sensitivity", "specificity", "precision", "npv", "accuracy", "f1")) + " |"

    lines = ["# Site calibration on a shifted source (PneumoniaMNIST test split as the 'site')", "",
             f"Command: `{command}`", "",
             "Test labels stand in for a site's local labels here; the model's headline figures stay "
             "validation-only (results/summary.md).", "",
             f"## All {site.cases['n']} cases: shipped card vs site calibration ({site.cross_validated['folds']}-fold)",
             "", "95% bootstrap CIs over cases in brackets.", "",
             "| calibration | sens | spec | PPV | NPV | acc | F1 |", "|---|---|---|---|---|---|---|",
             row(f"as shipped (threshold {site.as_shipped['threshold']:.3f})", site.as_shipped),
             row("site, k-fold held out", site.cross_validated), "",
             "| stratum | shipped: n | shipped: PPV | shipped: share of pneumonia | site k-fold: n | "
             "site k-fold: PPV | site k-fold: share of pneumonia |", "|---|---|---|---|---|---|---|"]
    for name in site.as_shipped["strata"]:
        a, b = site.as_shipped["strata"][name], site.cross_validated["strata"][name]
        lines.append(f"| {name} | {a['count']} | {a['ppv']:.3f} | {a['share_of_pneumonia']:.3f} | "
                     f"{b['count']} | {b['ppv']:.3f} | {b['share_of_pneumonia']:.3f} |")
    lines += ["", f"## How many labelled local studies: fit on n, score on the other {site.cases['n']} - n "
              f"(mean ± sd over {repeats} draws)", "",
              "| n | sens | spec | acc | F1 | rule-out miss rate | high-suspicion PPV |", "|---|---|---|---|---|---|---|"]
    for n, figures in curve.items():
        lines.append(f"| {n} | " + " | ".join(f"{100 * figures[k]['mean']:.1f} ± {100 * figures[k]['sd']:.1f}"
                                              for k in CURVE_METRICS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/site_calibration"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 80, 160, 320])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    images, labels = load_pneumoniamnist(args.data_root, "test")
    detector = PneumoniaDetector()
    with tempfile.TemporaryDirectory() as scratch:  # through files, as a site would: PNG + cases.csv
        paths, case_labels, lines = read_cases(write_labelled_cases(scratch, images, labels))
        logits = case_logits(detector, paths, lines=lines)
    site = fit_site_calibration(case_labels, logits, detector.card, "pneumoniamnist-test")
    site.save(args.out / "site_calibration.json")
    print(summary(site))
    curve = learning_curve(case_labels, logits, args.sizes, args.repeats, detector.card.temperature)
    command = "python " + " ".join(sys.argv)
    (args.out / "study.json").write_text(json.dumps({"command": command, "repeats": args.repeats,
                                                     "learning_curve": curve}, indent=2) + "\n")
    report = markdown(site, curve, command, args.repeats)
    (args.out / "summary.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
