"""Which DICOM objects the pneumonia model may see: frontal chest radiographs only.

The model was trained on frontal (PA/AP) chest X-rays. Anything else gets a recorded
`skipped` status with the reason instead of a meaningless probability.
"""

from __future__ import annotations

from typing import Literal

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from models.dicom_io import display_orientation
from models.errors import BODY_PARTS, MODALITIES, VIEW_POSITIONS, UnreadableImageError, quoted_term

ACCEPTED_MODALITIES = ("CR", "DX")
FRONTAL_VIEWS = ("PA", "AP")
CHEST_BODY_PARTS = ("CHEST",)
DX_FOR_PROCESSING_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1.1"
SKIPPED_IMAGE_TYPES = {"LOCALIZER": "localizer image", "BONE": "dual-energy bone image"}
"""Image Type values (third and later) of images that are not the radiograph the model was trained on: a
localizer, or the bone image of a dual-energy pair (ribs and clavicles kept, soft tissue and lung field
subtracted). A dual-energy soft-tissue or bone-suppressed image still shows the lungs and is scored."""

CHEST_REGION_CODES = frozenset({("SCT", "43799004"), ("SCT", "51185008"), ("SCT", "816094009"), ("SCT", "302551006"),
                                ("SCT", "39607008"), ("SRT", "T-D3000"), ("SRT", "T-28000"), ("SNM3", "T-D3000")})
"""Anatomic Region Sequence codes of the chest (CID 4031 and its SNOMED RT / older SNOMED CT forms: chest, thorax,
entire thorax, lung). The DX IOD codes its anatomy there (Type 2); Body Part Examined is Type 3."""
FRONTAL_VIEW_CODES = frozenset({("SCT", "399348003"), ("SCT", "272479007"), ("SCT", "399300004"), ("SRT", "R-10206"),
                                ("SRT", "R-10214")})
"""View Code Sequence codes of a frontal view (CID 4010: antero-posterior, postero-anterior; SNOMED RT forms)."""
SECONDARY_CAPTURE_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.7", *(f"1.2.840.10008.5.1.4.1.1.7.{n}" for n in range(1, 5))})
"""Secondary Capture Image Storage and its four multi-frame forms (a prefix would also catch 77.x and 78.x)."""
CONVERSION_TYPES = frozenset("DV DI DF WSD SD SI DRW SYN".split())
DIGITISED_FILM = "DF"

MissingTagPolicy = Literal["skip", "process"]


BODY_PART_MISSING = "BodyPartExamined missing (policy: skip)"
VIEW_MISSING = "ViewPosition missing (policy: skip)"
ORIENTATION_MISCOUNTED = ("patient orientation ", " expected")  # `display_orientation`'s "... has 3 values, 2 expected"
"""Skips of an image that may well be a frontal chest, which its tags could not say (`unverified_skip`)."""


def skip_reason(ds: Dataset, missing_tag_policy: MissingTagPolicy = "skip") -> str | None:
    """None if `ds` is a frontal chest radiograph to infer on, else why it is skipped.

    Checks run from coarse to fine so the reason names the most basic mismatch.
    `missing_tag_policy="process"` lets an absent BodyPartExamined/ViewPosition through
    (sites whose modalities leave them empty); present-but-wrong values are always skipped,
    and so is a Patient Orientation that is not a frontal chest's (L/R across, F/H down,
    either way round; `models.dicom_io.display_orientation` turns those upright), an
    Image Type that names a localizer or a dual-energy bone image (`SKIPPED_IMAGE_TYPES`), and a
    Secondary Capture that is not a digitised film. An empty BodyPartExamined or ViewPosition is
    decided by its coded form (Anatomic Region Sequence, View Code Sequence) where there is one.
    """
    modality = str(ds.get("Modality", "") or "").upper()
    if modality not in ACCEPTED_MODALITIES:
        return f"modality {quoted_term(modality, MODALITIES) if modality else '(missing)'} is not CR or DX"
    if _is_for_processing(ds):
        return "DX For Processing image (not for presentation)"
    if str(ds.get("SOPClassUID", "")).strip() in SECONDARY_CAPTURE_SOP_CLASSES:
        conversion = str(ds.get("ConversionType", "") or "").upper().strip()
        if conversion != DIGITISED_FILM:  # a screenshot, a scanned document: not a radiograph to score
            shown = quoted_term(conversion, CONVERSION_TYPES) if conversion else "missing"
            return f"Secondary Capture (Conversion Type {shown}) is not a digitised film"
    image_type = _skipped_image_type(ds)
    if image_type is not None:
        return f"{SKIPPED_IMAGE_TYPES[image_type]} (Image Type {image_type})"
    body_part, region = _tag_or_code(ds, "BodyPartExamined", "AnatomicRegionSequence")
    if body_part and body_part not in CHEST_BODY_PARTS:
        return f"body part {quoted_term(body_part, BODY_PARTS)} is not CHEST"
    if region is not None and region not in CHEST_REGION_CODES:
        return "anatomic region (coded) is not chest"
    if not body_part and region is None and missing_tag_policy == "skip":
        return BODY_PART_MISSING
    view, coded_view = _tag_or_code(ds, "ViewPosition", "ViewCodeSequence")
    if view and view not in FRONTAL_VIEWS:
        return f"view position {quoted_term(view, VIEW_POSITIONS)} is not frontal (PA/AP)"
    if coded_view is not None and coded_view not in FRONTAL_VIEW_CODES:
        return "view (coded) is not frontal (PA/AP)"
    if not view and coded_view is None and missing_tag_policy == "skip":
        return VIEW_MISSING
    try:
        display_orientation(ds)  # a stored rotation is undone later; only a non-frontal one is skipped
    except UnreadableImageError as exc:
        return str(exc)
    return None


