"""Stochastic weight averaging (`--swa-epochs`): the run's model is the mean of its last epochs' weights."""

import json

import pytest
import torch

from tests.training.conftest import TINY_FLAGS, tiny_config
from training.cli import main
from training.config import TrainConfig
from training.runtime import make_runtime
from training.train import BEST, BEST_EPOCH, LAST, fit, running_mean

RUNTIME = make_runtime("cpu", "fp32")


def ema_weights(run_dir) -> dict[str, torch.Tensor]:
    """The EMA network's state at the end of a run's last epoch, as last.pt keeps it."""
    state = torch.load(run_dir / LAST, weights_only=True)["ema"]
    return {key.removeprefix("module."): value for key, value in state.items() if key.startswith("module.")}


def untimed(history: list[dict]) -> list[dict]:
    """History rows without their wall-clock fields, which differ between identical runs."""
    return [{k: v for k, v in row.items() if k not in ("train_seconds", "train_img_per_s")} for row in history]


def test_running_mean_is_the_uniform_mean_and_keeps_the_latest_counters():
    states = [{"w": torch.tensor([1.0, 4.0]), "bn.running_var": torch.tensor([2.0]),
               "bn.num_batches_tracked": torch.tensor(n)} for n in (1, 2, 3)]
    states[1]["w"], states[2]["w"] = torch.tensor([3.0, 0.0]), torch.tensor([8.0, 2.0])
    states[2]["bn.running_var"] = torch.tensor([5.0])
    average = None
    for count, state in enumerate(states):
        average = running_mean(average, state, count)
    assert torch.allclose(average["w"], torch.tensor([4.0, 2.0]))  # (1+3+8)/3, (4+0+2)/3
    assert torch.allclose(average["bn.running_var"], torch.tensor([3.0]))  # (2+2+5)/3
    assert average["bn.num_batches_tracked"] == 3


def test_running_mean_is_a_copy_that_later_steps_do_not_move():
    weights = torch.ones(2)
    average = running_mean(None, {"w": weights}, 0)
    weights.add_(1.0)
    assert torch.equal(average["w"], torch.ones(2))


def test_the_model_is_the_mean_of_the_last_epochs_and_the_picked_epoch_is_kept(tiny_network, data_root, tmp_path):
    """best.pt = mean of the end-of-epoch EMA weights of epochs 2 and 3 (the same trajectory as plain runs of
    2 and 3 epochs); best_epoch.pt = what the plain 3-epoch run kept."""
    plain2, plain3, averaged = tmp_path / "plain2", tmp_path / "plain3", tmp_path / "swa"
    fit(tiny_config(plain2, data_root, epochs=2), RUNTIME)
    fit(tiny_config(plain3, data_root, epochs=3), RUNTIME)
    result = fit(tiny_config(averaged, data_root, epochs=3, swa_epochs=2), RUNTIME)

    assert result.swa["epochs"] == [2, 3]
    assert result.best_checkpoint == averaged / BEST
    kept = torch.load(averaged / BEST, weights_only=True)
    assert kept["swa_epochs"] == [2, 3]
    at2, at3 = ema_weights(plain2), ema_weights(plain3)
    for key, value in kept["model"].items():
        assert torch.allclose(value, (at2[key] + at3[key]) / 2, atol=1e-6), key
    picked = torch.load(averaged / BEST_EPOCH, weights_only=True)
    reference = torch.load(plain3 / BEST, weights_only=True)
    assert picked["epoch"] == reference["epoch"] == result.best_epoch
    for key, value in reference["model"].items():
        assert torch.equal(picked["model"][key], value), key
    assert untimed(result.history) == untimed(json.loads((plain3 / "history.json").read_text()))


def test_a_resumed_run_averages_as_an_unbroken_one(tiny_network, data_root, tmp_path, monkeypatch):
    """The partial average travels in last.pt: a run killed inside the window resumes to the same model."""
    import training.train as train_module

    unbroken, killed = tmp_path / "unbroken", tmp_path / "killed"
    fit(tiny_config(unbroken, data_root, epochs=3, swa_epochs=2), RUNTIME)

    real_epoch = train_module.train_one_epoch

    def dies_in_epoch_3(*args, **kwargs):
        if kwargs.get("epoch", args[10] if len(args) > 10 else None) == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(killed, data_root, epochs=3, swa_epochs=2), RUNTIME)
    assert torch.load(killed / LAST, weights_only=True)["swa_epochs"] == [2]
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    fit(tiny_config(killed, data_root, epochs=3, swa_epochs=2, resume=killed / LAST), RUNTIME)

    for name in (BEST, BEST_EPOCH):
        expected, got = (torch.load(d / name, weights_only=True)["model"] for d in (unbroken, killed))
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"{name}: {key}"


