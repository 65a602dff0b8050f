"""Stage 5: seed variability of a recipe, and what averaging the seeds would buy.

One seed's test figures move by about as much as the bootstrap CI, so a recipe is
reported as the mean ± sd over several seeds (sample sd, ddof=1) of each run's own,
validation-selected results. The same runs' saved logits also give the seed ensemble
(mean logits), with its temperature, threshold and strata chosen on validation again:
an upper bound for "ensembling over seeds" that needs no new training.

    pneumonia-train seeds runs/seed-42 runs/seed-7 runs/seed-2026 --out results/seeds

A recipe change is decided on validation, so the summary also gives each seed's validation
figures and, with ``--baseline results/seeds``, the change in their means against the seeds
of the recipe it would replace (read from the ``seed-*/`` copies a summary leaves behind).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.atomic import write_text
from models.calibration import StrataTargets, calibrate, stratum_report
from models.card import nan_for_null, strict_json
from training.errors import InputMissingError, RefusedError
from training.evaluate import ROC_POINTS, calibration_report, full_report, roc_points
from training.metrics import roc_auc, softmax_pneumonia

REPORTED = ("accuracy", "f1", "auc", "sensitivity", "specificity", "precision", "npv")
POINTS = ("at_0.5", "at_operating_point")
VALIDATION = ("auc", "accuracy_at_0.5", "f1_at_0.5", "sensitivity_at_0.5", "specificity_at_0.5", "nll_calibrated")
KEPT_FILES = ("config.json", "history.json", "run_info.json", "predictions.npz", "results/metrics.json",
              "results/summary.md")
"""What a summary keeps of each run under seed-*/: everything but checkpoints and the ONNX. The
per-image logits (about 15 kB) let a later session re-summarise, ensemble or re-analyse runs
whose checkpoints are gone: a kept folder loads like the run it came from."""


@dataclass(frozen=True)
class SeedRun:
    """What one finished `pneumonia-train run` left on disk."""

    seed: int
    label: str
    """The run's column: its seed; for a soup (whose --seed means nothing) its shared head init;
    for an ensemble graph its members' seeds (`ensemble-42-7-2026`)."""
    metrics: dict
    run_info: dict
    val_labels: np.ndarray
    val_logits: np.ndarray
    test_labels: np.ndarray
    test_logits: np.ndarray


