"""Progressive resizing (`--low-res-epochs`): early epochs train on a smaller upscale; everything scored stays at 224."""

import json
from pathlib import Path

import pytest
import torch

from tests.training.conftest import TinyNet, tiny_config
from training.config import TrainConfig
from training.errors import RefusedError
from training.runtime import make_runtime
from training.train import fit

RUNTIME = make_runtime("cpu", "fp32")


class SizeRecordingNet(TinyNet):
    """TinyNet that notes the side of every batch it sees, and whether it saw it training or scoring. The
    list is the class's, so the EMA copy (a deepcopy of the network, which validation scores) notes too."""

    seen: list[tuple[bool, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, x.shape[-1]))
        return super().forward(x)


@pytest.fixture
def seen_sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, int]]:
    def build(weights, *, hidden=8, dropout=0.5, frozen=(), resnet_v1_strides=False):
        return SizeRecordingNet(hidden, dropout)

    monkeypatch.setattr(SizeRecordingNet, "seen", [])
    monkeypatch.setattr("training.train.build_model", build)
    monkeypatch.setattr("training.evaluate.build_model", build)
    return SizeRecordingNet.seen


def test_the_schedule_names_the_low_side_for_the_first_epochs_only():
    config = TrainConfig(epochs=12, low_res_epochs=8, low_res_size=128)
    assert [config.train_input_size(epoch) for epoch in range(1, 13)] == [128] * 8 + [224] * 4
    assert {TrainConfig().train_input_size(epoch) for epoch in range(1, 13)} == {224}  # off by default


def test_early_epochs_train_small_and_validation_stays_at_224(seen_sizes, data_root, tmp_path):
    """The network trains on 64-pixel batches in epoch 1 and 224 in epochs 2-3; every validation pass
    (eval mode, the EMA copy) scores 224, the contract's size."""
    out = tmp_path / "run"
    result = fit(tiny_config(out, data_root, epochs=3, low_res_epochs=1, low_res_size=64), RUNTIME)

    trained = [side for training, side in seen_sizes if training]
    scored = {side for training, side in seen_sizes if not training}
    batches = len(trained) // 3
    assert trained == [64] * batches + [224] * (len(trained) - batches)
    assert scored == {224}
    assert [row["train_input_size"] for row in result.history] == [64, 224, 224]
    saved = json.loads((out / "config.json").read_text())
    assert (saved["low_res_epochs"], saved["low_res_size"]) == (1, 64)


def test_a_run_without_it_trains_at_224_throughout(seen_sizes, data_root, tmp_path):
    fit(tiny_config(tmp_path / "run", data_root, epochs=2), RUNTIME)
    assert {side for _, side in seen_sizes} == {224}


@pytest.mark.parametrize("changes, says", [
    ({"epochs": 4, "low_res_epochs": 4}, "at least the last epoch trains at 224"),
    ({"low_res_epochs": -1}, r"low_res_epochs must lie in \[0, epochs\)"),
    ({"low_res_epochs": 2, "low_res_size": 224}, r"low_res_size must lie in \[32, 224\)"),
    ({"low_res_epochs": 2, "low_res_size": 16}, r"low_res_size must lie in \[32, 224\)"),
])
def test_a_schedule_that_would_not_end_at_the_served_size_is_refused(changes, says):
    with pytest.raises(RefusedError, match=says):
        TrainConfig(**changes)


def saved_before_the_field(run, data_root) -> None:
    """config.json of a run written before progressive resizing existed (the 1.1.0 runs')."""
    tiny_config(run, data_root, epochs=1).dump(run / "config.json")
    saved = json.loads((run / "config.json").read_text())
    del saved["low_res_epochs"], saved["low_res_size"]
    (run / "config.json").write_text(json.dumps(saved))


def test_a_stage_on_an_older_run_cards_the_schedule_it_ran(data_root, tmp_path):
    """A missing field was taken from the stage's command: `evaluate --low-res-epochs 1` on a 1.1.0 run
    would have carded a schedule that never ran."""
    from training.config import for_existing_run

    run = tmp_path / "run"
    saved_before_the_field(run, data_root)
    staged = for_existing_run(tiny_config(run, data_root, epochs=3, low_res_epochs=2, low_res_size=64))
    assert (staged.low_res_epochs, staged.low_res_size) == (0, 128)


def test_an_older_run_resumes_only_at_224(tiny_network, data_root, tmp_path):
    run = tmp_path / "run"
    saved_before_the_field(run, data_root)
    with pytest.raises(RefusedError, match="low_res_epochs=0 .this command: 1.*resume continues the run's own recipe"):
        fit(tiny_config(run, data_root, low_res_epochs=1, resume=run / "last.pt"), RUNTIME)


@pytest.mark.parametrize("changes, says", [
    ({"image_size": 224, "low_res_epochs": 1, "low_res_size": 128}, "would be shrunk"),
    ({"epochs": 4, "low_res_epochs": 2, "swa_epochs": 3}, "swa_epochs must not reach into the low_res_epochs"),
    ({"low_res_epochs": 2, "distill_from": (Path("runs/teacher"),)}, "teachers would score the low-size batches"),
])
def test_what_it_cannot_be_combined_with_is_refused(changes, says):
    with pytest.raises(RefusedError, match=says):
        TrainConfig(**changes)
    TrainConfig(**{**changes, "low_res_epochs": 0})  # each is fine without it


def test_early_stopping_waits_for_an_epoch_at_224(data_root, tmp_path):
    """Patience 1 would stop after epoch 2 when validation does not improve; a run whose first 3 epochs are at
    64 trains on to epoch 4 at 224 whatever validation says."""
    from training.train import stop_after

    config = tiny_config(tmp_path / "run", data_root, epochs=6, patience=1, low_res_epochs=3, low_res_size=64)
    row = {"time_limit": False}
    assert [stop_after(row, epoch, 1, config) for epoch in (2, 3, 4)] == [None, None, "early_stop"]
    assert stop_after(row, 2, 1, tiny_config(tmp_path / "run", data_root, epochs=6, patience=1)) == "early_stop"
