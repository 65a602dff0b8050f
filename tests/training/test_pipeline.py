"""A tiny-subset run of the whole pipeline (train -> evaluate -> export -> card) through the CLI."""

import json
import shutil

import numpy as np
import onnx
import pytest

from models.card import ModelCard, sha256_of
from models.detector import PneumoniaDetector
from training.cli import main
from training.config import TrainConfig
from training.data import load_split, to_network_input, to_unit_tensor
from training.engine import predict_logits
from training.evaluate import load_trained
from training.seeds import load_seed_run
from training.metrics import sensitivity_at_specificity, softmax_pneumonia, specificity_at_sensitivity
from training.runtime import make_runtime
from training.train import load_teachers, teacher_logits


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_root, weights_path):
    out = tmp_path_factory.mktemp("run")
    release = tmp_path_factory.mktemp("release")
    args = ["run", "--data-root", str(data_root), "--subset", "40", "--epochs", "2", "--samples-per-epoch", "0", "--batch-size", "16",
            "--bootstrap", "30", "--out-dir", str(out), "--release-dir", str(release), "--no-progress",
            "--weights", str(weights_path) if weights_path else "none", "--ema-decay", "0.9"]
    assert main(args) == 0
    return out, release


def test_every_artifact_is_written(tiny_run):
    out, release = tiny_run
    for name in ("config.json", "history.json", "best.pt", "last.pt", "evaluation.json", "run_info.json",
                 "predictions.npz", "pneumonia_resnet50.onnx", "pneumonia_resnet50.card.json"):
        assert (out / name).is_file(), name
    for name in ("metrics.json", "summary.md", "history.json", "roc.png", "pr.png", "confusion.png",
                 "reliability.png", "training_curves.png"):
        assert (out / "results" / name).stat().st_size > 0, name
    assert (release / "pneumonia_resnet50.onnx").is_file()
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2] and all(row["train_img_per_s"] > 0 for row in history)


def test_card_describes_the_model(tiny_run):
    out, _ = tiny_run
    card = ModelCard.load(out / "pneumonia_resnet50.card.json")
    assert card.labels == ("Normal", "Pneumonia") and card.temperature > 0
    assert [s.name for s in card.strata] == ["likely_normal", "indeterminate", "high_suspicion"]
    assert card.extra["onnx"]["parity"]["max_abs_delta_probability"] <= 1e-4
    assert card.extra["data"]["md5"] == "28209eda62fecd6e6a2d98b1501bb15f"
    assert "aged one to five" in card.extra["data"]["population"]  # who it learnt from: children only
    assert "adults" in card.extra["intended_use"]
    assert card.extra["training"]["epochs"] == 2
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    for key in ("accuracy", "precision", "npv", "sensitivity", "specificity", "f1", "auc", "fnr", "fpr"):
        low, high = metrics["test"]["at_0.5"]["ci95"][key]
        point = metrics["test"]["at_0.5"]["point"][key]  # JSON null: undefined on this tiny run (e.g. nothing called positive)
        assert point is None or low <= point <= high, key
    # the claimed point read off the test ROC, from the run's own test logits (the temperature cannot move it)
    predictions = np.load(out / "predictions.npz")
    probability = softmax_pneumonia(predictions["test_logits"])
    roc = metrics["test"]["roc_points"]["point"]
    assert roc["sensitivity_at_specificity_0.8547"] == sensitivity_at_specificity(predictions["test_labels"], probability, 0.8547)
    assert roc["specificity_at_sensitivity_0.9718"] == specificity_at_sensitivity(predictions["test_labels"], probability, 0.9718)
    assert "sensitivity at specificity 0.8547" in (out / "results" / "summary.md").read_text()


def test_exported_model_serves_through_the_detector(tiny_run, pneumoniamnist):
    out, release = tiny_run
    detector = PneumoniaDetector(release / "pneumonia_resnet50.onnx")
    result = detector.predict(pneumoniamnist["test_images"][0])
    assert result["stratum"] in ("likely_normal", "indeterminate", "high_suspicion")


