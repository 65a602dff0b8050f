"""One stored DICOM file -> an outcome (done / skipped / failed with reason). No database here.

Stages, each in its own module: read (models.dicom_io) -> select (worker.selection) ->
pixels (models.dicom_io) -> preprocess + infer (models) -> stratum and worklist flag.
Every expected problem with the *input* becomes an outcome with a reason; only
infrastructure problems (database, broker) escape as exceptions, to be retried.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from models.dicom_io import dicom_to_grayscale, read_dicom
from models.errors import MODALITIES, STRICT_UID, ImageAccessError, UnreadableImageError
from worker.config import STRATUM_SEVERITY, WorkerSettings
from worker.selection import assumed_tags, skip_reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What happened to one instance; `fields` are extra columns for its row."""

    status: str
    reason: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


PROVIDERS = {"auto": (None, None), "cpu": (["CPUExecutionProvider"], None),
             "cuda": (["CUDAExecutionProvider"], "CUDAExecutionProvider")}
"""TRIAGE_EXECUTION_PROVIDER -> (providers asked of onnxruntime, the one that must be active)."""


def make_detector(settings: WorkerSettings) -> Any:
    """The worker's one way to build its detector, so `check` probes exactly what tasks run."""
    from models.detector import PneumoniaDetector

    providers, required = PROVIDERS[settings.execution_provider]
    detector = PneumoniaDetector(settings.resolved_model_path(), providers, intra_op_threads=settings.intra_op_threads,
                                 site_calibration=settings.site_calibration, require_provider=required,
                                 lut_shape_conflict=settings.presentation_lut_conflict,
                                 polarity_check=settings.refuses_misoriented)  # as `check` and calibrate read images
    check_card_fits_results(detector.card)
    return detector


def check_card_fits_results(card: Any) -> None:
    """Refuse a card whose name, version or labels the results table cannot hold.

    PostgreSQL refuses a value longer than its column (SQLite keeps it), so a retrained model
    carded `--model-version 1.2.0+g<sha>.site-retrain...` failed every image "result could not be
    stored" while `check` said ok. As a model problem it is retried and claims nothing."""
    from models.errors import ModelIntegrityError
    from worker.db import instances

    fields = [("model_name", "name", card.name), ("model_version", "version", card.version),
              *(("prediction", "label", label) for label in card.labels)]
    for column, what, value in fields:
        limit = instances.c[column].type.length
        if len(value) > limit:
            raise ModelIntegrityError(f"the model card's {what} is {len(value)} characters; the results table "
                                      f"holds {limit} (`{column}`): re-card the model with a shorter one")


def active_providers(settings: dict[str, Any]) -> list[str]:
    """Build the detector as tasks would and return the providers onnxruntime actually runs.

    Takes plain settings so it can run in a spawned process (see `worker.cli.probe_providers`).
    """
    return list(make_detector(WorkerSettings(**settings)).providers)


class DetectorCache:
    """One onnxruntime session per worker process, created on first use (after fork)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self._settings = settings
        self._detector: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._detector is None:
                self._detector = make_detector(self._settings)
                log.info("model %s %s loaded (%s)", self._detector.card.name,
                         self._detector.card.version, ",".join(self._detector.providers))
            return self._detector


def identifiers(ds: Dataset) -> dict[str, Any]:
    """The only identifiers stored: UIDs, accession number and modality (no patient data).

    A series UID that is not a UID, or a modality that is not one of the standard's terms, is not
    stored: with validation off either element can hold any text, a patient's name included, and
    `list`, `show` and `export` print the modality."""
    series, modality = _text(ds, "SeriesInstanceUID", 64), _text(ds, "Modality", 16)
    return {
        "study_instance_uid": _text(ds, "StudyInstanceUID", 64),
        "series_instance_uid": series if series and STRICT_UID.fullmatch(series) else None,
        "accession_number": _text(ds, "AccessionNumber", 64),
        "modality": modality.upper() if modality and modality.upper() in MODALITIES else None,
    }


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    """The element as stored text; NUL bytes are dropped (PostgreSQL refuses them in text columns,
    and pydicom keeps them when validation is off)."""
    value = ds.get(keyword)
    if isinstance(value, MultiValue):  # `ACC1\ACC2` as written, not Python's "['ACC1', 'ACC2']"
        value = "\\".join(str(v) for v in value)
    return str(value).replace("\x00", "").strip()[:limit] or None if value is not None else None


HEADER_BYTES = 1 << 20
"""How much of a file `header_identifiers` reads: its identifiers sit in groups 0008 and 0020, near
the start, and a file that may have killed its worker is read no further than that."""

LAST_IDENTIFIER = Tag(0x0020, 0x000E)  # Series Instance UID: accession (0008,0050), modality (0008,0060) before it


def header_identifiers(path: Path) -> dict[str, Any]:
    """The stored identifiers of a file that was never scored (a delivery lost, a time limit), {} when
    they cannot be read: without its accession number a failure cannot be found from the worklist.

    The file may be the poison one that killed its workers: only its first `HEADER_BYTES` are read,
    parsing stops after Series Instance UID, no pixel is decoded, and no error escapes (a recorded
    failure must never turn into a retry or a crash because its identifiers could not be read)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEADER_BYTES)
        ds = read_partial(io.BytesIO(head), stop_when=_after_identifiers)
        return identifiers(ds)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # a truncated, corrupt or unreadable header: the row goes without identifiers
        return {}


