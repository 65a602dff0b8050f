"""Synthetic-but-realistic chest X-ray DICOM objects built from PneumoniaMNIST images.

Shared by the worker tests, the gateway tests and the benchmark, so every component is
exercised with the same kind of object a CR/DX modality would send: upscaled pixels at
modality bit depth, rescale and window tags, MONOCHROME1 stored inverted, compressed
transfer syntaxes. Patient name and ID are synthetic; no real identifiers exist here.

Compression: pydicom's own encoders cover RLE and JPEG 2000 (pylibjpeg-openjpeg); the
JPEG family (Baseline, Extended, Lossless .57/.70) and JPEG-LS come from DCMTK's
``dcmcjpeg``/``dcmcjpls`` because pydicom cannot encode them without extra plugins.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

CR_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_PROCESSING_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
CT_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.2")
BASIC_TEXT_SR_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.88.11")

PYDICOM_ENCODED = {RLELossless, JPEG2000Lossless, JPEG2000}
DCMTK_FLAGS: dict[str, list[str]] = {
    JPEGBaseline8Bit: ["dcmcjpeg", "+eb"],
    JPEGExtended12Bit: ["dcmcjpeg", "+ee"],
    JPEGLossless: ["dcmcjpeg", "+el"],
    JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
    JPEGLSLossless: ["dcmcjpls", "+el"],
}
"""Transfer syntaxes encoded by a DCMTK tool (pydicom cannot encode them itself)."""

SPLITS = ("train", "val", "test")


def load_pneumoniamnist(data_root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of one split; label 1 = pneumonia."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    with np.load(Path(data_root) / "pneumoniamnist.npz") as data:
        return data[f"{split}_images"], data[f"{split}_labels"].reshape(-1).astype(np.int64)


def upscale(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixel-replication upscale of a 2-D image to (rows, cols), as float64.

    Why replication and not bilinear: the serving preprocessing area-averages a
    radiograph back down to 28x28, and replication makes that round trip (nearly)
    exact, so a DICOM built here scores like its source thumbnail and the end-to-end
    parity test measures the DICOM path, not an interpolation blur we introduced.
    """
    rows, cols = size
    src = np.asarray(image, dtype=np.float64)
    return src[_nearest_index(src.shape[0], rows)][:, _nearest_index(src.shape[1], cols)]


def _nearest_index(src: int, dst: int) -> np.ndarray:
    return np.minimum(((np.arange(dst) + 0.5) * src / dst).astype(int), src - 1)


def stored_values(image: np.ndarray, size: tuple[int, int], bits_stored: int, photometric: str) -> np.ndarray:
    """8-bit thumbnail -> stored pixel values at the modality's bit depth (inverted for MONOCHROME1)."""
    maximum = (1 << bits_stored) - 1
    unit = upscale(np.asarray(image, dtype=np.float64) / 255.0, size)
    values = np.rint(np.clip(unit, 0.0, 1.0) * maximum)
    if photometric == "MONOCHROME1":
        values = maximum - values
    dtype = np.uint8 if bits_stored <= 8 else np.uint16
    return values.astype(dtype)


def make_cxr_dataset(
    image: np.ndarray,
    *,
    modality: str = "CR",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    size: tuple[int, int] = (2048, 2048),
    view: str | None = "PA",
    body_part: str | None = "CHEST",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    accession: str = "ACC0001",
    transfer_syntax: str = ExplicitVRLittleEndian,
    presentation_intent: str = "FOR PRESENTATION",
    instance_number: int = 1,
) -> Dataset:
    """A CR/DX (or other-modality) single-frame object holding `image` upscaled to `size`.

    `view=None` / `body_part=None` omit those tags, to exercise the missing-tag policy.
    The window (centre 2**(b-1), width 2**b) maps the full stored range linearly onto the
    display range, so the displayed image equals the thumbnail up to quantisation.
    """
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
    pixels = stored_values(image, size, bits_stored, photometric)
    ds = _base_dataset(modality, study_uid, series_uid, sop_uid, accession, presentation_intent)
    ds.InstanceNumber = instance_number
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    _set_image_module(ds, pixels, bits_stored, photometric)
    return encode(ds, transfer_syntax)


def _sop_class_for(modality: str, presentation_intent: str) -> UID:
    if modality == "DX":
        return DX_PROCESSING_SOP_CLASS if presentation_intent == "FOR PROCESSING" else DX_PRESENTATION_SOP_CLASS
    if modality == "CT":
        return CT_SOP_CLASS
    return CR_SOP_CLASS


