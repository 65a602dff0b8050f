"""How a stored radiograph is displayed before it reaches the model, through the worker's own path.

Each defective variant is built from a PneumoniaMNIST image (test[3], a normal study) as a Part-10
file and run through `worker.pipeline.analyse_file`: it must score like the clean file made from
the same image, or be refused with a recorded reason. Before these fixes every one of them was
scored silently, most as URGENT.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from worker.config import WorkerSettings
from worker.pipeline import DetectorCache, analyse_file
from worker.samples import make_cxr_dataset, save

NORMAL = 3
"""PneumoniaMNIST test[3]: a normal study (28x28 probability about 0.002, ROUTINE)."""
TOLERANCE = 0.01
"""|probability - clean probability| allowed for a variant that must display like the clean file."""


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> WorkerSettings:
    return WorkerSettings(database_url=f"sqlite:///{tmp_path_factory.mktemp('db') / 't.db'}")


@pytest.fixture(scope="module")
def detectors(settings: WorkerSettings) -> DetectorCache:
    return DetectorCache(settings)


@pytest.fixture(scope="module")
def normal(test_split) -> np.ndarray:
    images, labels = test_split
    assert labels[NORMAL] == 0
    return images[NORMAL]


def cr(image: np.ndarray, **kw) -> Dataset:
    """A 12-bit CR PA chest, 512x512 unless told otherwise."""
    return make_cxr_dataset(image, **{"size": (512, 512), "bits_stored": 12, **kw})


def outcome_of(ds: Dataset, tmp_path, settings, detectors, name: str = "x.dcm"):
    return analyse_file(save(ds, tmp_path / name), settings, detectors)


@pytest.fixture(scope="module")
def clean_probability(normal, settings, detectors, tmp_path_factory) -> float:
    outcome = outcome_of(cr(normal), tmp_path_factory.mktemp("clean"), settings, detectors)
    assert outcome.status == "done" and outcome.fields["flag"] == "ROUTINE"
    return outcome.fields["probability"]


def assert_scores_like_clean(outcome, clean_probability: float) -> None:
    assert outcome.status == "done", outcome.reason
    assert abs(outcome.fields["probability"] - clean_probability) < TOLERANCE, \
        (outcome.fields["probability"], clean_probability)
    assert outcome.fields["flag"] == "ROUTINE"


# --- 1. VOI LUT Sequence -------------------------------------------------------------------------

def with_voi_lut(ds: Dataset, descriptor: list[int], data: np.ndarray, vr: str = "US") -> Dataset:
    """Replace the window by a VOI LUT Sequence of one item."""
    del ds.WindowCenter, ds.WindowWidth
    item = Dataset()
    item.LUTDescriptor = descriptor
    values = np.asarray(data, dtype=np.uint16)
    item.add(DataElement(0x00283006, vr, values.astype("<u2").tobytes() if vr == "OW" else values.tolist()))
    ds.VOILUTSequence = Sequence([item])
    return ds


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_with_8_bit_entries_on_12_bit_data_scores_like_the_clean_file(
        tmp_path, normal, settings, detectors, clean_probability, vr):
    """Descriptor 4096\\0\\8: pydicom's apply_voi wrapped every input >= 256 (P 0.925, URGENT)."""
    ds = with_voi_lut(cr(normal), [4096, 0, 8], np.rint(np.arange(4096) / 4095 * 255), vr)
    assert_scores_like_clean(outcome_of(ds, tmp_path, settings, detectors), clean_probability)


def test_voi_lut_declaring_16_bits_with_12_bit_entries_is_scaled_by_its_real_depth(
        tmp_path, normal, settings, detectors, clean_probability):
    """Descriptor 4096\\0\\16 with entries 0..4095 (Agfa-style): read literally, the display's maximum
    was 0.06 (P 0.975, URGENT); Horos and Cornerstone scale it by the entries' 12 bits."""
    ds = with_voi_lut(cr(normal), [4096, 0, 16], np.arange(4096))
    assert_scores_like_clean(outcome_of(ds, tmp_path, settings, detectors), clean_probability)
