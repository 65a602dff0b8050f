"""A study's triage result as a DICOM Structured Report, for the PACS (`pneumonia-admin sr`).

Why: the worklist flag lives in this product's database, where a RIS can poll it, but a radiologist reads
the study in the PACS viewer, which shows what the PACS holds. The report is a Comprehensive SR holding an
Imaging Measurement Report (TID 1500, built and checked by highdicom): one measurement group per scored image
(the calibrated probability of pneumonia, the stratum and the flag, the image it was read from, the model
that read it) and one for the study (its worklist flag and whether the triage is complete). It is marked
PRELIMINARY and UNVERIFIED: a triage aid, not a diagnosis, which its series description says too.

Its patient and study modules are copied from the study's archived images (each image's newest copy: a
corrected re-send after a patient merge carries the PACS's current identifiers), as any object filed under
the study must carry them; they are never logged or printed, and the libraries' warnings, which may quote
them, are silenced while the headers are read and the report is built and sent. Its times are the study's finalisation time and its
SOP Instance UID a digest of its encoded bytes, so building the same result again gives the same object, byte
for byte, and a changed one (a reprocessed image, a late one, another qualification) a new object in the same
series.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pydicom.valuerep import TM
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage

from worker.config import NOT_TRIAGED, STRATUM_SEVERITY

SCHEME = "99PNTRIAGE"
"""This product's private coding scheme (a designator starting with "99", PS3.16 section 8), declared in the
report's Coding Scheme Identification Sequence."""
SCHEME_NAME = "Pneumonia triage worker codes"
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain X-ray of chest")
PROBABILITY = Code("PROB", SCHEME, "Calibrated probability of pneumonia")
STRATUM = Code("STRATUM", SCHEME, "Triage stratum")
FLAG = Code("FLAG", SCHEME, "Worklist flag")
WORKLIST_FLAG = Code("WLFLAG", SCHEME, "Study worklist flag")
TRIAGE_COMPLETE = Code("COMPLETE", SCHEME, "Triage complete")
NO_UNITS = Code("1", "UCUM", "no units")
STRATUM_MEANINGS = {"high_suspicion": "High suspicion of pneumonia", "indeterminate": "Indeterminate",
                    "likely_normal": "Likely normal"}
SERIES_DESCRIPTION = "AI pneumonia triage (triage aid, not a diagnosis)"
SERIES_NUMBER = 9701
"""A fixed, high series number keeps the report's series apart from the modality's in a viewer's list."""
SR_NAMESPACE = "pneumonia-triage-sr"
PLACEHOLDER_UID = generate_uid(entropy_srcs=[SR_NAMESPACE, "placeholder"])
"""The SOP Instance UID the report is encoded with before its own is derived from the encoding."""


