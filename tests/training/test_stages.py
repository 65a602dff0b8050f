"""Separate stages on a finished run: its config.json, not the command's defaults, says what the run is."""

import json

import pytest

from models.card import ModelCard
from tests.training.conftest import TINY_FLAGS, use_tiny_network
from training.cli import main

COMMAND_FIELDS = {"data_root", "tta_hflip", "bootstrap", "strata", "device", "precision", "threads",
                  "eval_batch_size", "out_dir", "resume", "progress"}
"""What a stage takes from its own command: where the data is, the evaluation's choices, the runtime."""


@pytest.fixture(scope="module")
def v1_run(tmp_path_factory, data_root):
    """A tiny run trained and evaluated with --resnet-v1-strides, a dropout and a recipe that are not the default."""
    out = tmp_path_factory.mktemp("v1-run")
    with pytest.MonkeyPatch.context() as patch:
        use_tiny_network(patch)
        trained = ["--data-root", str(data_root), *TINY_FLAGS, "--resnet-v1-strides", "--epochs", "1", "--seed", "7",
                   "--lr", "3e-4", "--dropout", "0.25", "--label-smoothing", "0.1", "--aug-rotation-deg", "5",
                   "--out-dir", str(out)]
        assert main(["train", *trained]) == 0 and main(["evaluate", *trained]) == 0
        yield out


@pytest.mark.parametrize("stage", ["evaluate", "export", "quantize"])
@pytest.mark.parametrize("flags, field", [(["--subset", "40", "--dropout", "0.25"], "resnet_v1_strides"),
                                          (["--resnet-v1-strides", "--subset", "20", "--dropout", "0.25"], "subset"),
                                          (["--resnet-v1-strides", "--subset", "40"], "dropout"),
                                          (["--resnet-v1-strides", "--subset", "40", "--dropout", "0.25",
                                            "--hidden", "256"], "hidden")])
def test_stages_refuse_flags_that_change_the_runs_network_or_data(v1_run, data_root, stage, flags, field, capsys):
    """Without --resnet-v1-strides best.pt loads strictly into the other network, whose ONNX passes parity."""
    args = [stage, "--data-root", str(data_root), "--bootstrap", "20", "--calibration-images", "8", "--no-progress",
            "--out-dir", str(v1_run), *flags]
    assert main(args) == 2  # refused, one line naming the field (the CLI prints no traceback)
    assert field in capsys.readouterr().err


def test_export_cards_the_runs_saved_training_config(v1_run, data_root):
    """The command repeats only what defines the network and data; the recipe comes from config.json."""
    assert main(["export", "--data-root", str(data_root), "--subset", "40", "--resnet-v1-strides", "--dropout", "0.25",
                 "--out-dir", str(v1_run)]) == 0
    saved = json.loads((v1_run / "config.json").read_text())
    training = ModelCard.load(v1_run / "pneumonia_resnet50.card.json").extra["training"]
    assert (training["epochs"], training["seed"], training["lr"], training["weights"]) == (1, 7, 3e-4, "none")
    assert (training["label_smoothing"], training["augment"]["rotation_deg"], training["frozen"]) == (0.1, 5.0, [])
    assert {k: v for k, v in training.items() if k not in COMMAND_FIELDS} == \
           {k: v for k, v in saved.items() if k not in COMMAND_FIELDS}
    assert ModelCard.load(v1_run / "pneumonia_resnet50.card.json").extra["weights_origin"]["kind"] == "none"


@pytest.fixture
def evaluated_run(tmp_path, data_root, monkeypatch):
    """A tiny run trained and evaluated with its own strata targets, bootstrap and no flip TTA."""
    use_tiny_network(monkeypatch)
    out = tmp_path / "run"
    flags = ["--data-root", str(data_root), *TINY_FLAGS, "--epochs", "1", "--out-dir", str(out)]
    assert main(["train", *flags]) == 0
    assert main(["evaluate", *flags, "--rule-out-sensitivity", "0.9", "--high-suspicion-specificity", "0.8",
                 "--bootstrap", "7", "--no-tta"]) == 0
    return out, flags


def test_the_card_records_the_settings_the_evaluation_used(evaluated_run):
    """`export` without the evaluation's flags carded the defaults (0.98/0.95, 2000 rounds, flip TTA on)
    beside cut-points fitted at 0.9/0.8 and CIs of 7 rounds."""
    out, flags = evaluated_run
    assert main(["export", *flags]) == 0
    training = ModelCard.load(out / "pneumonia_resnet50.card.json").extra["training"]
    assert training["strata"] == {"rule_out_sensitivity": 0.9, "high_suspicion_specificity": 0.8}
    assert (training["bootstrap"], training["tta_hflip"]) == (7, False)


def test_export_refuses_an_evaluation_of_other_weights(evaluated_run, capsys):
    """`train` again into an evaluated run's folder rewrote best.pt and left evaluation.json; `export` then
    shipped the new weights with the old model's temperature, strata, TTA choice and test figures. (A fresh
    `train` into a run's folder now needs --overwrite.)"""
    out, flags = evaluated_run
    assert main(["train", *flags, "--seed", "7", "--overwrite"]) == 0
    assert main(["export", *flags]) == 2
    assert "was computed from another best.pt" in capsys.readouterr().err
    assert not (out / "pneumonia_resnet50.onnx").exists()
    assert main(["evaluate", *flags]) == 0 and main(["export", *flags]) == 0


@pytest.mark.parametrize("checkpoint, says", [("nothere.pt", "does not exist"), ("best.pt", "is not a resume checkpoint")])
def test_a_resume_that_cannot_work_is_refused_before_config_json_changes(evaluated_run, checkpoint, says, capsys):
    """The command's --epochs and --resume were written to config.json before the checkpoint failed to load,
    and the run's later cards described a recipe that never ran."""
    out, flags = evaluated_run
    before = (out / "config.json").read_text()
    assert main(["train", *flags, "--epochs", "9", "--resume", str(out / checkpoint)]) == 2
    assert says in capsys.readouterr().err
    assert (out / "config.json").read_text() == before
