"""A study's triage result as a DICOM Structured Report, for the PACS (`pneumonia-admin sr`).

Why: the worklist flag lives in this product's database, where a RIS can poll it, but a radiologist reads
the study in the PACS viewer, which shows what the PACS holds. The report is a Comprehensive SR holding an
Imaging Measurement Report (TID 1500, built and checked by highdicom): one measurement group per scored image
(the calibrated probability of pneumonia, the stratum and the flag, the image it was read from, the model
that read it) and one for the study (its worklist flag and whether the triage is complete). It is marked
PRELIMINARY and UNVERIFIED: a triage aid, not a diagnosis, which its series description says too.

Its patient and study modules are copied from the study's archived images, as any object filed under the
study must carry them; they are never logged or printed. Its UIDs are derived from the study and from what
the report says, so sending the same result twice gives the PACS the same object, and a changed result (a
reprocessed image, a late one) a new object in the same series.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from worker.config import NOT_TRIAGED, STRATUM_SEVERITY

SCHEME = "99PNTRIAGE"
"""This product's private coding scheme (a designator starting with "99", PS3.16 section 8), declared in the
report's Coding Scheme Identification Sequence."""
SCHEME_NAME = "Pneumonia triage worker codes"
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
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


class ReportError(ValueError):
    """Why no report can be made for this study (not final, nothing scored, an archived image gone)."""


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


def report_uids(study_uid: str, images: Sequence[ScoredImage], study: Mapping[str, Any]) -> tuple[str, str]:
    """(series UID, SOP Instance UID): the series by the study alone, the instance by what the report says."""
    said = json.dumps({"images": [vars(image) for image in images], "worklist_flag": study["worklist_flag"],
                       "triage_complete": bool(study["triage_complete"])}, sort_keys=True)
    digest = hashlib.sha256(said.encode()).hexdigest()
    return (generate_uid(entropy_srcs=[SR_NAMESPACE, study_uid]),
            generate_uid(entropy_srcs=[SR_NAMESPACE, study_uid, digest]))


def build_report(study: Mapping[str, Any], images: Sequence[ScoredImage], sources: Sequence[Dataset],
                 *, content_qualification: str = "RESEARCH") -> Dataset:
    """The study's Comprehensive SR. `study` is a row of the study worklist (with `worklist_flag` and
    `triage_complete`), `images` its scored images and `sources` their archived datasets (headers suffice)."""
    if not images:
        raise ReportError("no image of the study was scored")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = [image.sop_instance_uid for image in images if image.sop_instance_uid not in by_uid]
    if missing:
        raise ReportError(f"no archived copy of scored image(s) {', '.join(missing)}")
    groups = [_image_group(image, by_uid[image.sop_instance_uid], n) for n, image in enumerate(images, 1)]
    groups.append(_study_group(study))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[SR_NAMESPACE, "model", images[0].model_sha256]),
        name=images[0].model_name, model_name=images[0].model_version)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    content = hd.sr.MeasurementReport(observation_context=context, procedure_reported=PLAIN_CHEST_XRAY,
                                      imaging_measurements=groups)
    series_uid, sop_uid = report_uids(str(study["study_instance_uid"]), images, study)
    versions = sorted({image.model_version for image in images})
    return hd.sr.ComprehensiveSR(
        evidence=[by_uid[image.sop_instance_uid] for image in images], content=content,
        series_instance_uid=series_uid, series_number=SERIES_NUMBER, sop_instance_uid=sop_uid,
        instance_number=1 + int(study.get("reopened_count") or 0), manufacturer="pneumonia-triage",
        is_complete=bool(study["triage_complete"]), is_final=False, is_verified=False,
        series_description=SERIES_DESCRIPTION, manufacturer_model_name=images[0].model_name,
        software_versions=versions[0] if len(versions) == 1 else tuple(versions),
        content_qualification=content_qualification,
        coding_schemes=[CodingSchemeIdentificationItem(designator=SCHEME, name=SCHEME_NAME)])


def _image_group(image: ScoredImage, source: Dataset, number: int) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """What the model said of one image, and which model (its sha256 and site calibration as parameters)."""
    parameters = [f"model_sha256={image.model_sha256}"]
    if image.site_calibration_sha256:
        parameters.append(f"site_calibration_sha256={image.site_calibration_sha256}")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[SR_NAMESPACE, image.sop_instance_uid]), identifier=f"image {number}"),
        finding_type=PNEUMONIA,
        algorithm_id=hd.sr.AlgorithmIdentification(name=image.model_name, version=image.model_version,
                                                    parameters=parameters),
        measurements=[hd.sr.Measurement(name=PROBABILITY, value=float(image.probability), unit=NO_UNITS)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(STRATUM, Code(image.stratum, SCHEME, STRATUM_MEANINGS.get(image.stratum,
                                                                                                  image.stratum))),
            hd.sr.QualitativeEvaluation(FLAG, _flag_code(image.flag, image.severity))],
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
        finding_type=PNEUMONIA,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(WORKLIST_FLAG, _flag_code(worklist_flag, severity)),
            hd.sr.QualitativeEvaluation(TRIAGE_COMPLETE, complete)])


def _flag_code(flag: str, severity: int | None) -> Code:
    """A flag as a code: its value says the rank (SEV0-SEV2; NOTTRIAGED), its meaning the site's word for it.
    Why not the flag itself: a TRIAGE_FLAG_MAP flag may have 32 characters, a Code Value 16 (SH)."""
    return Code("NOTTRIAGED" if severity is None else f"SEV{severity}", SCHEME, flag)


class SendError(RuntimeError):
    """The PACS could not be reached, refused the association, or did not store the report."""


def send_report(report: Dataset, host: str, port: int, *, called_ae: str, calling_ae: str,
                timeout_s: float = 30.0) -> None:
    """C-STORE the report to a PACS (one association); SendError says why it was not stored."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    ae.add_requested_context(report.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        reason = "rejected the association" if assoc.is_rejected else "could not be reached or did not answer"
        raise SendError(f"{called_ae} at {host}:{port} {reason}")
    try:
        status = assoc.send_c_store(report)
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        raise SendError(f"{called_ae} at {host}:{port} gave no C-STORE response (timed out or aborted)")
    if code not in (0x0000, 0xB000, 0xB007, 0xB006):  # success, or stored with a warning
        raise SendError(f"{called_ae} at {host}:{port} did not store the report (C-STORE status 0x{code:04X})")
