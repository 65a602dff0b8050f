"""Site adaptation from unlabeled studies (AdaBN on the released ONNX), declared in
results/site_adaptation/PLAN.md before its runs.

Why: validation shares the training source and cannot tell what a change does on another
source; a site has its own unlabeled studies in volume. This measures what
`models.adaptation` (the site's convolution statistics mapped onto the training source's)
does to the ranking on a shifted source, with labels used only to score:

1. 5-fold cross-fitting on the test split (the stand-in site): each fold is scored by the
   model adapted on the other folds' images; paired bootstrap CI of the AUC change against
   the shipped model on the same images; the validation split (same source as training) as
   the control;
2. how many unlabeled studies it needs: adapt on n random test images, score the rest.

    python benchmarks/site_adaptation_study.py --data-root ../shared/data --out results/site_adaptation
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from sklearn.metrics import roc_auc_score

from models.adaptation import FeatureStatistics, adapt, source_statistics
from models.calibration import binary_metrics
from models.card import default_model_path, sha256_of
from models.detector import calibrated_probability
from models.preprocess import preprocess_batch
from worker.samples import load_pneumoniamnist

AT_HALF = ("sensitivity", "specificity", "accuracy")


def logits_of(model: onnx.ModelProto, images: np.ndarray, batch: int = 64) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])


def training_source(model: onnx.ModelProto, data_root: Path, cache: Path) -> FeatureStatistics:
    """Statistics of the 4708 training-split images (no augmentation), cached per model."""
    if cache.is_file():
        return FeatureStatistics.load(cache)
    images, _ = load_pneumoniamnist(data_root, "train")
    batches = (preprocess_batch(images[i:i + 64]) for i in range(0, len(images), 64))
    statistics = source_statistics(model, batches)
    cache.parent.mkdir(parents=True, exist_ok=True)
    statistics.save(cache)
    return statistics


def paired_auc_change(labels: np.ndarray, before: np.ndarray, after: np.ndarray, rounds: int,
                      rng: np.random.Generator) -> dict:
    """AUC before and after, and the percentile bootstrap CI of their paired difference."""
    deltas = []
    while len(deltas) < rounds:
        index = rng.integers(0, len(labels), len(labels))
        if labels[index].min() == labels[index].max():
            continue
        deltas.append(roc_auc_score(labels[index], after[index]) - roc_auc_score(labels[index], before[index]))
    auc_before, auc_after = roc_auc_score(labels, before), roc_auc_score(labels, after)
    return {"auc_shipped": auc_before, "auc_adapted": auc_after, "delta": auc_after - auc_before,
            "delta_ci95": [float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))]}


def at_half(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Decisions at P >= 0.5, which no temperature moves (the card's threshold for 1.1.0)."""
    figures = binary_metrics(labels, calibrated_probability(logits, 1.0), 0.5)
    return {k: figures[k] for k in AT_HALF}


