"""Resuming from last.pt: the same run as an unbroken one, in the run's own folder, as the same network, timed whole."""

import json
from pathlib import Path

import pytest
import torch

from tests.training.conftest import TINY_FLAGS, tiny_config
from training.cli import build_parser, config_from_args, main
from training.config import TrainConfig
from training.runtime import make_runtime
from training.train import fit

RUNTIME = make_runtime("cpu", "fp32")


def test_resumed_run_matches_an_unbroken_one_with_dropout(tiny_network, data_root, tmp_path):
    """Dropout (0.5 in the head) draws from torch's global RNG, which a resume must restore, not re-seed."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit(tiny_config(straight, data_root, dropout=0.5), RUNTIME)
    fit(tiny_config(resumed, data_root, dropout=0.5, epochs=1), RUNTIME)
    fit(tiny_config(resumed, data_root, dropout=0.5, resume=resumed / "last.pt"), RUNTIME)
    unbroken, continued = (torch.load(d / "last.pt", weights_only=True) for d in (straight, resumed))
    assert continued["epoch"] == unbroken["epoch"] == 2
    for part in ("model", "ema"):
        for key, value in unbroken[part].items():
            assert torch.equal(value, continued[part][key]), f"{part}.{key}"


def test_resume_without_out_dir_continues_in_the_checkpoints_folder():
    def out_dir(*flags: str) -> Path:
        return config_from_args(build_parser().parse_args(["train", *flags])).out_dir

    assert out_dir("--resume", "runs/X/last.pt") == Path("runs/X")
    assert out_dir("--resume", "runs/X/last.pt", "--out-dir", "runs/X") == Path("runs/X")
    assert out_dir() == TrainConfig().out_dir


def test_fit_refuses_to_resume_into_another_folder(tiny_network, data_root, tmp_path):
    """Its history, best.pt and config.json are beside last.pt: elsewhere the run would restart its record."""
    elsewhere = tmp_path / "default"
    with pytest.raises(ValueError, match="resume"):
        fit(tiny_config(elsewhere, data_root, resume=tmp_path / "X" / "last.pt"), RUNTIME)
    assert not elsewhere.exists()


def test_fit_refuses_to_resume_as_another_network(tiny_network, data_root, tmp_path):
    """Stride placement changes no shapes: last.pt would load strictly into the other network."""
    run = tmp_path / "v1"
    tiny_config(run, data_root, resnet_v1_strides=True).dump(run / "config.json")
    with pytest.raises(ValueError, match="resnet_v1_strides"):
        fit(tiny_config(run, data_root, resume=run / "last.pt"), RUNTIME)


def test_fit_refuses_to_resume_with_another_frozen_set(tiny_network, data_root, tmp_path):
    """The saved optimizer state belongs to the run's trainable parameters; --weights none changes the default set."""
    run = tmp_path / "pretrained"
    tiny_config(run, data_root, frozen=("conv1", "bn1")).dump(run / "config.json")
    with pytest.raises(ValueError, match="frozen"):
        fit(tiny_config(run, data_root, resume=run / "last.pt"), RUNTIME)


def test_resumed_run_reports_the_time_of_the_whole_run(tiny_network, data_root, tmp_path):
    """run_info's train_seconds (FitResult.seconds) counts the time spent before the resume too."""
    out = tmp_path / "run"
    common = ["train", "--data-root", str(data_root), *TINY_FLAGS, "--out-dir", str(out)]
    assert main([*common, "--epochs", "1"]) == 0
    before = torch.load(out / "last.pt", weights_only=True)["elapsed_seconds"]
    assert main([*common, "--epochs", "2", "--resume", str(out / "last.pt")]) == 0
    whole = torch.load(out / "last.pt", weights_only=True)["elapsed_seconds"]
    run_info = json.loads((out / "run_info.json").read_text())
    assert run_info["epochs_run"] == 2 and 0 < before < whole <= run_info["train_seconds"]


@pytest.mark.parametrize("change", [{"lr": 1e-3}, {"select_metric": "loss"}, {"ema_decay": 0.5}, {"seed": 7},
                                    {"low_res_epochs": 1}])
def test_fit_refuses_to_resume_with_another_recipe(tiny_network, data_root, tmp_path, change):
    """The saved optimizer kept the old lr while config.json (and so the card) recorded the new one; another
    select_metric compared an AUC with the saved -loss."""
    run = tmp_path / "run"
    tiny_config(run, data_root, epochs=1).dump(run / "config.json")
    with pytest.raises(ValueError, match=f"{next(iter(change))}=.*resume continues the run's own recipe"):
        fit(tiny_config(run, data_root, resume=run / "last.pt", **change), RUNTIME)


def test_resuming_an_early_stopped_run_trains_no_further(tiny_network, data_root, tmp_path):
    """Its patience was spent; the resume trained another epoch and moved history and best.pt."""
    run = tmp_path / "early"
    first = fit(tiny_config(run, data_root, seed=1, epochs=6, patience=1), RUNTIME)
    assert first.stop_reason == "early_stop"
    again = fit(tiny_config(run, data_root, seed=1, epochs=6, patience=1, resume=run / "last.pt"), RUNTIME)
    assert again.stop_reason == "early_stop" and len(again.history) == len(first.history)


def test_resume_with_overwrite_is_refused(tiny_network, data_root, tmp_path, capsys):
    """--overwrite was silently ignored and the run resumed: the command asked for both keeping and replacing it."""
    out = tmp_path / "run"
    fit(tiny_config(out, data_root, epochs=1), RUNTIME)
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert main(["train", "--data-root", str(data_root), *TINY_FLAGS, "--hidden", "8", "--epochs", "2",
                 "--resume", str(out / "last.pt"), "--overwrite"]) == 2
    assert "--overwrite would replace it: give one of them" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before


def test_a_run_into_its_own_teacher_s_folder_is_refused(tiny_network, data_root, tmp_path, capsys):
    """`--distill-from X --out-dir X --overwrite` removed the teacher's best.pt before reading it: a traceback,
    and the teacher run lost."""
    teacher = tmp_path / "teacher"
    fit(tiny_config(teacher, data_root, epochs=1), RUNTIME)
    before = {path.name: path.read_bytes() for path in teacher.iterdir() if path.is_file()}
    assert main(["train", "--data-root", str(data_root), *TINY_FLAGS, "--hidden", "8", "--epochs", "1",
                 "--distill-from", str(teacher), "--out-dir", str(teacher / "."), "--overwrite"]) == 2
    assert "a teacher of this run: give another --out-dir" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in teacher.iterdir() if path.is_file()} == before
