"""A tiny stand-in for the ResNet-50, so resume and stage tests run whole pipelines in seconds on 2 cores.

It keeps what those tests rely on: a head with dropout (which draws from torch's global RNG in
training), `hidden` and `dropout` taken from the config, and input of any size (the 224 px batches).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from training.config import TrainConfig

TINY_FLAGS = ["--subset", "40", "--samples-per-epoch", "0", "--batch-size", "16", "--frozen", "", "--weights", "none",
              "--ema-decay", "0.9", "--bootstrap", "20", "--device", "cpu", "--precision", "fp32", "--no-progress"]
"""CLI flags of a tiny run: the tiny-subset settings of the pipeline tests; nothing frozen (no ResNet modules)."""


class TinyNet(nn.Module):
    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 8, stride=8)
        self.fc = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def build_tiny(weights: str, *, hidden: int = 8, dropout: float = 0.5, frozen: tuple[str, ...] = (),
               resnet_v1_strides: bool = False) -> nn.Module:
    """`training.model.build_model`'s signature; the stride flag has no stand-in (the stages check it by config)."""
    return TinyNet(hidden, dropout)


def use_tiny_network(patch: pytest.MonkeyPatch) -> None:
    """Where training (fit) and every later stage (load_trained) build their network."""
    patch.setattr("training.train.build_model", build_tiny)
    patch.setattr("training.evaluate.build_model", build_tiny)


@pytest.fixture
def tiny_network(monkeypatch: pytest.MonkeyPatch) -> None:
    use_tiny_network(monkeypatch)


def tiny_config(out: Path, data_root: Path, **changes) -> TrainConfig:
    """`TINY_FLAGS` as a config, for calling `fit` directly."""
    settings = dict(data_root=data_root, subset=40, epochs=2, samples_per_epoch=0, batch_size=16, frozen=(),
                    weights="none", hidden=8, ema_decay=0.9, progress=False, out_dir=out, device="cpu",
                    precision="fp32")
    return TrainConfig(**{**settings, **changes})