def _earlier(study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
    """What highdicom reads of a report this one replaces."""
    earlier = Dataset()
    earlier.StudyInstanceUID, earlier.SeriesInstanceUID, earlier.SOPInstanceUID = study_uid, series_uid, sop_uid
    earlier.SOPClassUID = ComprehensiveSRStorage
    return earlier


class ReportError(ValueError):
    """Why no report can be made for this study (nothing scored, an archived image gone, two patients).
    `transient`: a local problem that may pass (an archived copy this host cannot read now)."""

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient


@dataclass(frozen=True)
class ScoredImage:
    """One `done` row of the study, as the report states it."""

    sop_instance_uid: str
    probability: float
    stratum: str
    severity: int
    flag: str
    model_name: str
    model_version: str
    model_sha256: str
    site_calibration_sha256: str | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "ScoredImage":
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


COPIED_HEADER = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                 "AccessionNumber", "ReferringPhysicianName")
"""The patient and study attributes highdicom copies from the first image: Type 2 in the SR (present, maybe
empty), some of them Type 3 or absent in the images it reads."""
PATIENT_SEXES = ("M", "F", "O")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warning or log line from pydicom, highdicom or pynetdicom: their texts quote values (highdicom's
    check of a Person Name quotes the patient's name), and `pneumonia-admin` prints no patient data."""
    loggers = [logging.getLogger(name) for name in ("pydicom", "highdicom", "pynetdicom")]
    before = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:  # a level, not `disabled`: their modules log through child loggers (pynetdicom.acse)
            logger.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            for logger, level in zip(loggers, before):
                logger.setLevel(level)


def evidence_header(source: Dataset) -> Dataset:
    """A copy of an image's header with what the SR copies made valid: absent Type 2 attributes present and empty
    (highdicom reads them unguarded), and values DICOM does not allow emptied (a Patient's Sex of U, a date or
    time that is no date or time), since the SR must not fail, nor carry them, because a modality wrote them."""
    header = Dataset()
    header.update(source)
    for keyword in COPIED_HEADER:
        if keyword not in header or header[keyword].value is None:
            setattr(header, keyword, "")
    if str(header.PatientSex).upper() not in PATIENT_SEXES:
        header.PatientSex = ""
    for keyword, check in DATE_AND_TIME_CHECKS.items():
        value = str(header[keyword].value or "")
        try:
            if value:
                check(value)  # ValueError on what is no date or time
        except ValueError:
            setattr(header, keyword, "")
    return header


DATE_AND_TIME_CHECKS = {"PatientBirthDate": lambda value: dt.datetime.strptime(value, "%Y%m%d"),
                        "StudyDate": lambda value: dt.datetime.strptime(value, "%Y%m%d"), "StudyTime": TM}


def build_report(study: Mapping[str, Any], images: Sequence[ScoredImage], sources: Sequence[Dataset],
                 *, content_qualification: str = "RESEARCH", replaces: Sequence[tuple[str, str]] = ()) -> Dataset:
    """The study's Comprehensive SR. `study` is a row of the study worklist (with `worklist_flag`,
    `triage_complete`, `finalized_at`), `images` its scored images and `sources` their archived headers;
    `replaces` the (series, SOP Instance) UIDs of the reports sent for its earlier finalisations, named in its
    Predecessor Documents Sequence so that a viewer knows which report is current."""
    if not images:
        raise ReportError("no image of the study was scored")
    with quiet():  # pydicom warns of values it reads here (an over-long Person Name component)
        by_uid = {str(ds.SOPInstanceUID): evidence_header(ds) for ds in sources}
    missing = [image.sop_instance_uid for image in images if image.sop_instance_uid not in by_uid]
    if missing:
        raise ReportError(f"no archived copy of scored image(s) {', '.join(missing)}")
    patients = {str(by_uid[image.sop_instance_uid].PatientID) for image in images}
    if len(patients) > 1:  # highdicom copies the first image's: the SR would file under one of two patients
        raise ReportError(f"its images carry {len(patients)} different Patient IDs (reconcile them in the PACS)")
    with quiet():
        try:
            report = _document(study, images, [by_uid[image.sop_instance_uid] for image in images],
                               content_qualification, replaces)
        except (ValueError, TypeError, AttributeError) as exc:  # a header value the SR cannot hold; no value quoted
            raise ReportError(f"its images' header cannot be copied into an SR ({type(exc).__name__})") from None
    _derive_instance_uid(report, str(study["study_instance_uid"]))
    return report


def _document(study: Mapping[str, Any], images: Sequence[ScoredImage], evidence: Sequence[Dataset],
              content_qualification: str, replaces: Sequence[tuple[str, str]]) -> Dataset:
    groups = [_image_group(image, source, n) for n, (image, source) in enumerate(zip(images, evidence), 1)]
    groups.append(_study_group(study))
    names = sorted({image.model_name for image in images})
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[SR_NAMESPACE, "model", *sorted({i.model_sha256 for i in images})]),
        name=", ".join(names)[:64], manufacturer_name="pneumonia-triage")
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    content = hd.sr.MeasurementReport(observation_context=context, procedure_reported=PLAIN_CHEST_XRAY,
                                      imaging_measurements=groups)
    finalized = study["finalized_at"]
    report = hd.sr.ComprehensiveSR(
        evidence=evidence, content=content,
        series_instance_uid=generate_uid(entropy_srcs=[SR_NAMESPACE, str(study["study_instance_uid"])]),
        series_number=SERIES_NUMBER, sop_instance_uid=PLACEHOLDER_UID,
        instance_number=1 + int(study.get("reopened_count") or 0), manufacturer="pneumonia-triage",
        is_complete=bool(study["triage_complete"]), is_final=False, is_verified=False,
        series_description=SERIES_DESCRIPTION, manufacturer_model_name=", ".join(names)[:64],
        previous_versions=[_earlier(str(study["study_instance_uid"]), *uids) for uids in replaces] or None,
        content_qualification=content_qualification, content_date=finalized.date(), content_time=finalized.time(),
        series_date=finalized.date(), series_time=finalized.time(),
        coding_schemes=[CodingSchemeIdentificationItem(designator=SCHEME, name=SCHEME_NAME)])
    report.SoftwareVersions = sorted({image.model_version for image in images})
    report.InstanceCreationDate, report.InstanceCreationTime = report.ContentDate, report.ContentTime
    for equipment in report.get("ContributingEquipmentSequence", []):  # highdicom's own entry, dated now
        equipment.ContributionDateTime = finalized.strftime("%Y%m%d%H%M%S.%f")
    return report


def _derive_instance_uid(report: Dataset, study_uid: str) -> None:
    """Give the report the SOP Instance UID of its encoded bytes (built with a placeholder UID): the same
    report is the same object for a PACS, and any change, to a probability or a patient's name, a new one."""
    encoded = io.BytesIO()
    dcmwrite(encoded, report, enforce_file_format=True)
    digest = hashlib.sha256(encoded.getvalue()).hexdigest()
    uid = generate_uid(entropy_srcs=[SR_NAMESPACE, study_uid, digest])
    report.SOPInstanceUID = uid
    report.file_meta.MediaStorageSOPInstanceUID = uid