def test_a_resume_keeps_the_window(tiny_network, data_root, tmp_path):
    """More epochs would move the window the saved partial average belongs to; so would another --swa-epochs."""
    run = tmp_path / "run"
    tiny_config(run, data_root, epochs=3, swa_epochs=2).dump(run / "config.json")
    with pytest.raises(ValueError, match="epochs=3"):
        fit(tiny_config(run, data_root, epochs=4, swa_epochs=2, resume=run / LAST), RUNTIME)
    with pytest.raises(ValueError, match="swa_epochs"):
        fit(tiny_config(run, data_root, epochs=3, swa_epochs=1, resume=run / LAST), RUNTIME)


def same_weights(a, b) -> bool:
    first, second = (torch.load(path, weights_only=True)["model"] for path in (a, b))
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def test_a_run_stopped_before_the_window_keeps_its_picked_epoch(tiny_network, data_root, tmp_path):
    run = tmp_path / "short"
    result = fit(tiny_config(run, data_root, epochs=3, swa_epochs=1, max_train_minutes=1e-6), RUNTIME)
    assert result.stop_reason == "time_limit" and result.swa is None
    assert same_weights(run / BEST, run / BEST_EPOCH)


def test_an_early_stop_inside_the_window_keeps_the_picked_epoch_not_a_short_average(tiny_network, data_root,
                                                                                      tmp_path):
    """Early stopping means the last epochs all scored below the picked one: averaging the one or two of them
    inside the window made an unselected epoch the model."""
    run = tmp_path / "early"
    result = fit(tiny_config(run, data_root, seed=1, epochs=6, swa_epochs=4, patience=2), RUNTIME)
    assert result.stop_reason == "early_stop" and len(result.history) < 6
    assert result.swa is None and same_weights(run / BEST, run / BEST_EPOCH)
    assert torch.load(run / BEST_EPOCH, weights_only=True)["epoch"] == result.best_epoch


def test_resuming_a_finished_run_keeps_the_picked_epoch_and_the_average(tiny_network, data_root, tmp_path):
    """`run --resume` again after a crash in evaluate or export: the average was renamed over best_epoch.pt."""
    run = tmp_path / "done"
    first = fit(tiny_config(run, data_root, epochs=3, swa_epochs=2), RUNTIME)
    picked, average = (torch.load(run / name, weights_only=True) for name in (BEST_EPOCH, BEST))
    again = fit(tiny_config(run, data_root, epochs=3, swa_epochs=2, resume=run / LAST), RUNTIME)
    assert again.history == first.history and again.swa["epochs"] == [2, 3]
    assert "swa_epochs" not in torch.load(run / BEST_EPOCH, weights_only=True)
    for name, before in ((BEST_EPOCH, picked), (BEST, average)):
        now = torch.load(run / name, weights_only=True)["model"]
        assert all(torch.equal(now[key], value) for key, value in before["model"].items()), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the device mix only exists there")
def test_the_average_is_kept_on_the_cpu():
    """A resume loads it from last.pt onto the CPU, where the live CUDA weights then met it."""
    average = running_mean(None, {"w": torch.ones(2, device="cuda")}, 0)
    assert average["w"].device.type == "cpu"
    moved = running_mean(average, {"w": torch.full((2,), 3.0, device="cuda")}, 1)
    assert torch.equal(moved["w"], torch.full((2,), 2.0)) and moved["w"].device.type == "cpu"


def test_swa_epochs_must_fit_the_schedule():
    with pytest.raises(ValueError, match="swa_epochs"):
        TrainConfig(epochs=3, swa_epochs=4)
    with pytest.raises(ValueError, match="swa_epochs"):
        TrainConfig(swa_epochs=-1)


def test_the_cli_run_records_and_reports_the_average(tiny_network, data_root, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY_FLAGS, "--data-root", str(data_root), "--epochs", "2", "--swa-epochs", "2",
                 "--out-dir", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["swa_epochs"] == 2
    run_info = json.loads((out / "run_info.json").read_text())
    assert run_info["swa"]["epochs"] == [1, 2] and 0.0 <= run_info["swa"]["val_auc"] <= 1.0
    assert main(["evaluate", *TINY_FLAGS, "--data-root", str(data_root), "--out-dir", str(out)]) == 0
    summary = (out / "results" / "summary.md").read_text()
    assert "weight average of epochs 1-2" in summary
