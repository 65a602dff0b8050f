"""Every part of the recipe can be set from the command line, and reaches the config that training gets."""

import dataclasses
import logging

import pytest

from training.cli import build_parser, config_from_args, main
from training.config import WEIGHTS_ENV, AugmentConfig, TrainConfig

AUGMENT_FLAGS = {
    "rotation_deg": (["--aug-rotation-deg", "7.5"], 7.5),
    "hflip_p": (["--aug-hflip-p", "0.1"], 0.1),
    "translate": (["--aug-translate", "0.05"], 0.05),
    "scale_min": (["--aug-scale-min", "0.8"], 0.8),
    "scale_max": (["--aug-scale-max", "1.3"], 1.3),
    "shear_deg": (["--aug-shear-deg", "2"], 2.0),
    "brightness": (["--aug-brightness", "0.35"], 0.35),
    "contrast": (["--aug-contrast", "0.15"], 0.15),
    "erase_p": (["--aug-erase-p", "0.6"], 0.6),
    "erase_area": (["--aug-erase-area", "0.05", "0.3"], (0.05, 0.3)),
    "gamma": (["--aug-gamma", "0.4"], 0.4),
    "noise_std": (["--aug-noise", "0.02"], 0.02),
    "enabled": (["--no-augment"], False),
}
"""One flag per AugmentConfig field, and a value that is not the field's default."""

RECIPE_FLAGS = {
    "hidden": (["--hidden", "256"], 256),
    "dropout": (["--dropout", "0.2"], 0.2),
    "plateau_factor": (["--plateau-factor", "0.3"], 0.3),
    "plateau_patience": (["--plateau-patience", "4"], 4),
    "grad_clip": (["--grad-clip", "0"], 0.0),
    "label_smoothing": (["--label-smoothing", "0.1"], 0.1),
    "low_res_epochs": (["--low-res-epochs", "4"], 4),
    "low_res_size": (["--low-res-size", "96"], 96),
}


def config_of(*flags: str) -> TrainConfig:
    """As `pneumonia-train train` builds it."""
    return config_from_args(build_parser().parse_args(["train", *flags]))


@pytest.fixture(autouse=True)
def no_weights_env(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)


def test_every_augment_field_has_a_flag():
    assert set(AUGMENT_FLAGS) == {f.name for f in dataclasses.fields(AugmentConfig)}


@pytest.mark.parametrize("field", sorted(AUGMENT_FLAGS))
def test_augment_flag_reaches_the_config(field):
    flags, value = AUGMENT_FLAGS[field]
    assert value != getattr(AugmentConfig(), field)
    augment = config_of(*flags).augment
    if field == "enabled":
        assert augment.enabled is False
    else:
        assert getattr(augment, field) == pytest.approx(value)
    others = {f.name for f in dataclasses.fields(AugmentConfig)} - {field}
    assert all(getattr(augment, name) == getattr(AugmentConfig(), name) for name in others)


@pytest.mark.parametrize("field", sorted(RECIPE_FLAGS))
def test_recipe_flag_reaches_the_config(field):
    flags, value = RECIPE_FLAGS[field]
    assert value != getattr(TrainConfig(), field)
    assert getattr(config_of(*flags), field) == pytest.approx(value)


def test_erase_area_is_a_tuple_like_the_dataclass():
    """config.json round-trips it (from_json turns lists back into tuples), and frozen configs compare equal."""
    assert config_of("--aug-erase-area", "0.05", "0.3").augment.erase_area == (0.05, 0.3)
    assert isinstance(config_of("--aug-erase-area", "0.05", "0.3").augment.erase_area, tuple)


def test_flag_defaults_are_the_dataclass_defaults():
    config = config_of()
    assert config.augment == AugmentConfig()
    assert all(getattr(config, field) == getattr(TrainConfig(), field) for field in RECIPE_FLAGS)
    assert config.frozen == TrainConfig().frozen


def test_network_flags_are_same_run_fields():
    """--hidden and --dropout describe the network: later stages and resumes must repeat them."""
    from training.config import SAME_RUN, STAGE_FIELDS

    assert {"hidden", "dropout"} <= set(SAME_RUN)
    assert not set(RECIPE_FLAGS) & set(STAGE_FIELDS)


def test_weights_none_trains_everything_by_default(caplog):
    with caplog.at_level(logging.INFO, logger="training"):
        config = config_of("--weights", "none")
    assert config.frozen == ()
    assert "nothing frozen" in caplog.text


def test_weights_none_from_the_environment_trains_everything(monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, "none")
    assert config_of().frozen == ()


@pytest.mark.parametrize("frozen, expected", [("conv1", ("conv1",)), ("conv1,bn1", ("conv1", "bn1")), ("", ())])
def test_an_explicit_frozen_is_kept_with_weights_none(frozen, expected):
    assert config_of("--weights", "none", "--frozen", frozen).frozen == expected


