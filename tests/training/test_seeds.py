"""Seed aggregation: mean ± sd against hand-computed values, and the ensemble's own validation choices."""

import json

import numpy as np
import pytest

from training.config import StrataTargets
from training.evaluate import ROC_POINTS
from training.seeds import ensemble, load_seed_run, mean_sd, seed_table, summarize_seeds, validation_table

METRICS = ("accuracy", "f1", "auc", "sensitivity", "specificity", "precision", "npv")


def write_run(root, seed: int, accuracy: float, val_logits: np.ndarray, test_logits: np.ndarray,
              val_labels: np.ndarray, test_labels: np.ndarray, roc: tuple[float, float] | None = None):
    run = root / f"seed-{seed}"
    (run / "results").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"seed": seed}))
    (run / "run_info.json").write_text(json.dumps({"train_seconds": 600.0, "train_img_per_s": 30.0,
                                                   "runtime": "cpu/bf16", "best_epoch": 6}))
    point = {m: accuracy for m in METRICS}
    validation = {"auc": 0.99, "calibration": {"nll_after": 1 - accuracy},
                  "at_0.5": {"accuracy": accuracy, "f1": accuracy, "sensitivity": accuracy, "specificity": 1.0}}
    metrics = {"test": {"at_0.5": {"point": point}, "at_operating_point": {"point": point}},
               "validation": validation, "selection": {"operating_threshold": 0.3}}
    if roc is not None:
        metrics["test"]["roc_points"] = {"point": dict(zip(ROC_POINTS, roc))}
    (run / "results" / "metrics.json").write_text(json.dumps(metrics))
    np.savez(run / "predictions.npz", val_labels=val_labels, val_logits=val_logits,
             test_labels=test_labels, test_logits=test_logits)
    return run


def separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.tile([0, 1], n // 2)
    margin = np.where(labels == 1, 1.0, -1.0) + rng.normal(0, 1.2, n)
    return labels, np.stack([-margin / 2, margin / 2], axis=1)


def test_mean_and_sample_sd_by_hand():
    stats = mean_sd([0.90, 0.92, 0.94])
    assert stats["mean"] == pytest.approx(0.92)
    assert stats["sd"] == pytest.approx(0.02)  # sqrt(((-.02)^2 + 0 + .02^2) / (3 - 1))
    assert (stats["min"], stats["max"]) == (0.90, 0.94)
    assert mean_sd([0.5])["sd"] == 0.0


def test_seed_table_and_ensemble_of_identical_runs(tmp_path):
    val_labels, val_logits = separable(200, 1)
    test_labels, test_logits = separable(100, 2)
    runs = [load_seed_run(write_run(tmp_path, seed, acc, val_logits, test_logits, val_labels, test_labels))
            for seed, acc in ((7, 0.90), (42, 0.92), (2026, 0.94))]
    table = seed_table(runs)
    assert table["mean_sd"]["at_0.5"]["accuracy"]["mean"] == pytest.approx(0.92)
    assert table["mean_sd"]["at_operating_point"]["f1"]["sd"] == pytest.approx(0.02)
    assert set(table["per_seed"]) == {"7", "42", "2026"}
    # three copies of the same logits ensemble to exactly that model
    alone, together = ensemble(runs[:1], StrataTargets(), 50), ensemble(runs, StrataTargets(), 50)
    assert together["temperature"] == pytest.approx(alone["temperature"])
    assert together["test"]["at_0.5"]["point"] == pytest.approx(alone["test"]["at_0.5"]["point"])


def test_ensemble_refuses_runs_on_other_images(tmp_path):
    val_labels, val_logits = separable(200, 1)
    test_labels, test_logits = separable(100, 2)
    a = write_run(tmp_path, 1, 0.9, val_logits, test_logits, val_labels, test_labels)
    b = write_run(tmp_path, 2, 0.9, val_logits, test_logits, val_labels, 1 - test_labels)
    with pytest.raises(ValueError, match="different images"):
        summarize_seeds([a, b], tmp_path / "out", StrataTargets(), 20)


def test_summary_files(tmp_path):
    val_labels, val_logits = separable(200, 1)
    test_labels, test_logits = separable(100, 2)
    dirs = [write_run(tmp_path, seed, 0.9, val_logits + seed / 100, test_logits, val_labels, test_labels)
            for seed in (1, 2)]
    figures = summarize_seeds(dirs, tmp_path / "out", StrataTargets(), 20)
    saved = json.loads((tmp_path / "out" / "seeds.json").read_text())
    assert saved["mean_sd"]["at_0.5"]["auc"]["mean"] == pytest.approx(0.9)
    assert 0 < figures["ensemble"]["operating_threshold"] < 1
    markdown = (tmp_path / "out" / "seeds.md").read_text()
    assert "| accuracy | 90.00 | 90.00 | 90.00 ± 0.00 |" in markdown


def test_roc_points_by_hand_and_absent_for_older_runs(tmp_path):
    val_labels, val_logits = separable(200, 1)
    test_labels, test_logits = separable(100, 2)
    dirs = [write_run(tmp_path / "new", seed, 0.9, val_logits, test_logits, val_labels, test_labels, roc)
            for seed, roc in ((1, (0.96, 0.80)), (2, (0.98, 0.84)))]
    figures = summarize_seeds(dirs, tmp_path / "out", StrataTargets(), 20)
    sens_at_spec, spec_at_sens = ROC_POINTS
    assert figures["roc_points"]["mean_sd"][sens_at_spec]["mean"] == pytest.approx(0.97)
    assert figures["roc_points"]["mean_sd"][spec_at_sens]["sd"] == pytest.approx(0.04 / np.sqrt(2))
    assert 0 <= figures["ensemble"]["test"]["roc_points"]["point"][sens_at_spec] <= 1
    assert "| sensitivity at specificity 0.8547 | 96.00 | 98.00 | 97.00 ± 1.41 |" in (tmp_path / "out" / "seeds.md").read_text()
    older = [write_run(tmp_path / "old", 3, 0.9, val_logits, test_logits, val_labels, test_labels), dirs[0]]
    mixed = summarize_seeds(older, tmp_path / "mixed", StrataTargets(), 20)
    assert mixed["roc_points"] == {} and "Test ROC" not in (tmp_path / "mixed" / "seeds.md").read_text()


def test_validation_table_by_hand(tmp_path):
    val_labels, val_logits = separable(200, 1)
    test_labels, test_logits = separable(100, 2)
    runs = [load_seed_run(write_run(tmp_path, seed, acc, val_logits, test_logits, val_labels, test_labels))
            for seed, acc in ((7, 0.90), (42, 0.92), (2026, 0.94))]
    table = seed_table(runs)["validation"]
    assert table["per_seed"]["42"]["accuracy_at_0.5"] == 0.92
    assert table["mean_sd"]["nll_calibrated"]["mean"] == pytest.approx(0.08)  # mean of 0.10, 0.08, 0.06
    assert table["mean_sd"]["f1_at_0.5"]["sd"] == pytest.approx(0.02)
    assert validation_table([r.metrics for r in runs]) == table["mean_sd"]


def test_baseline_comparison_reads_the_kept_seed_files(tmp_path):
    val_labels, val_logits = separable(200, 1)
    test_labels, test_logits = separable(100, 2)
    old = [write_run(tmp_path / "old", seed, 0.90, val_logits, test_logits, val_labels, test_labels) for seed in (1, 2)]
    summarize_seeds(old, tmp_path / "baseline", StrataTargets(), 20)
    assert (tmp_path / "baseline" / "seed-2" / "metrics.json").exists()
    kept = tmp_path / "baseline" / "seed-2"
    assert (kept / "predictions.npz").exists()  # a kept folder loads like its run: re-summarise without the runs
    assert load_seed_run(kept).metrics == load_seed_run(old[1]).metrics
    np.testing.assert_array_equal(load_seed_run(kept).test_logits, load_seed_run(old[1]).test_logits)
    new = [write_run(tmp_path / "new", seed, 0.95, val_logits, test_logits, val_labels, test_labels) for seed in (1, 2)]
    figures = summarize_seeds(new, tmp_path / "candidate", StrataTargets(), 20, tmp_path / "baseline")
    compared = figures["validation"]["against_baseline"]
    assert compared["accuracy_at_0.5"]["delta"] == pytest.approx(0.05)
    assert compared["nll_calibrated"]["delta"] == pytest.approx(-0.05)
    assert "| accuracy_at_0.5 | 0.9000 ± 0.0000 | 0.9500 ± 0.0000 | +0.0500 |" in (tmp_path / "candidate" / "seeds.md").read_text()
    with pytest.raises(FileNotFoundError, match="seed-"):
        summarize_seeds(new, tmp_path / "again", StrataTargets(), 20, tmp_path / "old")


def test_a_summary_into_a_folder_holding_other_runs_is_refused(tmp_path):
    """The runs of an earlier summary into the same --out stayed beside the new seeds.json, and a later
    --baseline on that folder averaged runs the summary no longer listed. The same runs again are fine."""
    from training.errors import RefusedError

    val_labels, val_logits = separable(200, 1)
    test_labels, test_logits = separable(100, 2)
    dirs = [write_run(tmp_path, seed, 0.9, val_logits, test_logits, val_labels, test_labels) for seed in (1, 2)]
    summarize_seeds(dirs, tmp_path / "out", StrataTargets(), 20)
    summarize_seeds(dirs, tmp_path / "out", StrataTargets(), 20)
    with pytest.raises(RefusedError, match=r"holds runs this summary does not list \(seed-1\)"):
        summarize_seeds(dirs[1:], tmp_path / "out", StrataTargets(), 20)
