"""How should a Display Shutter reach the model? Declared in results/display_shutter/PLAN.md.

Why: a collimated DX/CR stores its bright unexposed border and declares a Display Shutter that
viewers paint black; the model's training images show neither border. This collimates PneumoniaMNIST
validation and test images (a random field of 70-90% of each side, white outside) and scores three
renderings with the released model against the un-collimated image: the border as stored, painted
black, and cropped to the shutter's bounding box. Validation decides; test is reported.

    python benchmarks/display_shutter_study.py --data-root ../shared/data --out results/display_shutter
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from models.detector import PneumoniaDetector
from training.metrics import roc_auc
from worker.samples import load_pneumoniamnist

SIZE = 224
FIELD_SHARE = (0.70, 0.90)
RENDERINGS = ("original", "as_stored", "painted", "cropped")


def collimated_field(rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a field covering 70-90% of each side, placed at random."""
    height, width = (int(round(SIZE * rng.uniform(*FIELD_SHARE))) for _ in range(2))
    top, left = int(rng.integers(0, SIZE - height + 1)), int(rng.integers(0, SIZE - width + 1))
    return top, top + height, left, left + width


def render(image: np.ndarray, field: tuple[int, int, int, int], rendering: str) -> np.ndarray:
    """One 28 x 28 uint8 image at 224 x 224, collimated to `field` and shown as `rendering`."""
    full = np.repeat(np.repeat(image, SIZE // image.shape[0], axis=0), SIZE // image.shape[1], axis=1)
    if rendering == "original":
        return full
    top, bottom, left, right = field
    if rendering == "cropped":
        return full[top:bottom, left:right].copy()
    border = 255 if rendering == "as_stored" else 0
    shown = np.full_like(full, border)
    shown[top:bottom, left:right] = full[top:bottom, left:right]
    return shown


def probabilities(detector: PneumoniaDetector, images: list[np.ndarray], chunk: int = 16) -> np.ndarray:
    out = [detector.pneumonia_probability(detector.preprocess(images[start:start + chunk]))
           for start in range(0, len(images), chunk)]
    return np.concatenate(out)


def split_figures(detector: PneumoniaDetector, images: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    fields = [collimated_field(rng) for _ in images]
    scores = {name: probabilities(detector, [render(im, f, name) for im, f in zip(images, fields)])
              for name in RENDERINGS}
    strata = {name: np.array([detector.card.stratum_for(float(p)) for p in scores[name]]) for name in RENDERINGS}
    figures = {}
    for name in RENDERINGS:
        figures[name] = {
            "auc": roc_auc(labels, scores[name]),
            "pneumonias_likely_normal": int(((strata[name] == "likely_normal") & (labels == 1)).sum()),
            "normals_high_suspicion": int(((strata[name] == "high_suspicion") & (labels == 0)).sum()),
            "stratum_agreement_with_original": float((strata[name] == strata["original"]).mean()),
            "mean_abs_dp_to_original": float(np.abs(scores[name] - scores["original"]).mean()),
        }
    figures["paired_auc_gap_ci95"] = {f"as_stored - {name}": paired_auc_gap(labels, scores["as_stored"], scores[name])
                                      for name in ("painted", "cropped")}
    return figures


def paired_auc_gap(labels: np.ndarray, first: np.ndarray, second: np.ndarray, rounds: int = 2000) -> list[float]:
    """95% bootstrap interval of AUC(first) - AUC(second), the same resampled images for both."""
    rng = np.random.default_rng(1)
    gaps = []
    for _ in range(rounds):
        pick = rng.integers(0, len(labels), len(labels))
        if labels[pick].min() != labels[pick].max():
            gaps.append(roc_auc(labels[pick], first[pick]) - roc_auc(labels[pick], second[pick]))
    return [float(np.percentile(gaps, 2.5)), float(np.percentile(gaps, 97.5))]


def decide(validation: dict[str, dict]) -> str:
    """Highest validation AUC; within 0.001 of it, the most stratum agreement with the original."""
    candidates = [name for name in RENDERINGS if name != "original"]
    best_auc = max(validation[name]["auc"] for name in candidates)
    close = [name for name in candidates if validation[name]["auc"] >= best_auc - 0.001]
    return max(close, key=lambda name: validation[name]["stratum_agreement_with_original"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/display_shutter"))
    args = parser.parse_args()
    detector = PneumoniaDetector()
    started = time.perf_counter()
    result: dict = {"model_sha256": detector.card.sha256, "field_share": FIELD_SHARE, "size": SIZE, "splits": {}}
    for split in ("val", "test"):
        images, labels = load_pneumoniamnist(args.data_root, split)
        result["splits"][split] = split_figures(detector, images, labels)
        for name, row in result["splits"][split].items():
            if name == "paired_auc_gap_ci95":
                print(f"{split:5s} paired AUC gap 95% CI: {row}", flush=True)
                continue
            print(f"{split:5s} {name:10s} " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in row.items()), flush=True)
    result["decision"] = decide(result["splits"]["val"])
    result["seconds"] = round(time.perf_counter() - started, 1)
    print("decision (validation):", result["decision"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