def test_pretrained_weights_keep_the_default_frozen_set(tmp_path):
    assert config_of("--weights", str(tmp_path / "resnet50.safetensors")).frozen == TrainConfig().frozen
    assert config_of("--weights", "IMAGENET1K_V2", "--frozen", "conv1").frozen == ("conv1",)


def test_refusals_are_one_line_and_exit_2_not_a_traceback(tmp_path):
    """A wrong --data-root, a stage on a folder that holds no run and a card refresh from another
    model's metrics were refused with a Python traceback; the reason is all a user needs."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    copy = tmp_path / "model"
    copy.mkdir()
    for name in ("pneumonia_resnet50.onnx", "pneumonia_resnet50.card.json"):
        shutil.copy(repo / "models" / name, copy / name)
    metrics = json.loads((repo / "results" / "metrics.json").read_text())
    metrics["test"]["at_0.5"]["point"]["auc"] = 0.5
    (tmp_path / "other.json").write_text(json.dumps(metrics))
    cases = {
        ("run", "--data-root", str(tmp_path / "nodata"), "--weights", "none", "--out-dir", str(tmp_path / "r")):
            "is not in",
        ("evaluate", "--data-root", str(tmp_path / "nodata"), "--out-dir", str(tmp_path / "empty")): "holds no best.pt, run_info.json, history.json",
        ("card", str(copy / "pneumonia_resnet50.onnx"), "--metrics", str(tmp_path / "other.json")):
            "is not this card's evaluation",
    }
    for args, reason in cases.items():
        out = subprocess.run([sys.executable, "-m", "training.cli", *args], capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert f"pneumonia-train {args[0]}: " in out.stderr and reason in out.stderr
        assert "Traceback" not in out.stderr


@pytest.mark.parametrize("flags, says", [
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--epochs", "-1"], "epochs must be at least 1"),  # was refused as "swa_epochs must lie in [0, epochs]"
    (["--batch-size", "0"], "batch_size must be at least 1"),
    (["--bootstrap", "0"], "bootstrap must be at least 1"),
    (["--frozen", "conv1,layer5"], "frozen: no module layer5"),
    (["--rule-out-sensitivity", "98"], "rule_out_sensitivity"),
    (["--weights", "missing.safetensors"], "weights file missing.safetensors not found"),
    (["--weights", "IMAGENET1K_V3"], "weights 'IMAGENET1K_V3': neither"),
    (["--epochs", "3", "--low-res-epochs", "3"], "at least the last epoch trains at 224"),
    (["--low-res-epochs", "1", "--low-res-size", "256"], "low_res_size must lie in [32, 224)"),
])
def test_user_mistakes_are_refused_in_one_line_before_anything_is_written(tmp_path, data_root, flags, says, capsys):
    """Each was a traceback (exit 1), some after config.json was written into the new --out-dir."""
    out = tmp_path / "run"
    args = ["train", "--data-root", str(data_root), "--subset", "40", "--weights", "none", "--no-progress",
            "--out-dir", str(out), *flags]
    assert main(args) == 2
    assert says in capsys.readouterr().err
    assert not (out / "config.json").exists()


def test_stages_name_a_missing_run_folder_or_metrics_file(tmp_path, capsys):
    assert main(["seeds", str(tmp_path / "typo"), "--out", str(tmp_path / "s")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert main(["card", str(tmp_path / "m.onnx"), "--metrics", str(tmp_path / "none.json")]) == 2
    assert "no metrics file" in capsys.readouterr().err


def test_known_v1_weights_trained_without_v1_strides_are_warned_about(tmp_path, monkeypatch, caplog):
    """The offline v1 weights load into torchvision's v1.5 layout without an error, so a run that forgot
    --resnet-v1-strides trained another network than the release's with nothing said."""
    from models.card import sha256_of
    from training import export

    weights = tmp_path / "v1.safetensors"
    weights.write_bytes(b"stands in for the v1 file")
    monkeypatch.setitem(export.KNOWN_WEIGHTS, sha256_of(weights), export.KNOWN_WEIGHTS[
        "ce6155f0f46db5550977369f96467b44bf9192f2344c54332b3c69226ea7910a"])
    with caplog.at_level("WARNING", logger="training"):
        config_from_args(build_parser().parse_args(["train", "--weights", str(weights)]))
    assert any("--resnet-v1-strides" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    caplog.clear()
    with caplog.at_level("WARNING", logger="training"):
        config_from_args(build_parser().parse_args(["train", "--weights", str(weights), "--resnet-v1-strides"]))
        config_from_args(build_parser().parse_args(["train", "--weights", "none"]))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