def _base_dataset(
    modality: str,
    study_uid: str | None,
    series_uid: str | None,
    sop_uid: str | None,
    accession: str,
    presentation_intent: str,
) -> Dataset:
    """Patient/study/series/equipment modules with synthetic identifiers."""
    now = dt.datetime.now(dt.timezone.utc)
    ds = Dataset()
    ds.SOPClassUID = _sop_class_for(modality, presentation_intent)
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "SYNTHETIC^PATIENT"
    ds.PatientID = "SYN-000001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.Manufacturer = "SYNTHETIC"
    ds.InstitutionName = "TEST HOSPITAL"
    ds.StudyDescription = "XR CHEST" if modality in ("CR", "DX") else f"{modality} STUDY"
    if modality == "DX":
        ds.PresentationIntentType = presentation_intent
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    return ds


def _set_image_module(ds: Dataset, pixels: np.ndarray, bits_stored: int, photometric: str) -> None:
    """Image pixel, modality LUT and VOI LUT modules as a CR/DX modality writes them."""
    allocated = 8 if bits_stored <= 8 else 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.139, 0.139]
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 1 << (bits_stored - 1)
    ds.WindowWidth = 1 << bits_stored
    ds.VOILUTFunction = "LINEAR"
    ds.PixelData = pixels.tobytes()


