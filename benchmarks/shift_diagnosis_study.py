"""Can validation see the test source's shift without its labels? Declared in
results/shift_diagnosis/PLAN.md before its runs.

Why: every method so far was chosen on a validation split from the training source, which
is nearly separable and blind to what a change does on another source. This measures the two
standard label-free corrections a site could run on its unlabeled studies (training/shift.py):
importance-weighted validation (covariate shift) and prevalence estimation (label shift), and
then, with the test labels, describes where the shift actually lies.

    python benchmarks/shift_diagnosis_study.py --data-root ../shared/data --out results/shift_diagnosis
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
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from models.calibration import binary_metrics, youden_threshold
from models.card import default_model_path, sha256_of
from models.detector import calibrated_probability
from models.preprocess import preprocess_batch
from training.metrics import roc_auc
from training.seeds import load_seed_run
from training.shift import (DomainShift, adjusted_count_prevalence, domain_shift, em_prevalence, threshold_for_prior,
                            weighted_auc, weighted_specificity, weighted_youden_threshold)
from worker.samples import load_pneumoniamnist

KEPT = Path("results/ablations/int8_ensemble")
MODELS = {"seed 42": KEPT / "replicate1_singles/seed-42", "seed 7": KEPT / "replicate1_singles/seed-7",
          "seed 2026": KEPT / "replicate1_singles/seed-2026", "ensemble": KEPT / "replicate1_ensemble/ensemble-42-7-2026"}
POOLED = "mean"  # the released graph's global-average-pool output, (N, 2048, 1, 1)
CONTROL_TRAIN_CASES = 800


def released_outputs(model_path: Path, images: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(logits, pooled 2048-d features) of the shipped ONNX on the one preprocessing function."""
    model = onnx.load(str(model_path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(POOLED, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, pooled = [], []
    for start in range(0, len(images), batch):
        out_logits, out_pooled = session.run(["logits", POOLED], {"image": preprocess_batch(images[start:start + batch])})
        logits.append(out_logits)
        pooled.append(out_pooled.reshape(len(out_pooled), -1))
    return np.concatenate(logits), np.concatenate(pooled)


def cached_outputs(model_path: Path, split: str, images: np.ndarray, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    path = cache / f"{sha256_of(model_path)[:12]}-{split}-{len(images)}.npz"
    if not path.is_file():
        logits, pooled = released_outputs(model_path, images)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, logits=logits, pooled=pooled)
    with np.load(path) as saved:
        return saved["logits"], saved["pooled"]


def kept_model(run_dir: Path) -> dict:
    """Validation/test logits and the validation-fitted temperature of a kept run."""
    run = load_seed_run(run_dir)
    temperature = run.metrics["selection"]["temperature"]
    return {"p_val": calibrated_probability(run.val_logits, temperature),
            "p_test": calibrated_probability(run.test_logits, temperature),
            "val_logits": run.val_logits, "test_logits": run.test_logits, "temperature": temperature}


def describe_shift(shift: DomainShift) -> dict:
    weights = shift.source_weights
    return {"auc": shift.auc, "effective_sample_size": shift.effective_sample_size, "n_source": len(weights),
            "weight_quantiles": dict(zip(("min", "p5", "median", "p95", "max"),
                                         np.quantile(weights, [0, 0.05, 0.5, 0.95, 1]).round(4).tolist()))}


def scored_threshold(labels: np.ndarray, probability: np.ndarray, threshold: float) -> dict:
    figures = binary_metrics(labels, probability, threshold)
    return {"threshold": threshold, "sensitivity": figures["sensitivity"], "specificity": figures["specificity"],
            "accuracy": figures["accuracy"], "balanced_accuracy": (figures["sensitivity"] + figures["specificity"]) / 2}


def operating_points(model: dict, val_labels: np.ndarray, test_labels: np.ndarray, weights: dict[str, np.ndarray],
                     prevalence: dict[str, float]) -> dict:
    """Q3: every candidate threshold, chosen without test labels, scored on test."""
    source_prevalence = float(val_labels.mean())
    thresholds = {"shipped 0.5": 0.5, "validation Youden": youden_threshold(val_labels, model["p_val"])}
    for name, w in weights.items():
        thresholds[f"weighted Youden ({name})"] = weighted_youden_threshold(val_labels, model["p_val"], w)
    for name, estimate in prevalence.items():
        thresholds[f"prior shift ({name})"] = threshold_for_prior(source_prevalence, estimate)
    return {name: scored_threshold(test_labels, model["p_test"], t) for name, t in thresholds.items()}


def validation_signal(model: dict, val_labels: np.ndarray, test_labels: np.ndarray, weights: dict[str, np.ndarray]) -> dict:
    """Q4: does weighted validation predict test AUC and specificity at 0.5?"""
    val_auc, test_auc = roc_auc(val_labels, model["p_val"]), roc_auc(test_labels, model["p_test"])
    out = {"validation": {"auc": val_auc, "specificity_at_0.5": binary_metrics(val_labels, model["p_val"], 0.5)["specificity"]},
           "test": {"auc": test_auc, "specificity_at_0.5": binary_metrics(test_labels, model["p_test"], 0.5)["specificity"]}}
    for name, w in weights.items():
        weighted = weighted_auc(val_labels, model["p_val"], w)
        out[f"weighted ({name})"] = {"auc": weighted, "specificity_at_0.5": weighted_specificity(val_labels, model["p_val"], w, 0.5),
                                      "auc_gap_closed": (val_auc - weighted) / (val_auc - test_auc)}
    return out


def neighbour_labels(val_features: np.ndarray, val_labels: np.ndarray, query: np.ndarray, k: int = 10) -> float:
    """Mean share of pneumonia among each query's k nearest validation cases (standardised PCA-64 space)."""
    space = make_pipeline(StandardScaler(), PCA(64, random_state=0)).fit(val_features)
    index = NearestNeighbors(n_neighbors=k).fit(space.transform(val_features))
    _, neighbours = index.kneighbors(space.transform(query))
    return float(val_labels[neighbours].mean())


def where_the_shift_lies(pixels: dict, features: dict, labels: dict, p_released: dict) -> dict:
    """Q5 (uses test labels, descriptive): class-conditional shift and where the false positives sit."""
    out: dict = {}
    for cls, name in ((0, "normal"), (1, "pneumonia")):
        out[f"domain_auc_{name}"] = {
            source: domain_shift(data["val"][labels["val"] == cls], data["test"][labels["test"] == cls],
                                 components=64 if source == "features" else None,
                                 strength=0.1 if source == "features" else 0.01).auc
            for source, data in (("features", features), ("pixels", pixels))}
        out[f"share_over_0.5_{name}"] = {split: float(np.mean(p_released[split][labels[split] == cls] >= 0.5))
                                          for split in ("val", "test")}
    called = p_released["test"] >= 0.5
    groups = {"test false positives": (labels["test"] == 0) & called, "test true negatives": (labels["test"] == 0) & ~called,
              "test true positives": (labels["test"] == 1) & called, "test false negatives": (labels["test"] == 1) & ~called}
    out["pneumonia_share_of_10_nearest_validation_cases"] = {
        name: {"n": int(mask.sum()), "share": neighbour_labels(features["val"], labels["val"], features["test"][mask])}
        for name, mask in groups.items() if mask.any()}
    return out


def shared_false_positives(models: dict[str, dict], test_labels: np.ndarray, seeds: tuple[str, ...]) -> dict:
    """Added after the plan (descriptive): are the test false positives at 0.5 the same images for every seed?"""
    called = [set(np.flatnonzero((test_labels == 0) & (models[s]["p_test"] >= 0.5)).tolist()) for s in seeds]
    union = set().union(*called)
    return {"per_seed": dict(zip(seeds, map(len, called))), "all_seeds": len(set.intersection(*called)),
            "at_least_two": sum(sum(i in c for c in called) >= 2 for i in union), "any_seed": len(union)}


def decisions(points: dict, signals: dict, shifts: dict) -> dict:
    """The plan's two rules, applied as written."""
    corrections = [name for name in next(iter(points.values())) if name not in ("shipped 0.5", "validation Youden")]
    offered = {}
    for name in corrections:
        gains = [p[name]["balanced_accuracy"] - p["shipped 0.5"]["balanced_accuracy"] for p in points.values()]
        offered[name] = bool(all(p[name]["balanced_accuracy"] > max(p["shipped 0.5"]["balanced_accuracy"],
                                                                    p["validation Youden"]["balanced_accuracy"])
                                 and p[name]["sensitivity"] >= 0.95 for p in points.values())
                             and np.mean(gains) >= 0.01)
    signal = {}
    for source in shifts:
        key = f"weighted ({source})"
        signal[source] = bool(all(s[key]["auc_gap_closed"] >= 0.5 for s in signals.values())
                              and shifts[source]["effective_sample_size"] >= 100)
    return {"operating_point_correction_offered": offered, "weighted_validation_is_a_signal": signal}


def run(data_root: Path, model_path: Path, cache: Path) -> dict:
    images, labels = {}, {}
    for split in ("val", "test", "train"):
        images[split], labels[split] = load_pneumoniamnist(data_root, split)
    control = np.random.default_rng(0).permutation(len(images["train"]))[:CONTROL_TRAIN_CASES]
    images["train"], labels["train"] = images["train"][control], labels["train"][control]
    outputs = {split: cached_outputs(model_path, split, images[split], cache) for split in images}
    features = {split: pooled for split, (_, pooled) in outputs.items()}
    pixels = {split: images[split].reshape(len(images[split]), -1).astype(np.float64) for split in images}

    shifts = {"features": domain_shift(features["val"], features["test"], components=64),
              "pixels": domain_shift(pixels["val"], pixels["test"], strength=0.01)}
    controls = {"features": domain_shift(features["train"], features["val"], components=64).auc,
                "pixels": domain_shift(pixels["train"], pixels["val"], strength=0.01).auc}
    weights = {name: shift.source_weights for name, shift in shifts.items()}

    models = {name: kept_model(path) for name, path in MODELS.items()}
    released = models["seed 42"]
    parity = float(np.abs(outputs["val"][0] - released["val_logits"]).max())
    prevalence, points, signals = {}, {}, {}
    for name, model in models.items():
        prevalence[name] = {"adjusted count": adjusted_count_prevalence(labels["val"], model["p_val"], model["p_test"]),
                            "EM": em_prevalence(model["p_test"], float(labels["val"].mean()))}
        points[name] = operating_points(model, labels["val"], labels["test"], weights, prevalence[name])
        signals[name] = validation_signal(model, labels["val"], labels["test"], weights)
    described = {name: describe_shift(shift) for name, shift in shifts.items()}
    return {
        "model": {"file": model_path.name, "sha256": sha256_of(model_path),
                  "released_vs_kept_seed42_val_logits_max_abs_diff": parity},
        "q1_detection": {"validation_vs_test": described, "control_train800_vs_validation_auc": controls},
        "q2_prevalence": {"truth_test": float(labels["test"].mean()), "validation": float(labels["val"].mean()),
                          "estimates": prevalence},
        "q3_operating_points_on_test": points,
        "q4_validation_signal": signals,
        "q5_where_the_shift_lies": where_the_shift_lies(
            pixels, features, labels, {split: calibrated_probability(outputs[split][0], released["temperature"])
                                       for split in ("val", "test")}),
        "q5_false_positives_across_seeds": shared_false_positives(models, labels["test"], ("seed 42", "seed 7", "seed 2026")),
        "decisions": decisions(points, signals, described),
    }


def percent(value: float) -> str:
    return f"{100 * value:.2f}"


def summary_markdown(study: dict) -> str:
    q1, q2 = study["q1_detection"], study["q2_prevalence"]
    lines = ["# Shift diagnosis: can validation see the test source without its labels?", "",
             f"Declared in [PLAN.md](PLAN.md); `{study['command']}`.", "",
             "## Q1 detection (no labels): domain classifier AUC, 5-fold cross-fitted", "",
             "| inputs | validation vs test | control: training vs validation | Kish ESS of validation weights (of 524) |",
             "|---|---|---|---|"]
    for source, described in q1["validation_vs_test"].items():
        lines.append(f"| {source} | {described['auc']:.3f} | {q1['control_train800_vs_validation_auc'][source]:.3f} "
                     f"| {described['effective_sample_size']:.0f} |")
    lines += ["", f"## Q2 prevalence (no labels): truth {percent(q2['truth_test'])}%, validation {percent(q2['validation'])}%", "",
              "| model | adjusted count | EM |", "|---|---|---|"]
    lines += [f"| {name} | {percent(e['adjusted count'])} | {percent(e['EM'])} |" for name, e in q2["estimates"].items()]
    lines += ["", "## Q3 operating points chosen without test labels, scored on test", "",
              "| model | threshold rule | threshold | sensitivity | specificity | balanced acc. | accuracy |",
              "|---|---|---|---|---|---|---|"]
    for name, points in study["q3_operating_points_on_test"].items():
        lines += [f"| {name} | {rule} | {p['threshold']:.3f} | {percent(p['sensitivity'])} | {percent(p['specificity'])} "
                  f"| {percent(p['balanced_accuracy'])} | {percent(p['accuracy'])} |" for rule, p in points.items()]
    lines += ["", "## Q4 weighted validation as a signal for the test source", "",
              "| model | figure | validation | weighted (features) | weighted (pixels) | test |", "|---|---|---|---|---|---|"]
    for name, s in study["q4_validation_signal"].items():
        for figure in ("auc", "specificity_at_0.5"):
            lines.append(f"| {name} | {figure} | {percent(s['validation'][figure])} | {percent(s['weighted (features)'][figure])} "
                         f"| {percent(s['weighted (pixels)'][figure])} | {percent(s['test'][figure])} |")
        lines.append(f"| {name} | share of the validation→test AUC gap closed | | "
                     f"{s['weighted (features)']['auc_gap_closed']:.2f} | {s['weighted (pixels)']['auc_gap_closed']:.2f} | |")
    q5 = study["q5_where_the_shift_lies"]
    lines += ["", "## Q5 where the shift lies (uses test labels; descriptive, released model)", "",
              "| class | domain AUC features | domain AUC pixels | share ≥ 0.5 validation | share ≥ 0.5 test |",
              "|---|---|---|---|---|"]
    for name in ("normal", "pneumonia"):
        auc, share = q5[f"domain_auc_{name}"], q5[f"share_over_0.5_{name}"]
        lines.append(f"| {name} | {auc['features']:.3f} | {auc['pixels']:.3f} | {percent(share['val'])} | {percent(share['test'])} |")
    lines += ["", "| test cases (released model at 0.5) | n | pneumonia share of their 10 nearest validation cases |", "|---|---|---|"]
    lines += [f"| {name} | {g['n']} | {g['share']:.3f} |" for name, g in q5["pneumonia_share_of_10_nearest_validation_cases"].items()]
    shared = study["q5_false_positives_across_seeds"]
    lines += ["", f"Test false positives at 0.5 per seed {shared['per_seed']}: {shared['all_seeds']} are the same images for "
              f"all three seeds, {shared['at_least_two']} for at least two, {shared['any_seed']} for any (added after the plan; "
              "descriptive)."]
    lines += ["", "## Decisions (the plan's rules)", "", "```json", json.dumps(study["decisions"], indent=2), "```", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/out/shift_features"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/shift_diagnosis"),
                        help="results/shift_diagnosis holds the committed run")
    args = parser.parse_args()
    started = time.perf_counter()
    study = {"command": "python " + " ".join(sys.argv), **run(args.data_root, args.model, args.cache)}
    study["wall_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    summary = summary_markdown(study)
    (args.out / "summary.md").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
