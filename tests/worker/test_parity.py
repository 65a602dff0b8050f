"""End-to-end parity: the 624 PneumoniaMNIST test images, as DICOM through a real worker,
score like the model itself and reproduce the model card's test AUC and accuracy.

One worker run (module fixture) feeds both tests. The DICOMs are 252x252 (9x the 28x28
source, so the serving area-downsampling restores the thumbnail exactly), alternating
CR MONOCHROME2 12-bit Explicit VR with DX MONOCHROME1 16-bit RLE.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from models.card import default_model_path
from models.detector import PneumoniaDetector
from models.preprocess import preprocess_batch
from worker import contract
from worker.samples import make_cxr_dataset

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.fixture(scope="module")
def worker_results(test_split, redis_server, tmp_path_factory):
    """Run all 624 test images through one real worker; returns (labels, probabilities, predictions)."""
    from tests.worker.support import TriageEnv

    images, labels = test_split
    workdir = tmp_path_factory.mktemp("parity")
    redis_server.flush()
    env = TriageEnv(redis_server.url, f"sqlite:///{workdir / 'triage.db'}", workdir / "spool", workdir)
    study = generate_uid()
    sops = []
    for i, image in enumerate(images):
        variant = (dict(modality="CR", transfer_syntax=ExplicitVRLittleEndian) if i % 2 == 0 else
                   dict(modality="DX", photometric="MONOCHROME1", bits_stored=16, transfer_syntax=RLELossless))
        sops.append(env.stage(make_cxr_dataset(image, size=(252, 252), study_uid=study, accession=f"P{i:04d}",
                                               **variant)))
    try:
        env.start_worker()
        client = env.client()
        for relpath, sop in sops:
            client.send_task(contract.PROCESS_INSTANCE, args=(relpath, sop), queue=contract.QUEUE)
        client.close()
        rows = env.wait_terminal([sop for _, sop in sops], timeout=900)
    finally:
        env.close()
    assert all(rows[sop]["status"] == "done" for _, sop in sops)
    probabilities = np.array([rows[sop]["probability"] for _, sop in sops])
    predictions = np.array([rows[sop]["prediction"] for _, sop in sops])
    return labels, probabilities, predictions


@pytest.fixture(scope="module")
def detector() -> PneumoniaDetector:
    return PneumoniaDetector(default_model_path())


def test_worker_matches_in_process_model_on_every_image(worker_results, test_split, detector):
    images, _ = test_split
    _, probabilities, _ = worker_results
    reference = np.concatenate([detector.pneumonia_probability(preprocess_batch(list(images[i:i + 64])))
                                for i in range(0, len(images), 64)])
    assert np.abs(probabilities - reference).max() < 1e-3


def test_worker_reproduces_model_card_test_metrics(worker_results, detector):
    labels, probabilities, predictions = worker_results
    card = detector.card
    subset = card.extra.get("training", {}).get("subset")
    if subset:
        pytest.skip(f"the packaged card's test metrics come from a {subset}-image subset, not the 624-image test split")
    auc = roc_auc(labels, probabilities)
    accuracy = float(np.mean((predictions == card.labels[1]) == (labels == 1)))
    expected_auc = float(card.metrics["test_auc"])
    expected_accuracy = float(card.metrics["test_at_0.5"]["accuracy"]["value"])
    assert abs(auc - expected_auc) < 0.005, (auc, expected_auc)
    assert abs(accuracy - expected_accuracy) <= 2 / len(labels) + 1e-9, (accuracy, expected_accuracy)
