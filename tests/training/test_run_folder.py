"""Defects a review found in how a run treats its folder: start weights loaded only after config.json was
written, a fresh run mixing into another run's folder, checkpoints written in place (a kill left last.pt
empty), a time-limited epoch forgotten by a resume, an unwritable --out-dir, the wrong-md5 message."""

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.training.conftest import TINY_FLAGS, tiny_config
from training.cli import main
from training.config import WEIGHTS_ENV
from training.data import dataset_file, ensure_dataset
from training.errors import RefusedError
from training import report
from training.runtime import make_runtime
from training.train import LAST, fit

RUNTIME = make_runtime("cpu", "fp32")


@pytest.fixture(autouse=True)
def no_weights_env(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)


def write_bad_weights(folder, kind):
    """Start-weight files the reviewer used: corrupt, a .pth of some other dict, another network's tensors, no dict."""
    if kind == "corrupt":
        path = folder / "corrupt.safetensors"
        path.write_bytes(b"\xff" * 64)
    elif kind == "other_dict":
        path = folder / "other.pth"
        torch.save({"foo": torch.zeros(2)}, path)
    elif kind == "other_network":
        path = folder / "resnet18ish.safetensors"
        save_file({"conv1.weight": torch.zeros(64, 3, 3, 3), "fc.weight": torch.zeros(10, 512),
                   "head.bias": torch.zeros(10)}, str(path))
    else:
        path = folder / "list.pt"
        torch.save([torch.zeros(2)], path)
    return path


@pytest.mark.parametrize("kind, says", [("corrupt", "cannot be read (SafetensorError"),
                                        ("other_dict", "1 unexpected (foo)"),
                                        ("other_network", "of another shape (conv1.weight, fc.weight)"),
                                        ("not_a_dict", "holds a list, not a state dict")])
def test_start_weights_that_do_not_load_are_refused_before_config_json(tmp_path, data_root, kind, says, capsys):
    """Each was a traceback (rc 1) after config.json was rewritten with the failed command's recipe, which
    `export` then carded for the folder's old best.pt."""
    weights = write_bad_weights(tmp_path, kind)
    started = tmp_path / "started"  # a folder holding only a config.json (no checkpoints yet)
    started.mkdir()
    (started / "config.json").write_text('{"lr": 0.0001}\n')
    for out in (started, tmp_path / "fresh"):
        args = ["train", "--data-root", str(data_root), "--subset", "40", "--epochs", "1", "--lr", "5e-4",
                "--weights", str(weights), "--device", "cpu", "--no-progress", "--out-dir", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(weights) in err and says in err, err
    assert (started / "config.json").read_text() == '{"lr": 0.0001}\n'
    assert not (tmp_path / "fresh").exists()


def test_another_networks_weights_are_summarised_with_counts(tmp_path, data_root, capsys):
    weights = write_bad_weights(tmp_path, "other_network")
    assert main(["train", "--data-root", str(data_root), "--subset", "40", "--weights", str(weights), "--device", "cpu",
                 "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "not a torchvision ResNet-50's: 318 missing (bn1.weight, bn1.bias, bn1.running_mean, ...)" in err
    assert "1 unexpected (head.bias); 2 of another shape (conv1.weight, fc.weight)" in err and len(err) < 500


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_unless_overwrite(tiny_network, data_root, tmp_path, capsys):
    """It rewrote config.json over a finished run (or discarded an interrupted run's last.pt)."""
    out = tmp_path / "run"
    flags = ["train", "--data-root", str(data_root), *TINY_FLAGS, "--epochs", "1", "--out-dir", str(out)]
    assert main(flags) == 0
    saved, last = (out / "config.json").read_text(), (out / LAST).read_bytes()
    assert main([*flags, "--lr", "5e-4"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (best.pt, last.pt)" in err and f"--resume {out / LAST}" in err and "--overwrite" in err
    assert (out / "config.json").read_text() == saved and (out / LAST).read_bytes() == last
    assert main([*flags, "--lr", "5e-4", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["lr"] == 5e-4


def test_overwrite_removes_the_old_checkpoints_before_config_json_changes(tiny_network, data_root, tmp_path,
                                                                          monkeypatch):
    """A replacing run that dies before its first epoch must not leave the old best.pt under its own config.json."""
    out = tmp_path / "run"
    fit(tiny_config(out, data_root, epochs=1), RUNTIME)
    monkeypatch.setattr("training.train.train_one_epoch", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):
        fit(tiny_config(out, data_root, epochs=1, lr=5e-4), RUNTIME, overwrite=True)
    assert json.loads((out / "config.json").read_text())["lr"] == 5e-4
    assert not any((out / name).exists() for name in ("best.pt", "best_epoch.pt", "last.pt"))


def test_a_kill_while_saving_leaves_the_previous_checkpoints(tiny_network, data_root, tmp_path, monkeypatch):
    """torch.save straight onto last.pt truncated it first: a SIGKILL mid-save left 0 bytes and no resume point."""
    out = tmp_path / "run"
    fit(tiny_config(out, data_root, epochs=1), RUNTIME)
    before = {name: (out / name).read_bytes() for name in ("best.pt", "last.pt", "history.json", "config.json")}
    real_save = torch.save

    def killed_mid_write(state, target, *args, **kwargs):
        handle = open(target, "wb") if not hasattr(target, "write") else target
        handle.write(b"PK\x03\x04 partial")  # the first bytes reach the file, then the process dies
        handle.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(out, data_root, epochs=2, resume=out / LAST), RUNTIME)
    monkeypatch.setattr(torch, "save", real_save)
    for name in ("best.pt", "last.pt"):
        assert (out / name).read_bytes() == before[name], name
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporary file left behind
    resumed = fit(tiny_config(out, data_root, epochs=2, resume=out / LAST), RUNTIME)
    assert [row["epoch"] for row in resumed.history] == [1, 2]


def test_a_time_limited_epoch_is_still_reported_after_a_resume(tiny_network, data_root, tmp_path):
    """Resumed to its last epoch, the run said stop_reason `epochs` and nothing else: its card presented
    a schedule with a cut-short epoch as the full recipe."""
    out = tmp_path / "run"
    common = ["train", "--data-root", str(data_root), *TINY_FLAGS, "--out-dir", str(out)]
    assert main([*common, "--epochs", "1", "--max-train-minutes", "0.00001"]) == 0
    first = json.loads((out / "run_info.json").read_text())
    assert (first["stop_reason"], first["truncated_epochs"]) == ("time_limit", [1])
    assert main([*common, "--epochs", "2", "--resume", str(out / LAST)]) == 0
    resumed = json.loads((out / "run_info.json").read_text())
    assert (resumed["stop_reason"], resumed["epochs_run"], resumed["truncated_epochs"]) == ("epochs", 2, [1])
    assert torch.load(out / LAST, weights_only=True)["truncated_epochs"] == [1]
    assert report.truncated_note(resumed) == "; epoch 1 cut short by --max-train-minutes"


def test_a_resume_of_an_older_time_limited_checkpoint_reads_the_history(tiny_network, data_root, tmp_path):
    """last.pt from before `truncated_epochs` was saved: history.json's time_limit rows say which were cut."""
    out = tmp_path / "run"
    fit(tiny_config(out, data_root, epochs=1, max_train_minutes=1e-7), RUNTIME)
    state = torch.load(out / LAST, weights_only=True)
    del state["truncated_epochs"]
    torch.save(state, out / LAST)
    assert fit(tiny_config(out, data_root, epochs=2, resume=out / LAST), RUNTIME).truncated_epochs == (1,)


@pytest.mark.parametrize("where", ["/proc/nope", "FILE/x"])
def test_an_out_dir_that_cannot_be_made_is_refused_in_one_line(tiny_network, data_root, tmp_path, where, capsys):
    """mkdir's FileNotFoundError / NotADirectoryError was a traceback (rc 1)."""
    (tmp_path / "FILE").write_text("a regular file")
    out = where.replace("FILE", str(tmp_path / "FILE"))
    assert main(["train", "--data-root", str(data_root), *TINY_FLAGS, "--epochs", "1", "--out-dir", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--out-dir {out} cannot be written" in err


def test_a_wrong_data_file_names_the_settings_that_choose_it(tmp_path):
    """The missing-file message named --image-size, --data-root and PNEUMONIA_DATA_ROOT; the wrong-md5 one did not."""
    name, _ = dataset_file(64)
    (tmp_path / name).write_bytes(b"not the dataset")
    with pytest.raises(RefusedError, match=r"--image-size 64.*--data-root / \$PNEUMONIA_DATA_ROOT"):
        ensure_dataset(tmp_path, 64)


def test_an_epoch_that_trained_all_its_draws_is_not_cut_short(tiny_network, data_root, tmp_path):
    """The budget ran out in an epoch's last step: the log said all its draws trained, yet run_info.json
    listed it in truncated_epochs and the summary called it cut short."""
    out = tmp_path / "run"
    result = fit(tiny_config(out, data_root, epochs=2, samples_per_epoch=16, batch_size=16, max_train_minutes=1e-7),
                 RUNTIME)  # one step per epoch, which reaches the deadline
    assert (result.stop_reason, result.truncated_epochs) == ("time_limit", ())
    assert [(row["epoch"], row["train_images"], row["time_limit"]) for row in result.history] == [(1, 16, False)]
    assert torch.load(out / LAST, weights_only=True)["truncated_epochs"] == []
    cut = fit(tiny_config(tmp_path / "cut", data_root, epochs=2, samples_per_epoch=32, batch_size=16,
                          max_train_minutes=1e-7), RUNTIME)  # two steps: the second one never ran
    assert (cut.stop_reason, cut.truncated_epochs, cut.history[0]["train_images"]) == ("time_limit", (1,), 16)