def assumed_tags(ds: Dataset, missing_tag_policy: MissingTagPolicy) -> list[str]:
    """The selection tags an image let through by the `process` policy lacks, with no code standing in for
    them: it is scored as a frontal chest on the site's word, and the row says so (a lateral or an abdomen
    without these tags is scored too, and read as silently as a tagged frontal before 2026-11-29)."""
    if missing_tag_policy != "process":
        return []
    return [keyword for keyword, coded in SELECTION_TAGS if _tag_or_code(ds, keyword, coded) == ("", None)]


def unverified_skip(reason: str | None) -> bool:
    """A skip reason that says the image could not be told a frontal chest or not (a tag missing under the
    `skip` policy, a Patient Orientation of the wrong number of values), unlike a lateral or another body part."""
    prefix, suffix = ORIENTATION_MISCOUNTED
    text = reason or ""
    return text in (BODY_PART_MISSING, VIEW_MISSING) or (text.startswith(prefix) and text.endswith(suffix))


SELECTION_TAGS = (("BodyPartExamined", "AnatomicRegionSequence"), ("ViewPosition", "ViewCodeSequence"))
"""The plain tags the selection reads, each with the coded form that decides when it is empty."""


def _tag_or_code(ds: Dataset, keyword: str, coded: str) -> tuple[str, tuple[str, str] | None]:
    """A selection tag's value (upper-cased, "" when empty) and, only where it is empty, its coded form's code."""
    plain = str(ds.get(keyword, "") or "").upper().strip()
    return plain, None if plain else _first_code(ds, coded)


def _first_code(ds: Dataset, keyword: str) -> tuple[str, str] | None:
    """(coding scheme, code value) of the sequence's first item, upper-cased; None without one. Read when the
    plain tag (Body Part Examined, View Position) is empty: the code then decides, a code not known to mean
    chest or a frontal view skips the image, and the reason does not repeat it."""
    try:
        items = ds.get(keyword) or []
        item = items[0] if len(items) else None
    except (TypeError, ValueError, KeyError):
        return None
    if item is None:
        return None
    value = str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or "").strip().upper()
    scheme = str(item.get("CodingSchemeDesignator", "") or "").strip().upper()
    return (scheme, value) if value else None


def _is_for_processing(ds: Dataset) -> bool:
    intent = str(ds.get("PresentationIntentType", "") or "").upper()
    return intent == "FOR PROCESSING" or str(ds.get("SOPClassUID", "")) == DX_FOR_PROCESSING_SOP_CLASS


def _skipped_image_type(ds: Dataset) -> str | None:
    """The first Image Type value, from the third on, of `SKIPPED_IMAGE_TYPES`, or None.

    The first two values say only ORIGINAL/DERIVED and PRIMARY/SECONDARY, and many processed DX images
    are DERIVED\\PRIMARY, so those two decide nothing here (PS3.3 C.7.6.1.1.2)."""
    value = ds.get("ImageType")
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    for term in values[2:]:
        term = str(term or "").strip().upper()
        if term in SKIPPED_IMAGE_TYPES:
            return term
    return None