def _file_meta(ds: Dataset, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.10.1448.1")
    return meta


def encode(ds: Dataset, transfer_syntax: str) -> Dataset:
    """Return `ds` in `transfer_syntax`, compressing with pydicom or a DCMTK tool."""
    syntax = UID(transfer_syntax)
    ds.file_meta = _file_meta(ds, ExplicitVRLittleEndian)
    if syntax == ExplicitVRLittleEndian:
        return ds
    if syntax in PYDICOM_ENCODED:
        kwargs = {"j2k_cr": [20], "j2k_psnr": None} if syntax == JPEG2000 else {}
        ds.compress(syntax, generate_instance_uid=False, **kwargs)
        return ds
    if syntax in DCMTK_FLAGS:
        return _dcmtk_encode(ds, DCMTK_FLAGS[syntax])
    raise ValueError(f"no encoder for transfer syntax {syntax}")


def _dcmtk_encode(ds: Dataset, command: list[str]) -> Dataset:
    """Round-trip through a DCMTK encoder; raises RuntimeError if the tool is missing."""
    if shutil.which(command[0]) is None:
        raise RuntimeError(f"DCMTK tool {command[0]} is not installed")
    with tempfile.TemporaryDirectory(prefix="cxr-encode-") as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        ds.save_as(src, enforce_file_format=True)
        result = subprocess.run([*command, str(src), str(dst)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {result.stderr.strip()[:500]}")
        return pydicom.dcmread(dst)


def make_sr_dataset(*, study_uid: str | None = None, accession: str = "ACC0001") -> Dataset:
    """A Basic Text SR object (non-image) in a chest study: must be skipped, never decoded."""
    ds = _base_dataset("SR", study_uid, None, None, accession, "")
    ds.SOPClassUID = BASIC_TEXT_SR_SOP_CLASS
    ds.ValueType = "CONTAINER"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    return encode(ds, ExplicitVRLittleEndian)


def save(ds: Dataset, path: str | Path) -> Path:
    """Write a Part-10 file, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_sample_study(
    out_dir: str | Path, images: Iterable[np.ndarray] | np.ndarray, **kw: object
) -> list[Path]:
    """Write one study (shared Study/Series UID) of CXR objects, one file per image.

    Files are named `<SOPInstanceUID>.dcm`. Keyword arguments go to `make_cxr_dataset`;
    `sop_uid` and `instance_number` are set per image.
    """
    kw = dict(kw)
    kw.setdefault("study_uid", generate_uid())
    kw.setdefault("series_uid", generate_uid())
    paths = []
    for number, image in enumerate(images, start=1):
        ds = make_cxr_dataset(image, **{**kw, "sop_uid": generate_uid(), "instance_number": number})
        paths.append(save(ds, Path(out_dir) / f"{ds.SOPInstanceUID}.dcm"))
    return paths


def dataset_uids(ds: Dataset) -> tuple[str, str, str]:
    """(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) of a dataset."""
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


__all__: Sequence[str] = (
    "dataset_uids",
    "encode",
    "load_pneumoniamnist",
    "make_cxr_dataset",
    "make_sr_dataset",
    "save",
    "write_sample_study",
)


def write_labelled_cases(out_dir: str | Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """PNG files plus `cases.csv` (path,label): the input of `pneumonia-worker calibrate`."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = ["path,label"]
    for index, (image, label) in enumerate(zip(images, labels)):
        name = f"case_{index:05d}.png"
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(out_dir / name)
        rows.append(f"{name},{'pneumonia' if int(label) else 'normal'}")
    csv_path = out_dir / "cases.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


# --- result rows (no DICOM) for pneumonia-admin ---
STRATA = [("likely_normal", 0, "ROUTINE"), ("indeterminate", 1, "PRIORITY"), ("high_suspicion", 2, "URGENT")]


def populate_results(url: str, n: int, seed: int = 0) -> list[dict]:
    """Result rows for admin queries: n instances over n/4 studies, ~10% skipped/failed, finished within
    the last hour; the database at `url` is migrated first. Shared by the admin tests and benchmark."""
    import random

    from sqlalchemy import insert

    from worker import db
    from worker.migrate import upgrade

    rng = random.Random(seed)
    now = db.utcnow()
    rows = []
    for i in range(n):
        status = rng.choices(["done", "skipped", "failed"], [0.9, 0.07, 0.03])[0]
        received = now - dt.timedelta(seconds=rng.uniform(60, 3600))
        finished = received + dt.timedelta(seconds=rng.uniform(0.1, 5))
        row = {"sop_instance_uid": f"1.2.{i}", "study_instance_uid": f"1.3.{i // 4}", "accession_number": f"A{i // 4}",
               "modality": "CR", "status": status, "attempts": 1, "received_at": received,
               "started_at": received, "finished_at": finished, "processing_ms": rng.uniform(50, 500),
               "probability": None, "stratum": None, "severity": None, "flag": None, "reason": None}
        if status == "done":
            name, sev, flag = rng.choice(STRATA)
            row.update(probability=rng.random(), stratum=name, severity=sev, flag=flag)
        else:
            row["reason"] = "view position LL is not frontal (PA/AP)" if status == "skipped" else "no PixelData element"
        rows.append(row)
    upgrade(url)
    engine = db.make_engine(url)
    with engine.begin() as conn:
        for start in range(0, n, 5000):
            conn.execute(insert(db.instances), rows[start:start + 5000])
        studies: dict[str, dict] = {}
        for r in rows:
            study = studies.setdefault(r["study_instance_uid"], {
                "study_instance_uid": r["study_instance_uid"], "accession_number": r["accession_number"],
                "first_received_at": r["received_at"], "last_received_at": r["received_at"], "final": False,
                "finalized_at": None, "first_finalized_at": None,
                "severity": None, "flag": None, "stratum": None, "max_probability": None})
            study["last_received_at"] = max(study["last_received_at"], r["received_at"])
            study["first_received_at"] = min(study["first_received_at"], r["received_at"])
            kept = (-1 if study["severity"] is None else study["severity"],
                    -1.0 if study["max_probability"] is None else study["max_probability"])
            if r["severity"] is not None and (r["severity"], r["probability"]) > kept:  # 0 is a severity
                study.update(severity=r["severity"], flag=r["flag"], stratum=r["stratum"],
                             max_probability=r["probability"])
        for study in studies.values():  # most finalised, as a day's worklist is: `--studies --flag ROUTINE` lists
            if rng.random() < 0.9:        # complete studies only (admin.NOT_TRIAGED)
                finalized = study["last_received_at"] + dt.timedelta(seconds=30)
                study.update(final=True, finalized_at=finalized, first_finalized_at=finalized)
        conn.execute(insert(db.studies), list(studies.values()))
    engine.dispose()
    return rows


ADMIN_QUERIES = {
    "list_flag": ("list", "--flag", "URGENT", "--limit", "50"),
    "list_accession": ("list", "--accession", "A321"),
    "studies_urgent": ("list", "--studies", "--flag", "URGENT", "--limit", "50"),
    "studies_routine": ("list", "--studies", "--flag", "ROUTINE", "--limit", "50"),
    "studies_not_triaged": ("list", "--studies", "--flag", "NOT_TRIAGED", "--limit", "50"),
    "studies_accession": ("list", "--studies", "--accession", "A321"),
    "show": ("show", "1.3.123"),
    "stats": ("stats", "--window-hours", "2", "--format", "json"),
}
"""`pneumonia-admin` commands over `populate_results` rows (each finds something from 2000 rows up):
the index-plan test and `benchmarks/admin_queries.py` run the same ones."""