def test_reported_test_logits_are_the_served_models(tiny_run, data_root):
    """Figures describe what ships: evaluation runs in fp32 even where bf16 trained the model."""
    out, release = tiny_run
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    assert metrics["selection"]["precision"] == "fp32"
    test = load_split(data_root, "test", 28, 40)
    detector = PneumoniaDetector(release / "pneumonia_resnet50.onnx")
    served = detector.logits(detector.preprocess(list(test.images)))
    reported = np.load(out / "predictions.npz")
    assert np.array_equal(reported["test_labels"], test.labels)
    np.testing.assert_allclose(reported["test_logits"], served, atol=1e-3)


@pytest.mark.parametrize("int8", [False, True])
def test_ensemble_stage_ships_one_carded_graph(tiny_run, data_root, tmp_path, int8):
    """A run ensembled with a copy of itself must score exactly like the run (fp32); int8 members carry their
    error. (The run twice is refused: the ensemble would count it twice.)"""
    out, _ = tiny_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "pneumonia_resnet50.onnx", "pneumonia_resnet50.card.json"):
        shutil.copy(out / name, copy / name)
    ens = tmp_path / "ensemble"
    args = ["ensemble", str(out), str(copy), "--data-root", str(data_root), "--subset", "40", "--bootstrap", "30",
            "--out-dir", str(ens), "--calibration-images", "8", "--model-version", "9.9.9", *(["--int8"] if int8 else [])]
    assert main(args) == 0
    card = ModelCard.load(ens / "pneumonia_resnet50.card.json")
    assert card.version == "9.9.9" and card.sha256 == sha256_of(ens / "pneumonia_resnet50.onnx")
    assert card.extra["ensemble"]["precision"] == ("int8" if int8 else "fp32")
    assert [m["run"] for m in card.extra["ensemble"]["members"]] == [str(out), str(copy)]
    parity = card.extra["onnx"]["parity"]
    test = load_split(data_root, "test", 28, 40)
    served = PneumoniaDetector(ens / "pneumonia_resnet50.onnx")
    ensemble_logits = served.logits(served.preprocess(list(test.images)))
    member = PneumoniaDetector(out / "pneumonia_resnet50.onnx")
    member_logits = member.logits(member.preprocess(list(test.images)))
    if int8:
        member_graph = onnx.load(str(ens / "member0.int8.onnx"), load_external_data=False)
        assert "DequantizeLinear" in {node.op_type for node in member_graph.graph.node}
        # int8 weights: about a quarter of fp32, plus per-channel scales and fp32 biases
        assert (ens / "member0.int8.onnx").stat().st_size < 0.6 * (out / "pneumonia_resnet50.onnx").stat().st_size
        assert parity["max_abs_delta_probability"] > 0  # recorded, not required
        # the two members are the same run quantised from the same images: the same error, and the graph's
        assert parity["members_int8_vs_fp32"][0] == pytest.approx(parity["members_int8_vs_fp32"][1])
        assert parity["max_abs_delta_probability"] <= max(parity["members_int8_vs_fp32"]) + 1e-6
    else:
        assert parity["passed"] and parity["max_abs_delta_probability"] <= 1e-4
        assert "members_int8_vs_fp32" not in parity
        np.testing.assert_allclose(ensemble_logits, member_logits, atol=1e-4)
    metrics = json.loads((ens / "results" / "metrics.json").read_text())
    assert list(metrics["ablation_tta_on_test"]) == ["false"]
    assert np.array_equal(np.load(ens / "predictions.npz")["test_logits"], ensemble_logits)
    run = load_seed_run(ens)
    assert run.label == "ensemble-42-42" and run.metrics["test"]["roc_points"]["point"]


def test_resume_continues_from_last_checkpoint(tiny_run, data_root, weights_path):
    """The resume repeats the run's --weights: with none nothing is frozen by default, and the frozen set must match."""
    out, _ = tiny_run
    args = ["train", "--data-root", str(data_root), "--subset", "40", "--epochs", "3", "--samples-per-epoch", "0", "--batch-size", "16",
            "--out-dir", str(out), "--resume", str(out / "last.pt"), "--no-progress",
            "--weights", str(weights_path) if weights_path else "none", "--ema-decay", "0.9"]
    assert main(args) == 0
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]


def test_a_full_run_says_it_ran_every_epoch(tiny_run):
    out, _ = tiny_run
    assert json.loads((out / "run_info.json").read_text())["stop_reason"] == "epochs"
    assert "stopped by epochs" in (out / "results" / "summary.md").read_text()


