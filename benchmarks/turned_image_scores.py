"""How the shipped model scores test images stored turned, with the turn check off: why the check exists.

Why: a portable plate read in landscape, or a transcoder that drops Patient Orientation, stores a chest
sideways, and the model never saw one in training. This scores the test split as stored, turned 90,
180 and 270 degrees and flipped upside down, through the serving path with `polarity_check=False`, and
reports AUC and the errors at the card's threshold; beside them, the share the turn check
(`models.polarity`) would refuse.

    python benchmarks/turned_image_scores.py --data-root ../shared/data --out benchmarks/results/turned_image_scores.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from models.detector import PneumoniaDetector
from models.polarity import UPRIGHT, turned_correlations, verdicts
from worker.samples import load_pneumoniamnist

TURNS = {"as_stored": lambda x: x, "turned_90": lambda x: np.rot90(x, 1, axes=(1, 2)),
         "turned_180": lambda x: np.rot90(x, 2, axes=(1, 2)), "turned_270": lambda x: np.rot90(x, 3, axes=(1, 2)),
         "flipped_upside_down": lambda x: x[:, ::-1]}


def probabilities(detector: PneumoniaDetector, images: np.ndarray, chunk: int = 32) -> np.ndarray:
    return np.concatenate([detector.pneumonia_probability(detector.preprocess(list(images[start:start + chunk])))
                           for start in range(0, len(images), chunk)])


def scores(detector: PneumoniaDetector, images: np.ndarray, labels: np.ndarray) -> dict:
    threshold = detector.card.threshold
    figures = {}
    for name, turn in TURNS.items():
        shown = np.ascontiguousarray(turn(images))
        probability = probabilities(detector, shown)
        refused = verdicts(turned_correlations(shown, detector.polarity.template, detector.polarity.margin),
                           detector.polarity.refuse_below, detector.polarity.turned_margin) != UPRIGHT
        missed, overcalled = (labels == 1) & (probability < threshold), (labels == 0) & (probability >= threshold)
        figures[name] = {"auc": round(float(roc_auc_score(labels, probability)), 4),
                         "pneumonia_under_threshold": round(float(missed.sum() / (labels == 1).sum()), 4),
                         "normals_at_or_over_threshold": round(float(overcalled.sum() / (labels == 0).sum()), 4),
                         "refused_by_the_check": round(float(refused.mean()), 4),
                         "refused_pneumonia": int((refused & (labels == 1)).sum()),
                         "refused_normals": int((refused & (labels == 0)).sum()),
                         "missed_pneumonia_refused": f"{int((missed & refused).sum())} of {int(missed.sum())}",
                         "overcalled_normals_refused": f"{int((overcalled & refused).sum())} of {int(overcalled.sum())}"}
        print(name, figures[name], flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/turned_image_scores.json"))
    args = parser.parse_args()
    detector = PneumoniaDetector(polarity_check=False)
    images, labels = load_pneumoniamnist(args.data_root, "test")
    result = {"model": detector.card.name, "version": detector.card.version, "sha256": detector.card.sha256,
              "threshold": detector.card.threshold, "n": int(len(labels)),
              "by_turn": scores(detector, images, labels.astype(int))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