def _after_identifiers(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > LAST_IDENTIFIER


def pixel_data_digest(path: Path) -> tuple[str, str]:
    """(transfer syntax UID, SHA-256 of the Pixel Data element's bytes as stored), never decoded.

    Why: a duplicate of a scored instance is not scored again; this tells an identical re-send
    (Orthanc re-pushing what it stored: same bytes in the same transfer syntax, whatever its meta
    header says) from one whose image changed. Raises on an unreadable file or one without pixels."""
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ValueError("no PixelData element")
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    return syntax, hashlib.sha256(ds["PixelData"].value).hexdigest()


RESEND_COMPARED = ("AccessionNumber", "PatientID", "Modality", "BodyPartExamined", "ViewPosition",
                   "PatientOrientation", "PresentationIntentType", "ImageType")
"""Header elements that find a result on the worklist (accession, patient) or decide whether it is scored
(the selection's, `worker.selection.skip_reason`: Image Type skips a localizer or a dual-energy bone image):
a re-send that corrects one of them after the result is stored is not re-evaluated."""


def header_differences(path: Path, first: Path) -> list[str]:
    """Keywords of `RESEND_COMPARED` whose values differ between two copies of an instance (headers only)."""
    resent, kept = (pydicom.dcmread(p, stop_before_pixels=True, specific_tags=list(RESEND_COMPARED)) for p in (path, first))
    return [keyword for keyword in RESEND_COMPARED if _compared(resent, keyword) != _compared(kept, keyword)]


def _compared(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def analyse_file(path: Path, settings: WorkerSettings, detectors: DetectorCache) -> Outcome:
    """Read, select, decode and infer one file; input problems become `failed`/`skipped`."""
    try:
        ds = read_dicom(str(path))
    except ImageAccessError:
        raise  # the spool's storage, not the image: retried, and the file stays in pending/
    except UnreadableImageError as exc:
        return Outcome("failed", str(exc))
    ids = identifiers(ds)
    reason = skip_reason(ds, settings.missing_tag_policy)
    if reason is not None:
        return Outcome("skipped", reason, ids)
    assumed = assumed_tags(ds, settings.missing_tag_policy)
    try:
        image = dicom_to_grayscale(ds, lut_shape_conflict=settings.presentation_lut_conflict)
    except UnreadableImageError as exc:
        return Outcome("failed", str(exc), ids)
    del ds  # its Pixel Data and decoded array (4 bytes a pixel) are not needed while the model runs
    outcome = infer(image, ids, settings, detectors.get())
    if assumed and outcome.status == "done":
        note = f"scored as a frontal chest without {', '.join(assumed)} (TRIAGE_MISSING_TAG_POLICY=process)"
        return Outcome(outcome.status, note, outcome.fields)
    return outcome


def infer(image: np.ndarray, ids: dict[str, Any], settings: WorkerSettings, detector: Any) -> Outcome:
    """Calibrated probability -> prediction, stratum and worklist flag from the model card."""
    card = detector.card
    try:
        # the call's settings decide, not the cached detector's: one detector serves the process, built once
        inputs = detector.checked_input(image, settings.refuses_misoriented)[None]
    except UnreadableImageError as exc:  # the contract's own refusals (size, aspect, polarity) are the image's
        return Outcome("failed", str(exc), ids)
    probability = float(detector.pneumonia_probability(inputs)[0])
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
