"""Stage 5: seed variability of a recipe, and what averaging the seeds would buy.

One seed's test figures move by about as much as the bootstrap CI, so a recipe is
reported as the mean ± sd over several seeds (sample sd, ddof=1) of each run's own,
validation-selected results. The same runs' saved logits also give the seed ensemble
(mean logits), with its temperature, threshold and strata chosen on validation again:
an upper bound for "ensembling over seeds" that needs no new training.

    pneumonia-train seeds runs/seed-42 runs/seed-7 runs/seed-2026 --out results/seeds
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.calibration import StrataTargets, calibrate, stratum_report
from training.evaluate import calibration_report, full_report
from training.metrics import roc_auc, softmax_pneumonia

REPORTED = ("accuracy", "f1", "auc", "sensitivity", "specificity", "precision", "npv")
POINTS = ("at_0.5", "at_operating_point")


@dataclass(frozen=True)
class SeedRun:
    """What one finished `pneumonia-train run` left on disk."""

    seed: int
    metrics: dict
    run_info: dict
    val_labels: np.ndarray
    val_logits: np.ndarray
    test_labels: np.ndarray
    test_logits: np.ndarray


def load_seed_run(run_dir: Path) -> SeedRun:
    config = json.loads((run_dir / "config.json").read_text())
    predictions = np.load(run_dir / "predictions.npz")
    return SeedRun(seed=int(config["seed"]), metrics=json.loads((run_dir / "results" / "metrics.json").read_text()),
                   run_info=json.loads((run_dir / "run_info.json").read_text()),
                   val_labels=predictions["val_labels"], val_logits=predictions["val_logits"],
                   test_labels=predictions["test_labels"], test_logits=predictions["test_logits"])


def mean_sd(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "sd": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "min": float(array.min()), "max": float(array.max())}


def seed_table(runs: list[SeedRun]) -> dict:
    """Per-seed test figures at both thresholds, and their mean ± sd."""
    per_seed = {str(r.seed): {point: {m: r.metrics["test"][point]["point"][m] for m in REPORTED} for point in POINTS}
                for r in runs}
    summary = {point: {m: mean_sd([per_seed[str(r.seed)][point][m] for r in runs]) for m in REPORTED}
               for point in POINTS}
    timing = {str(r.seed): {"train_seconds": r.run_info["train_seconds"], "train_img_per_s": r.run_info["train_img_per_s"],
                            "runtime": r.run_info["runtime"], "best_epoch": r.run_info["best_epoch"],
                            "validation_auc": r.metrics["validation"]["auc"],
                            "operating_threshold": r.metrics["selection"]["operating_threshold"]} for r in runs}
    return {"per_seed": per_seed, "mean_sd": summary, "runs": timing}


def ensemble(runs: list[SeedRun], targets: StrataTargets, rounds: int) -> dict:
    """Mean logits over seeds; temperature, threshold and strata re-chosen on validation."""
    for run in runs[1:]:
        if not (np.array_equal(run.val_labels, runs[0].val_labels) and np.array_equal(run.test_labels, runs[0].test_labels)):
            raise ValueError(f"seed {run.seed} was evaluated on different images than seed {runs[0].seed}")
    val_logits = np.mean([r.val_logits for r in runs], axis=0)
    test_logits = np.mean([r.test_logits for r in runs], axis=0)
    val_labels, test_labels = runs[0].val_labels, runs[0].test_labels
    fit = calibrate(val_labels, val_logits, targets)
    temperature, threshold, strata = fit.temperature, fit.threshold, fit.strata
    p_val, p_test = softmax_pneumonia(val_logits, temperature), softmax_pneumonia(test_logits, temperature)
    return {
        "seeds": [r.seed for r in runs], "temperature": temperature, "operating_threshold": threshold,
        "validation_auc": roc_auc(val_labels, p_val),
        "strata": [s.__dict__ for s in strata],
        "test": {"at_0.5": full_report(test_labels, p_test, 0.5, rounds, 0),
                 "at_operating_point": full_report(test_labels, p_test, threshold, rounds, 0),
                 "calibration": calibration_report(test_labels, test_logits, temperature),
                 "strata": stratum_report(test_labels, p_test, strata)},
    }


def summarize_seeds(run_dirs: list[Path], out_dir: Path, targets: StrataTargets, rounds: int) -> dict:
    """Write seeds.json and seeds.md for the given finished runs; return the figures."""
    runs = [load_seed_run(d) for d in run_dirs]
    if len({r.seed for r in runs}) != len(runs):
        raise ValueError("each run must have its own seed")
    figures = {"run_dirs": [str(d) for d in run_dirs], **seed_table(runs), "ensemble": ensemble(runs, targets, rounds)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "seeds.json").write_text(json.dumps(figures, indent=2, default=float) + "\n")
    (out_dir / "seeds.md").write_text(seeds_markdown(figures))
    return figures


def seeds_markdown(figures: dict) -> str:
    seeds = list(figures["per_seed"])
    lines = [f"# Seed variability ({len(seeds)} seeds: {', '.join(seeds)})", "",
             "Each seed's figures are its own validation-selected results (test scored once).", ""]
    for point in POINTS:
        lines += [f"## Test, {point.replace('_', ' ')}", "",
                  "| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | ensemble |",
                  "|---|" + "---|" * (len(seeds) + 2)]
        for m in REPORTED:
            stats = figures["mean_sd"][point][m]
            cells = " | ".join(f"{100 * figures['per_seed'][s][point][m]:.2f}" for s in seeds)
            ens = figures["ensemble"]["test"][point]["point"][m]
            lines.append(f"| {m} | {cells} | {100 * stats['mean']:.2f} ± {100 * stats['sd']:.2f} | {100 * ens:.2f} |")
        lines.append("")
    lines += ["## Runs", "", "| seed | runtime | train min | img/s | best epoch | val AUC | op. threshold |",
              "|---|---|---|---|---|---|---|"]
    for s, r in figures["runs"].items():
        lines.append(f"| {s} | {r['runtime']} | {r['train_seconds'] / 60:.1f} | {r['train_img_per_s']:.1f} | "
                     f"{r['best_epoch']} | {r['validation_auc']:.4f} | {r['operating_threshold']:.3f} |")
    return "\n".join(lines) + "\n"