def load_seed_run(run_dir: Path) -> SeedRun:
    """A finished run's out-dir, or the seed-*/ folder a summary kept of it (metrics.json at its top)."""
    check_finished(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    predictions = np.load(run_dir / "predictions.npz")
    run_info = json.loads((run_dir / "run_info.json").read_text())
    label = str(config["seed"])
    if "soup_of" in run_info:
        label = f"soup-init{config['init_seed']}"
    elif "ensemble_of" in run_info:
        label = "ensemble-" + "-".join(str(member["seed"]) for member in run_info["ensemble_of"])
    metrics_file = run_dir / "results" / "metrics.json"
    metrics_file = metrics_file if metrics_file.is_file() else run_dir / "metrics.json"
    return SeedRun(seed=int(config["seed"]), label=label, metrics=read_metrics(metrics_file),
                   run_info=run_info,
                   val_labels=predictions["val_labels"], val_logits=predictions["val_logits"],
                   test_labels=predictions["test_labels"], test_logits=predictions["test_logits"])


def check_finished(run_dir: Path) -> None:
    """Refuse a run that was trained but not evaluated in one line (it was a FileNotFoundError traceback)."""
    evaluated = (run_dir / "results" / "metrics.json").is_file() or (run_dir / "metrics.json").is_file()
    missing = [name for name in ("config.json", "run_info.json", "predictions.npz") if not (run_dir / name).is_file()]
    missing += [] if evaluated else ["results/metrics.json"]
    if missing:
        raise InputMissingError(f"{run_dir} holds no {', '.join(missing)}: summarise runs that were evaluated "
                                "(`pneumonia-train run`, or `evaluate` after `train`)")


def read_metrics(path: Path) -> dict:
    """A metrics.json; null there is a number that had no finite value (an empty stratum's PPV, a
    precision without positive calls) and is read back as NaN, as it was computed."""
    return nan_for_null(json.loads(path.read_text()))


def mean_sd(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "sd": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "min": float(array.min()), "max": float(array.max())}


def validation_figures(metrics: dict) -> dict[str, float]:
    """The validation figures a recipe change is decided on, from one run's metrics.json."""
    val = metrics["validation"]
    figures = {"auc": val["auc"], "nll_calibrated": val["calibration"]["nll_after"]}
    figures |= {f"{m}_at_0.5": val["at_0.5"][m] for m in ("accuracy", "f1", "sensitivity", "specificity")}
    return figures


def validation_table(all_metrics: list[dict]) -> dict[str, dict[str, float]]:
    """Mean ± sd over seeds of each validation figure."""
    per_seed = [validation_figures(m) for m in all_metrics]
    return {name: mean_sd([f[name] for f in per_seed]) for name in VALIDATION}


def baseline_metrics(baseline_dir: Path) -> list[dict]:
    """Per-seed metrics of an earlier summary, from the seed-*/ copies it left behind."""
    files = sorted(f for pattern in ("seed-*", "soup-*", "ensemble-*") for f in baseline_dir.glob(f"{pattern}/metrics.json"))
    if not files:
        raise InputMissingError(f"no seed-*/metrics.json under {baseline_dir}: is it the --out of a `seeds` summary?")
    return [read_metrics(f) for f in files]


def validation_comparison(candidate: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]]) -> dict:
    """Change of each mean validation figure, with the baseline's own sd to read it against."""
    return {name: {"baseline_mean": baseline[name]["mean"], "baseline_sd": baseline[name]["sd"],
                   "candidate_mean": candidate[name]["mean"], "candidate_sd": candidate[name]["sd"],
                   "delta": candidate[name]["mean"] - baseline[name]["mean"]} for name in VALIDATION}


def kept_epoch(run_info: dict) -> int | str | None:
    """The picked epoch, or `swa A-B` where a weight average of those epochs is the run's model."""
    swa = run_info.get("swa")
    return f"swa {swa['epochs'][0]}-{swa['epochs'][-1]}" if swa else run_info["best_epoch"]


def seed_table(runs: list[SeedRun]) -> dict:
    """Per-seed test figures at both thresholds, and their mean ± sd."""
    per_seed = {r.label: {point: {m: r.metrics["test"][point]["point"][m] for m in REPORTED} for point in POINTS}
                for r in runs}
    summary = {point: {m: mean_sd([per_seed[r.label][point][m] for r in runs]) for m in REPORTED}
               for point in POINTS}
    timing = {r.label: {"train_seconds": r.run_info["train_seconds"], "train_img_per_s": r.run_info["train_img_per_s"],
                            "runtime": r.run_info["runtime"], "best_epoch": kept_epoch(r.run_info),
                            "validation_auc": r.metrics["validation"]["auc"],
                            "operating_threshold": r.metrics["selection"]["operating_threshold"]} for r in runs}
    roc = {}
    if all("roc_points" in r.metrics["test"] for r in runs):  # runs scored before 2026-11-26 lack them
        roc_per_seed = {r.label: r.metrics["test"]["roc_points"]["point"] for r in runs}
        roc = {"per_seed": roc_per_seed, "mean_sd": {n: mean_sd([roc_per_seed[r.label][n] for r in runs]) for n in ROC_POINTS}}
    return {"per_seed": per_seed, "mean_sd": summary, "runs": timing, "roc_points": roc,
            "validation": {"per_seed": {r.label: validation_figures(r.metrics) for r in runs},
                           "mean_sd": validation_table([r.metrics for r in runs])}}