def test_time_budget_ends_the_epoch_validates_it_and_stops(data_root, tmp_path):
    out = tmp_path / "budget"
    common = ["--data-root", str(data_root), "--subset", "40", "--epochs", "3", "--samples-per-epoch", "0",
              "--batch-size", "16", "--out-dir", str(out), "--no-progress", "--weights", "none",
              "--max-train-minutes", "1e-6"]
    assert main(["train", *common]) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and history[0]["time_limit"]
    assert history[0]["train_images"] == 16  # one step of the epoch's 40 draws, then the budget was spent
    assert "val_auc" in history[0] and (out / "best.pt").exists()
    run_info = json.loads((out / "run_info.json").read_text())
    assert run_info["stop_reason"] == "time_limit" and run_info["epochs_run"] == 1
    # the budget covers the resumed run too: nothing is left, so no epoch is added
    assert main(["train", *common, "--resume", str(out / "last.pt")]) == 0
    assert len(json.loads((out / "history.json").read_text())) == 1


def test_time_budget_must_be_positive():
    with pytest.raises(ValueError, match="max_train_minutes"):
        TrainConfig(max_train_minutes=0)


def test_int8_variant_carries_its_own_checks(tiny_run, data_root):
    out, _ = tiny_run
    args = ["quantize", "--data-root", str(data_root), "--subset", "40", "--out-dir", str(out),
            "--calibration-images", "8", "--no-progress"]
    assert main(args) == 0
    card = ModelCard.load(out / "pneumonia_resnet50.int8.card.json")
    check = card.extra["int8_check"]
    assert card.extra["variant_of"]["file"] == "pneumonia_resnet50.onnx"
    assert 0 <= check["max_abs_delta_probability_vs_fp32"] < 0.2
    assert check["test_images_per_s_int8"] > 0
    # its own figures: fitted on validation from the int8 logits and scored on test, none copied from fp32
    fp32 = ModelCard.load(out / "pneumonia_resnet50.card.json")
    assert set(fp32.metrics["test_at_operating_point"]["sensitivity"]) == {"value", "ci95", "ci95_exact"}, "CIs at both points"
    assert card.metrics["test_auc"] == pytest.approx(check["test_auc_int8"], abs=1e-9)
    assert card.extra["onnx"]["parity"]["max_abs_delta_probability"] == check["max_abs_delta_probability_vs_fp32"]
    assert card.extra["onnx"]["file"] == "pneumonia_resnet50.int8.onnx"
    assert card.extra["decision"]["operating_threshold_validation_youden"] != \
        fp32.extra["decision"]["operating_threshold_validation_youden"] or card.temperature != fp32.temperature
    PneumoniaDetector(out / "pneumonia_resnet50.int8.onnx").predict((np.add.outer(np.arange(28), np.arange(28)) * 4).astype(np.uint8))