def cross_fitted(model: onnx.ModelProto, source: FeatureStatistics, images: np.ndarray, folds: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """Held-out logits: each fold scored by the model adapted on the other folds' images."""
    fold_of = rng.permutation(len(images)) % folds
    logits = np.zeros((len(images), 2), dtype=np.float32)
    for fold in range(folds):
        held_out = fold_of == fold
        logits[held_out] = logits_of(adapt(model, source, images[~held_out]), images[held_out])
        print(f"  fold {fold + 1}/{folds}: adapted on {int((~held_out).sum())}, scored {int(held_out.sum())}", flush=True)
    return logits, [int((fold_of == f).sum()) for f in range(folds)]


def site_figures(labels: np.ndarray, shipped: np.ndarray, adapted: np.ndarray, rounds: int, seed: int) -> dict:
    figures = paired_auc_change(labels, calibrated_probability(shipped, 1.0), calibrated_probability(adapted, 1.0),
                                rounds, np.random.default_rng(seed))
    return {**figures, "at_0.5_shipped": at_half(labels, shipped), "at_0.5_adapted": at_half(labels, adapted)}


def sample_size_curve(model: onnx.ModelProto, source: FeatureStatistics, images: np.ndarray, labels: np.ndarray,
                      shipped: np.ndarray, sizes: list[int], draws: int, rng: np.random.Generator) -> dict:
    curve = {}
    for n in sizes:
        deltas = []
        for draw in range(draws):
            fitted = np.zeros(len(images), dtype=bool)
            fitted[rng.choice(len(images), n, replace=False)] = True
            adapted = logits_of(adapt(model, source, images[fitted]), images[~fitted])
            rest = labels[~fitted]
            deltas.append(roc_auc_score(rest, calibrated_probability(adapted, 1.0))
                          - roc_auc_score(rest, calibrated_probability(shipped[~fitted], 1.0)))
            print(f"  n={n} draw {draw + 1}/{draws}: delta AUC {deltas[-1]:+.4f}", flush=True)
        curve[str(n)] = {"mean": float(np.mean(deltas)), "sd": float(np.std(deltas, ddof=1)), "deltas": deltas}
    return curve


def markdown(report: dict) -> str:
    def row(name: str, f: dict) -> str:
        lo, hi = f["delta_ci95"]
        halves = " | ".join(f"{100 * f['at_0.5_shipped'][k]:.2f} → {100 * f['at_0.5_adapted'][k]:.2f}" for k in AT_HALF)
        return (f"| {name} | {100 * f['auc_shipped']:.2f} | {100 * f['auc_adapted']:.2f} | "
                f"{100 * f['delta']:+.2f} ({100 * lo:+.2f} to {100 * hi:+.2f}) | {halves} |")

    lines = ["# Site adaptation from unlabeled studies (AdaBN on the released ONNX)", "",
             f"Command: `{report['command']}`  ", f"Model sha256 {report['model_sha256'][:12]}…, source statistics "
             f"from {report['source_images']} training images. Plan and decision rule: PLAN.md.", "",
             f"## {report['folds']}-fold cross-fitting (adapt on the other folds' images, score the held-out fold)", "",
             "| site | AUC shipped | AUC adapted | ΔAUC (paired 95% CI) | sens at 0.5 | spec at 0.5 | acc at 0.5 |",
             "|---|---|---|---|---|---|---|",
             row("test split (stand-in site)", report["test"]), row("validation split (control)", report["validation"]),
             "", "## How many unlabeled studies (adapt on n random test images, score the rest)", "",
             "| n | ΔAUC mean ± sd |", "|---|---|"]
    lines += [f"| {n} | {100 * c['mean']:+.2f} ± {100 * c['sd']:.2f} |" for n, c in report["sample_size"].items()]
    lines += ["", f"**Decision (rule fixed in PLAN.md):** {report['decision']}"]
    return "\n".join(lines) + "\n"


def decide(report: dict) -> str:
    test_ci_above_zero = report["test"]["delta_ci95"][0] > 0
    validation_holds = report["validation"]["delta"] >= -0.002
    verdict = "offered as an opt-in site step" if test_ci_above_zero and validation_holds else "not offered"
    return (f"{verdict} (test ΔAUC CI above 0: {test_ci_above_zero}; validation ΔAUC ≥ -0.002: {validation_holds}). "
            "The shipped model and its headline figures are unchanged either way.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/site_adaptation"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, sha = onnx.load(str(args.model)), sha256_of(args.model)
    source = training_source(model, args.data_root, Path("benchmarks/out") / f"source_statistics_{sha[:12]}.npz")
    report = {"command": "python " + " ".join(sys.argv), "model_sha256": sha, "source_images": source.images,
              "folds": args.folds, "draws": args.draws}
    for split, seed in (("validation", 0), ("test", 0)):
        images, labels = load_pneumoniamnist(args.data_root, "val" if split == "validation" else split)
        inputs = preprocess_batch(images)
        shipped = logits_of(model, inputs)
        print(f"{split}: cross-fitting", flush=True)
        adapted, sizes = cross_fitted(model, source, inputs, args.folds, np.random.default_rng(seed))
        report[split] = {"fold_sizes": sizes, **site_figures(labels, shipped, adapted, args.rounds, seed)}
        (args.out / "study.partial.json").write_text(json.dumps(report, indent=2) + "\n")
        if split == "test":
            print("test: sample-size curve", flush=True)
            report["sample_size"] = sample_size_curve(model, source, inputs, labels, shipped, args.sizes, args.draws,
                                                      np.random.default_rng(1))
    report["decision"] = decide(report)
    report["wall_seconds"] = time.perf_counter() - started
    (args.out / "study.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "study.partial.json").unlink(missing_ok=True)
    text = markdown(report)
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
