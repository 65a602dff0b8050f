"""One stored DICOM file -> an outcome (done / skipped / failed with reason). No database here.

Stages, each in its own module: read (models.dicom_io) -> select (worker.selection) ->
pixels (models.dicom_io) -> preprocess + infer (models) -> stratum and worklist flag.
Every expected problem with the *input* becomes an outcome with a reason; only
infrastructure problems (database, broker) escape as exceptions, to be retried.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from models.dicom_io import dicom_to_grayscale, read_dicom
from models.errors import UnreadableImageError
from worker.config import STRATUM_SEVERITY, WorkerSettings
from worker.selection import skip_reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What happened to one instance; `fields` are extra columns for its row."""

    status: str
    reason: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


class DetectorCache:
    """One onnxruntime session per worker process, created on first use (after fork)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self._settings = settings
        self._detector: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._detector is None:
                from models.detector import PneumoniaDetector

                self._detector = PneumoniaDetector(
                    self._settings.resolved_model_path(), intra_op_threads=self._settings.intra_op_threads,
                    site_calibration=self._settings.site_calibration,
                )
                log.info("model %s %s loaded (%s)", self._detector.card.name,
                         self._detector.card.version, ",".join(self._detector.providers))
            return self._detector


def identifiers(ds: Dataset) -> dict[str, Any]:
    """The only identifiers stored: UIDs, accession number and modality (no patient data)."""
    return {
        "study_instance_uid": _text(ds, "StudyInstanceUID", 64),
        "series_instance_uid": _text(ds, "SeriesInstanceUID", 64),
        "accession_number": _text(ds, "AccessionNumber", 64),
        "modality": _text(ds, "Modality", 16),
    }


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    return str(value).strip()[:limit] or None if value is not None else None


def analyse_file(path: Path, settings: WorkerSettings, detectors: DetectorCache) -> Outcome:
    """Read, select, decode and infer one file; input problems become `failed`/`skipped`."""
    try:
        ds = read_dicom(str(path))
    except UnreadableImageError as exc:
        return Outcome("failed", str(exc))
    ids = identifiers(ds)
    reason = skip_reason(ds, settings.missing_tag_policy)
    if reason is not None:
        return Outcome("skipped", reason, ids)
    try:
        image = dicom_to_grayscale(ds)
    except UnreadableImageError as exc:
        return Outcome("failed", str(exc), ids)
    return infer(image, ids, settings, detectors.get())


def infer(image: np.ndarray, ids: dict[str, Any], settings: WorkerSettings, detector: Any) -> Outcome:
    """Calibrated probability -> prediction, stratum and worklist flag from the model card."""
    card = detector.card
    probability = float(detector.pneumonia_probability(detector.preprocess([image]))[0])
    stratum = card.stratum_for(probability)
    normal, pneumonia = card.labels
    return Outcome(
        "done",
        None,
        {
            **ids,
            "model_name": card.name,
            "model_version": card.version,
            "model_sha256": card.sha256,
            "site_calibration_sha256": card.extra.get("site_calibration", {}).get("sha256"),
            "probability": probability,
            "prediction": pneumonia if probability >= card.threshold else normal,
            "stratum": stratum,
            "severity": STRATUM_SEVERITY[stratum],
            "flag": settings.flag_map[stratum],
        },
    )