def ensemble(runs: list[SeedRun], targets: StrataTargets, rounds: int) -> dict:
    """Mean logits over seeds; temperature, threshold and strata re-chosen on validation."""
    for run in runs[1:]:
        if not (np.array_equal(run.val_labels, runs[0].val_labels) and np.array_equal(run.test_labels, runs[0].test_labels)):
            raise RefusedError(f"run {run.label} was evaluated on different images than run {runs[0].label}")
    val_logits = np.mean([r.val_logits for r in runs], axis=0)
    test_logits = np.mean([r.test_logits for r in runs], axis=0)
    val_labels, test_labels = runs[0].val_labels, runs[0].test_labels
    fit = calibrate(val_labels, val_logits, targets)
    temperature, threshold, strata = fit.temperature, fit.threshold, fit.strata
    p_val, p_test = softmax_pneumonia(val_logits, temperature), softmax_pneumonia(test_logits, temperature)
    return {
        "seeds": [r.label for r in runs], "temperature": temperature, "operating_threshold": threshold,
        "validation_auc": roc_auc(val_labels, p_val),
        "strata": [s.__dict__ for s in strata],
        "test": {"at_0.5": full_report(test_labels, p_test, 0.5, rounds, 0),
                 "at_operating_point": full_report(test_labels, p_test, threshold, rounds, 0),
                 "roc_points": roc_points(test_labels, p_test, rounds, 0),
                 "calibration": calibration_report(test_labels, test_logits, temperature),
                 "strata": stratum_report(test_labels, p_test, strata)},
    }


def keep_run_files(runs: list[SeedRun], run_dirs: list[Path], out_dir: Path) -> None:
    """Copy each run's small, committable files (no checkpoints) to out_dir/seed-N/."""
    for run, run_dir in zip(runs, run_dirs):
        for name in KEPT_FILES:
            source = run_dir / name
            if source.exists():
                target = out_dir / run_folder(run.label) / Path(name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)


def summarize_seeds(run_dirs: list[Path], out_dir: Path, targets: StrataTargets, rounds: int,
                    baseline_dir: Path | None = None) -> dict:
    """Write seeds.json, seeds.md and seed-*/ for the given finished runs; return the figures."""
    runs = [load_seed_run(d) for d in run_dirs]
    if len({r.label for r in runs}) != len(runs):
        raise RefusedError("each run must have its own seed (each soup its own --init-seed)")
    figures = {"run_dirs": [str(d) for d in run_dirs], **seed_table(runs), "ensemble": ensemble(runs, targets, rounds)}
    if baseline_dir is not None:
        baseline = validation_table(baseline_metrics(baseline_dir))
        figures["validation"]["against_baseline"] = {
            "baseline": str(baseline_dir), **validation_comparison(figures["validation"]["mean_sd"], baseline)}
    refuse_other_runs(out_dir, {run_folder(r.label) for r in runs})
    out_dir.mkdir(parents=True, exist_ok=True)
    keep_run_files(runs, run_dirs, out_dir)
    write_text(out_dir / "seeds.json", strict_json(figures, indent=2) + "\n")
    write_text(out_dir / "seeds.md", seeds_markdown(figures))
    return figures


def run_folder(label: str) -> str:
    """Where a run's kept files go in a summary: seed-N/, or the soup's or ensemble's own label."""
    return f"seed-{label}" if is_seed(label) else label


def refuse_other_runs(out_dir: Path, folders: set[str]) -> None:
    """A summary's folder holds its own runs only: those of an earlier summary into the same --out stayed
    beside the new seeds.json, and a later --baseline on it averaged runs the summary no longer lists."""
    if not out_dir.is_dir():
        return
    others = sorted(entry.name for entry in out_dir.iterdir() if entry.is_dir() and entry.name not in folders
                    and entry.name.split("-")[0] in ("seed", "soup", "ensemble"))
    if others:
        raise RefusedError(f"{out_dir} holds runs this summary does not list ({', '.join(others)}): give another --out "
                           "or remove them")


def is_seed(label: str) -> bool:
    """A plain run is labelled by its seed; a soup by its shared head init (`soup-init0`)."""
    return label.lstrip("-").isdigit()


def column(label: str) -> str:
    return f"seed {label}" if is_seed(label) else label


def seeds_markdown(figures: dict) -> str:
    seeds = list(figures["per_seed"])
    lines = [f"# Seed variability ({len(seeds)} seeds: {', '.join(seeds)})", "",
             "Each seed's figures are its own validation-selected results (test scored once).", ""]
    for point in POINTS:
        lines += [f"## Test, {point.replace('_', ' ')}", "",
                  "| metric | " + " | ".join(column(s) for s in seeds) + " | mean ± sd | ensemble |",
                  "|---|" + "---|" * (len(seeds) + 2)]
        for m in REPORTED:
            stats = figures["mean_sd"][point][m]
            cells = " | ".join(f"{100 * figures['per_seed'][s][point][m]:.2f}" for s in seeds)
            ens = figures["ensemble"]["test"][point]["point"][m]
            lines.append(f"| {m} | {cells} | {100 * stats['mean']:.2f} ± {100 * stats['sd']:.2f} | {100 * ens:.2f} |")
        lines.append("")
    lines += roc_markdown(figures, seeds)
    lines += validation_markdown(figures["validation"], seeds)
    lines += ["## Runs", "", "| seed | runtime | train min | img/s | best epoch | val AUC | op. threshold |",
              "|---|---|---|---|---|---|---|"]
    for s, r in figures["runs"].items():
        lines.append(f"| {s} | {r['runtime']} | {r['train_seconds'] / 60:.1f} | {r['train_img_per_s']:.1f} | "
                     f"{r['best_epoch']} | {r['validation_auc']:.4f} | {r['operating_threshold']:.3f} |")
    return "\n".join(lines) + "\n"



def roc_markdown(figures: dict, seeds: list[str]) -> list[str]:
    """Each seed's test ROC read at the original design's point, when every run has it."""
    roc = figures["roc_points"]
    if not roc:
        return []
    lines = ["## Test ROC at the original design's point (threshold-free, like AUC)", "",
             "| figure | " + " | ".join(column(s) for s in seeds) + " | mean ± sd | ensemble |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for name in ROC_POINTS:
        cells = " | ".join(f"{100 * roc['per_seed'][s][name]:.2f}" for s in seeds)
        stats, ens = roc["mean_sd"][name], figures["ensemble"]["test"]["roc_points"]["point"][name]
        lines.append(f"| {name.replace('_', ' ')} | {cells} | {100 * stats['mean']:.2f} ± {100 * stats['sd']:.2f} | "
                     f"{100 * ens:.2f} |")
    return lines + [""]


def validation_markdown(validation: dict, seeds: list[str]) -> list[str]:
    """Validation figures per seed (what a recipe change is decided on), and against a baseline."""
    lines = ["## Validation (decides recipe changes)", "",
             "| figure | " + " | ".join(column(s) for s in seeds) + " | mean ± sd |", "|---|" + "---|" * (len(seeds) + 1)]
    for name in VALIDATION:
        cells = " | ".join(f"{validation['per_seed'][s][name]:.4f}" for s in seeds)
        stats = validation["mean_sd"][name]
        lines.append(f"| {name} | {cells} | {stats['mean']:.4f} ± {stats['sd']:.4f} |")
    lines.append("")
    if "against_baseline" in validation:
        compared = validation["against_baseline"]
        lines += [f"Against the baseline `{compared['baseline']}` (means over its seeds):", "",
                  "| figure | baseline mean ± sd | this mean ± sd | change |", "|---|---|---|---|"]
        for name in VALIDATION:
            row = compared[name]
            lines.append(f"| {name} | {row['baseline_mean']:.4f} ± {row['baseline_sd']:.4f} | "
                         f"{row['candidate_mean']:.4f} ± {row['candidate_sd']:.4f} | {row['delta']:+.4f} |")
        lines.append("")
    return lines