def test_seeds_stage_summarizes_real_runs(tiny_run, data_root, tmp_path):
    out, _ = tiny_run
    second = tmp_path / "seed-43"
    common = ["--data-root", str(data_root), "--subset", "40", "--epochs", "1", "--samples-per-epoch", "0", "--batch-size", "16",
              "--bootstrap", "20", "--seed", "43", "--out-dir", str(second), "--no-progress", "--weights", "none"]
    assert main(["train", *common]) == 0 and main(["evaluate", *common]) == 0
    assert main(["seeds", str(out), str(second), "--out", str(tmp_path / "seeds"), "--bootstrap", "20"]) == 0
    figures = json.loads((tmp_path / "seeds" / "seeds.json").read_text())
    assert set(figures["per_seed"]) == {"42", "43"}
    aucs = [figures["per_seed"][s]["at_0.5"]["auc"] for s in ("42", "43")]
    assert figures["mean_sd"]["at_0.5"]["auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert "seed 42 | seed 43" in (tmp_path / "seeds" / "seeds.md").read_text()


def test_distilled_student_learns_from_the_runs_it_names(tiny_run, data_root, tmp_path):
    """The teacher is the tiny run's own best network, and the run records which checkpoint taught it."""
    out, _ = tiny_run
    student = tmp_path / "student"
    args = ["train", "--data-root", str(data_root), "--subset", "40", "--epochs", "1", "--samples-per-epoch", "0",
            "--batch-size", "16", "--out-dir", str(student), "--no-progress", "--weights", "none",
            "--distill-from", str(out), "--distill-weight", "0.7", "--distill-temperature", "3"]
    assert main(args) == 0
    config = json.loads((student / "config.json").read_text())
    assert config["distill_from"] == [str(out)] and config["distill_weight"] == 0.7
    run_info = json.loads((student / "run_info.json").read_text())
    assert run_info["teachers"] == {str(out): sha256_of(out / "best.pt")}
    runtime = make_runtime("cpu", "fp32")
    teacher = load_teachers((out,), runtime)
    images = load_split(data_root, "test", 28, 40).images[:8]
    reference = load_trained(out / "best.pt", TrainConfig(resnet_v1_strides=config["resnet_v1_strides"]), runtime)
    x = to_network_input(to_unit_tensor(images))
    np.testing.assert_allclose(teacher_logits(teacher, x, runtime).numpy(),
                               predict_logits(reference, images, runtime), atol=1e-5)


def test_card_stage_recards_an_older_release_from_its_own_run_and_refuses_another(tiny_run, tmp_path, capsys):
    """`pneumonia-train card`: an older card (no CIs at the operating point, no weights provenance) is
    brought to what `export` writes today from the run's metrics.json; another run's figures are refused."""
    out, release = tiny_run
    fresh = json.loads((release / "pneumonia_resnet50.card.json").read_text())
    older = dict(fresh, metrics=dict(fresh["metrics"], test_at_operating_point={
        name: value["value"] for name, value in fresh["metrics"]["test_at_operating_point"].items()}),
        weights_origin={k: fresh["weights_origin"][k] for k in ("kind", "name", "sha256", "resnet_v1_strides")
                        if k in fresh["weights_origin"]},
        data={k: v for k, v in fresh["data"].items() if k != "population"},
        intended_use="Worklist triage aid for frontal (PA/AP) chest radiographs; not a diagnosis.")
    (tmp_path / "pneumonia_resnet50.onnx").write_bytes((release / "pneumonia_resnet50.onnx").read_bytes())
    card_path = tmp_path / "pneumonia_resnet50.card.json"
    card_path.write_text(json.dumps(older))
    assert main(["card", str(tmp_path / "pneumonia_resnet50.onnx"), "--metrics", str(out / "results" / "metrics.json")]) == 0
    refreshed = json.loads(card_path.read_text())
    assert refreshed["metrics"] == fresh["metrics"] and refreshed["weights_origin"] == fresh["weights_origin"]
    assert {k: v for k, v in refreshed.items() if k != "card_refreshed"} == fresh
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    metrics["test"]["at_0.5"]["point"]["auc"] += 0.01
    other = tmp_path / "other_metrics.json"
    other.write_text(json.dumps(metrics))
    assert main(["card", str(tmp_path / "pneumonia_resnet50.onnx"), "--metrics", str(other)]) == 2
    assert "pneumonia-train card: " in (err := capsys.readouterr().err) and "not this card's evaluation" in err


def test_summary_and_card_carry_the_per_class_confusion_and_calibration_cis(tiny_run):
    out, _ = tiny_run
    summary = (out / "results" / "summary.md").read_text()
    assert "| class | precision | recall | F1 |" in summary and "| Normal |" in summary
    assert "1.000] |" in summary  # the top stratum holds P = 1.0
    assert "10 equal-width bins" in summary
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    assert set(metrics["test"]["calibration"]["ci95"]) == {"ece_before", "ece_after", "brier_before", "brier_after"}
    card = ModelCard.load(out / "pneumonia_resnet50.card.json")
    for point in ("at_0.5", "at_operating_point"):
        assert set(card.metrics["test_confusion"][point]["ci95"]) == {"tp", "fp", "tn", "fn"}
        assert "Pneumonia" in card.metrics["test_per_class"][point]["ci95"]
    assert "ci95" in card.metrics["test_calibration"]
    assert "exact binomial 95% CI" in summary
    assert "ci95_exact" in card.metrics["test_at_operating_point"]["fnr"]
    assert "ci95_exact" not in card.metrics["test_at_operating_point"]["auc"]  # not a proportion