def _image_group(image: ScoredImage, source: Dataset, number: int) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """What the model said of one image, and which model (its sha256 and site calibration as parameters). No
    "Finding: Pneumonia" item: a viewer would show it for a likely-normal image too."""
    parameters = [f"model_sha256={image.model_sha256}"]
    if image.site_calibration_sha256:
        parameters.append(f"site_calibration_sha256={image.site_calibration_sha256}")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[SR_NAMESPACE, image.sop_instance_uid]), identifier=f"image {number}"),
        algorithm_id=hd.sr.AlgorithmIdentification(name=image.model_name, version=image.model_version,
                                                    parameters=parameters),
        measurements=[hd.sr.Measurement(name=PROBABILITY, value=float(image.probability), unit=NO_UNITS)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(STRATUM, Code(image.stratum, SCHEME, STRATUM_MEANINGS.get(image.stratum,
                                                                                                  image.stratum))),
            hd.sr.QualitativeEvaluation(FLAG, flag_code(image.flag, image.severity))],
        source_images=[hd.sr.SourceImageForMeasurementGroup(str(source.SOPClassUID), image.sop_instance_uid)])


def _study_group(study: Mapping[str, Any]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The study's worklist flag (NOT_TRIAGED where it is not complete) and whether its triage is complete."""
    complete = codes.SCT.Yes if study["triage_complete"] else codes.SCT.No
    worklist_flag = str(study["worklist_flag"])
    severity = None if worklist_flag == NOT_TRIAGED else STRATUM_SEVERITY[study["stratum"]]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[SR_NAMESPACE, "study", str(study["study_instance_uid"])]),
            identifier="study"),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(WORKLIST_FLAG, flag_code(worklist_flag, severity)),
            hd.sr.QualitativeEvaluation(TRIAGE_COMPLETE, complete)])


def flag_code(flag: str, severity: int | None) -> Code:
    """A flag as a code: the value is its rank and a digest of its text (S2-1a2b3c; NOTTRIAGED), the meaning the
    site's word for it. Why not the flag itself: a TRIAGE_FLAG_MAP flag may have 32 characters, a Code Value
    16 (SH). Why the digest: one value must keep one meaning, though sites, and a site's map over time, differ."""
    if severity is None:
        return Code("NOTTRIAGED", SCHEME, flag)
    return Code(f"S{severity}-{hashlib.sha256(flag.encode()).hexdigest()[:6]}", SCHEME, flag)


class SendError(RuntimeError):
    """The PACS could not be reached or refused the association (`object_refused` False: try again later),
    or it took the association and did not store this report (`object_refused` True: its own answer to it)."""

    def __init__(self, reason: str, *, object_refused: bool = False) -> None:
        super().__init__(reason)
        self.object_refused = object_refused


def send_report(report: Dataset, host: str, port: int, *, called_ae: str, calling_ae: str,
                timeout_s: float = 30.0) -> None:
    """C-STORE the report to a PACS (one association); SendError says why it was not stored."""
    peer = f"{called_ae} at {host}:{port}"
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    ae.add_requested_context(ComprehensiveSRStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    with quiet():
        try:
            assoc = ae.associate(host, port, ae_title=called_ae)
        except OSError as exc:  # a name that does not resolve (gaierror), a socket error before the association
            raise SendError(f"{peer} could not be reached ({type(exc).__name__})") from None
        if not assoc.is_established:  # pynetdicom aborts an association of which no context was accepted
            refused = any(cx.abstract_syntax == ComprehensiveSRStorage for cx in assoc.rejected_contexts)
            reason = ("does not accept Comprehensive SR Storage" if refused else "rejected the association"
                      if assoc.is_rejected else "could not be reached or did not answer")
            raise SendError(f"{peer} {reason}")
        try:
            status = assoc.send_c_store(report)
        finally:
            assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        raise SendError(f"{peer} gave no C-STORE response (timed out or aborted)")
    if code in STORED:
        return
    raise SendError(f"{peer} did not store the report (C-STORE status 0x{code:04X})",
                    object_refused=_refuses_the_object(code))


STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007, 0x0111})
"""Success, stored with a warning, or Duplicate SOP Instance: the PACS holds an object of this UID, and the UID
is a digest of the report's bytes, so it holds this report."""


def _refuses_the_object(code: int) -> bool:
    """A C-STORE failure about this object (a data set that does not match its SOP class, 0xA9xx; cannot
    understand it, 0xCxxx), as opposed to the PACS's state or set-up (out of resources, 0xA7xx; processing
    failure, 0x0110; SOP class not supported, 0x0122; not authorised, 0x0124; anything else), which every study
    would meet alike and a later try may pass: recording those as refusals lost a whole backlog (review)."""
    return 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF
