"""Human-readable results: metrics JSON, a Markdown summary and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from models.atomic import write_text  # noqa: E402
from models.card import strict_json  # noqa: E402
from training.evaluate import Evaluation  # noqa: E402
from training.metrics import softmax_pneumonia  # noqa: E402

NAMES = {"accuracy": "Accuracy", "precision": "Precision (PPV)", "npv": "NPV", "sensitivity": "Sensitivity",
         "specificity": "Specificity", "f1": "F1", "auc": "AUC-ROC", "fnr": "FNR", "fpr": "FPR"}


def write_results(results_dir: Path, evaluation: Evaluation, history: list[dict], run_info: dict, run_dir: Path) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {"run": run_info, **evaluation.metrics, "strata": [s.__dict__ for s in evaluation.strata]}
    write_text(results_dir / "metrics.json", strict_json(payload, indent=2) + "\n")
    write_text(results_dir / "history.json", json.dumps(history, indent=2) + "\n")
    write_text(results_dir / "summary.md", summary_markdown(evaluation, run_info))
    predictions = np.load(run_dir / "predictions.npz")
    plot_all(results_dir, predictions, evaluation, history)


def metric_table(report: dict) -> list[str]:
    exact = report.get("ci95_exact")
    rows = ["| metric | value | 95% CI (bootstrap) |" + (" exact binomial 95% CI |" if exact else ""),
            "|---|---|---|" + ("---|" if exact else "")]
    for key, name in NAMES.items():
        low, high = report["ci95"][key]
        row = f"| {name} | {100 * report['point'][key]:.2f}% | {100 * low:.2f}–{100 * high:.2f}% |"
        if exact:
            row += f" {100 * exact[key][0]:.2f}–{100 * exact[key][1]:.2f}% |" if key in exact else " — |"
        rows.append(row)
    c, c_ci = report["confusion"], report.get("confusion_ci95")
    counts = ", ".join(f"{k.upper()} {c[k]}" + (f" ({c_ci[k][0]:.0f}–{c_ci[k][1]:.0f})" if c_ci else "")
                       for k in ("tp", "fp", "tn", "fn"))
    rows += ["", f"Confusion (threshold {report['threshold']:.3f}): {counts}", *per_class_table(report)]
    return rows


def per_class_table(report: dict) -> list[str]:
    """The per-class report with its 95% CIs (runs evaluated before 2026-11-29 recorded none: no table)."""
    ci = report.get("per_class_ci95")
    if not ci:
        return []
    rows = ["", "| class | precision | recall | F1 |", "|---|---|---|---|"]
    for name, figures in ci.items():
        point = report["per_class"][name]
        cells = [f"{_share(point[key])} ({_share(figures[f][0])}–{_share(figures[f][1])})"  # sklearn's key for F1
                 for f, key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"))]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def calibration_lines(cal: dict) -> list[str]:
    ci = cal.get("ci95")

    def shown(key: str) -> str:
        return f"{cal[key]:.4f}" + (f" ({ci[key][0]:.4f}–{ci[key][1]:.4f})" if ci else "")

    lines = [f"ECE {shown('ece_before')} -> {shown('ece_after')}; Brier {shown('brier_before')} -> {shown('brier_after')} "
             "(before -> after temperature scaling fitted on validation" + ("; 95% CIs" if ci else "") + ")"]
    return lines + ([f"{cal['definition']}."] if "definition" in cal else [])


def roc_point_lines(test: dict) -> list[str]:
    """The test ROC read at the original design's point (absent from runs scored before it was added)."""
    if "roc_points" not in test:
        return []
    point, ci = test["roc_points"]["point"], test["roc_points"]["ci95"]
    return ["## Test ROC at the original design's point (threshold-free, like AUC)", "",
            *(f"- {name.replace('_', ' ')}: {100 * point[name]:.2f}% ({100 * ci[name][0]:.2f}–{100 * ci[name][1]:.2f}%)"
              for name in point)]


def truncated_note(run_info: dict) -> str:
    """'; epoch 1 cut short by --max-train-minutes': a time-limited run that was resumed ends with stop_reason
    `epochs`, and without this the summary presented its shortened schedule as the full recipe."""
    epochs = run_info.get("truncated_epochs") or []
    if not epochs:
        return ""
    return f"; epoch{'s' if len(epochs) > 1 else ''} {', '.join(map(str, epochs))} cut short by --max-train-minutes"


def kept_model(run_info: dict) -> str:
    """What best.pt is: the epoch validation picked, or the weight average that replaced it (`--swa-epochs`)."""
    picked = f"Best epoch (validation {run_info.get('select_metric')}): {run_info.get('best_epoch')}"
    swa = run_info.get("swa")
    if not swa:
        return picked
    return (f"Model: weight average of epochs {swa['epochs'][0]}-{swa['epochs'][-1]} (validation AUC {swa['val_auc']:.4f}, "
            f"loss {swa['val_loss']:.4f}); {picked.lower()}, kept as best_epoch.pt")


def summary_markdown(evaluation: Evaluation, run_info: dict) -> str:
    test = evaluation.metrics["test"]
    cal = test["calibration"]
    lines = [
        "# Evaluation summary", "",
        f"Run: `{run_info.get('command', '')}`  ",
        f"{kept_model(run_info)}; "
        f"train wall time {run_info.get('train_seconds', 0) / 60:.1f} min at {run_info.get('train_img_per_s', 0):.1f} img/s "
        f"({run_info.get('runtime')})" + (f"; stopped by {run_info['stop_reason']}" if "stop_reason" in run_info else "")
        + truncated_note(run_info) + ".", "",
        f"Chosen on validation: flip TTA = {evaluation.tta_hflip}, temperature = {evaluation.temperature:.3f}, "
        f"operating threshold (Youden) = {evaluation.operating_threshold:.3f}.", "",
        f"## Test (n = {test['n']}), threshold 0.5 on calibrated probability", *metric_table(test["at_0.5"]), "",
        "## Test at the validation-chosen operating point", *metric_table(test["at_operating_point"]), "",
        *roc_point_lines(test), "",
        "## Calibration (test)", *calibration_lines(cal), "",
        "## Confidence strata (cut-points from validation; observed on test)",
        "| stratum | range | n | pneumonia | PPV | NPV |", "|---|---|---|---|---|---|",
    ]
    for i, stratum in enumerate(evaluation.strata):
        s = test["strata"][stratum.name]
        closing = "]" if i == len(evaluation.strata) - 1 else ")"  # the top stratum holds its upper end (1.0)
        lines.append(f"| {stratum.name} | [{stratum.lower:.3f}, {stratum.upper:.3f}{closing} | {s['count']} | {s['pneumonia']} | "
                     f"{_share(s['ppv'])} | {_share(s['npv'])} |")
    return "\n".join(lines) + "\n"


def _share(value: float | None) -> str:
    """A rate of the summary table; an empty stratum has none (NaN in memory, null in JSON)."""
    return "—" if value is None or value != value else f"{value:.3f}"


def plot_all(out: Path, predictions: dict, evaluation: Evaluation, history: list[dict]) -> None:
    labels = predictions["test_labels"]
    probability = softmax_pneumonia(predictions["test_logits"], evaluation.temperature)
    fpr, tpr, _ = roc_curve(labels, probability)
    _save(out / "roc.png", lambda ax: (ax.plot(fpr, tpr), ax.plot([0, 1], [0, 1], "--"), ax.set(xlabel="FPR", ylabel="TPR", title="Test ROC")))
    precision, recall, _ = precision_recall_curve(labels, probability)
    _save(out / "pr.png", lambda ax: (ax.plot(recall, precision), ax.set(xlabel="Recall", ylabel="Precision", title="Test PR")))
    c = evaluation.metrics["test"]["at_0.5"]["confusion"]
    matrix = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    _save(out / "confusion.png", lambda ax: _confusion(ax, matrix))
    reliability = evaluation.metrics["test"]["calibration"]["reliability_after"]
    _save(out / "reliability.png", lambda ax: (ax.plot([0, 1], [0, 1], "--"),
          ax.plot(reliability["mean_predicted"], reliability["observed"], "o-"),
          ax.set(xlabel="mean predicted", ylabel="observed pneumonia", title="Test reliability (calibrated)")))
    _save(out / "training_curves.png", lambda ax: _curves(ax, history))


def _confusion(ax, matrix: np.ndarray) -> None:
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["Normal", "Pneumonia"], yticklabels=["Normal", "Pneumonia"],
           xlabel="predicted", ylabel="actual", title="Test confusion (0.5)")


def _curves(ax, history: list[dict]) -> None:
    epochs = [r["epoch"] for r in history]
    for key in ("train_loss", "val_loss", "val_auc", "val_f1"):
        ax.plot(epochs, [r[key] for r in history], label=key)
    ax.set(xlabel="epoch", title="Training curves")
    ax.legend()


def _save(path: Path, draw) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    draw(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
