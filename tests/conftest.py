"""Fixtures shared by every package's tests: where the PneumoniaMNIST file lives.

CI points PNEUMONIA_DATA_ROOT at ../shared/data; locally the same default applies.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("PNEUMONIA_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))
    if not (root / "pneumoniamnist.npz").is_file():
        pytest.fail(f"PneumoniaMNIST not found in {root}: set PNEUMONIA_DATA_ROOT to the folder holding pneumoniamnist.npz")
    return root


@pytest.fixture(scope="session")
def pneumoniamnist(data_root: Path) -> dict[str, np.ndarray]:
    with np.load(data_root / "pneumoniamnist.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def weights_path() -> Path | None:
    """Offline ImageNet weights if present (CI has them in ../shared/weights)."""
    path = Path(os.environ.get("PNEUMONIA_WEIGHTS", REPO_ROOT.parent / "shared" / "weights" / "resnet50_imagenet_v1.safetensors"))
    return path if path.is_file() else None
