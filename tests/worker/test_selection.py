"""Selection policy: only frontal chest CR/DX images reach the model; everything else has a reason."""

from __future__ import annotations

import numpy as np
import pytest

from worker.samples import make_cxr_dataset, make_sr_dataset
from worker.selection import skip_reason

IMAGE = np.full((28, 28), 128, dtype=np.uint8)


def cxr(**kw):
    return make_cxr_dataset(IMAGE, size=(64, 64), **kw)


@pytest.mark.parametrize("kw", [{}, {"modality": "DX", "view": "AP"}, {"view": "ap", "body_part": "chest"}])
def test_frontal_chest_radiographs_are_selected(kw):
    assert skip_reason(cxr(**kw)) is None


@pytest.mark.parametrize(
    "kw, reason",
    [
        ({"modality": "CT"}, "modality CT is not CR or DX"),
        ({"modality": "MR"}, "modality MR"),
        ({"view": "LL"}, "view position LL is not frontal"),
        ({"view": "LATERAL"}, "not frontal"),
        ({"body_part": "ABDOMEN"}, "body part ABDOMEN is not CHEST"),
        ({"modality": "DX", "presentation_intent": "FOR PROCESSING"}, "For Processing"),
        ({"view": None}, "ViewPosition missing"),
        ({"body_part": None}, "BodyPartExamined missing"),
    ],
)
def test_everything_else_is_skipped_with_reason(kw, reason):
    assert reason in skip_reason(cxr(**kw))


def with_image_type(*values: str):
    ds = cxr(modality="DX")
    ds.ImageType = list(values)
    return ds


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS:UserWarning")  # the test writes the bad values on purpose
@pytest.mark.parametrize(
    "values, reason",
    [
        (("ORIGINAL", "PRIMARY", "LOCALIZER"), "localizer image (Image Type LOCALIZER)"),
        (("DERIVED", "SECONDARY", "", "BONE"), "dual-energy bone image (Image Type BONE)"),
        (("DERIVED", "PRIMARY", "AXIAL", "bone "), "dual-energy bone image (Image Type BONE)"),
    ],
)
def test_localizer_and_bone_images_are_skipped_with_reason(values, reason):
    """Image Type decides as worker.pipeline.RESEND_COMPARED says: a bone image (ribs kept, soft tissue and
    lung field subtracted) or a localizer is not the picture the model was trained on."""
    assert skip_reason(with_image_type(*values)) == reason


@pytest.mark.parametrize(
    "values",
    [("ORIGINAL", "PRIMARY"), ("DERIVED", "PRIMARY"), ("DERIVED", "PRIMARY", "", "SOFT_TISSUE"),
     ("DERIVED", "SECONDARY", "BONE_SUPPRESSED"), ("BONE", "LOCALIZER"), ()],
)
def test_other_image_types_are_selected(values):
    """Processed DX images are often DERIVED\\PRIMARY; only values from the third on describe the image, so a
    non-standard first or second value (BONE, LOCALIZER) is not read as one."""
    assert skip_reason(with_image_type(*values)) is None


def test_non_image_objects_are_skipped():
    assert "modality SR" in skip_reason(make_sr_dataset())


def test_missing_modality_is_named():
    ds = cxr()
    del ds.Modality
    assert skip_reason(ds) == "modality (missing) is not CR or DX"


def test_process_policy_accepts_missing_but_not_wrong_tags():
    assert skip_reason(cxr(view=None, body_part=None), "process") is None
    assert "not frontal" in skip_reason(cxr(view="LL"), "process")
    assert "not CHEST" in skip_reason(cxr(body_part="HAND"), "process")


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS:UserWarning")  # the test writes the bad values on purpose
@pytest.mark.parametrize("keyword", ["Modality", "BodyPartExamined", "ViewPosition"])
@pytest.mark.parametrize("value", ["Doe^Jane", "ZZPHIID123", "DOE JANE"])
def test_reasons_do_not_repeat_free_text(keyword, value):
    """A CS element with a name or a record number in it (validation is off in the worker) is
    described, not quoted; the CS repertoire alone let 'ZZPHIID123' and 'DOE JANE' through."""
    ds = cxr()
    setattr(ds, keyword, value)
    reason = skip_reason(ds)
    assert "DOE" not in reason.upper() and "PHI" not in reason and "(non-standard value)" in reason


def coded(scheme: str, value: str, meaning: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return [item]


CHEST = ("SCT", "43799004", "Chest")
ABDOMEN = ("SCT", "818981001", "Abdomen")
LATERAL = ("SCT", "399067008", "Lateral")
POSTERO_ANTERIOR = ("SCT", "399300004", "postero-anterior")


@pytest.mark.parametrize("region", [CHEST, ("SCT", "51185008", "Thorax"), ("SRT", "T-D3000", "Chest")])
def test_a_dx_chest_coded_in_its_anatomic_region_only_is_selected(region):
    """The DX IOD's anatomy element is Anatomic Region Sequence (Type 2; Body Part Examined is Type 3): a
    conformant DX chest without BodyPartExamined was skipped as "BodyPartExamined missing"."""
    ds = cxr(modality="DX", view="PA", body_part=None)
    ds.AnatomicRegionSequence = coded(*region)
    assert skip_reason(ds) is None


@pytest.mark.parametrize("policy", ["skip", "process"])
def test_a_coded_anatomic_region_that_is_not_chest_is_skipped(policy):
    """With `process`, an abdomen coded only in its Anatomic Region Sequence was scored (URGENT)."""
    ds = cxr(modality="DX", view="AP", body_part=None)
    ds.AnatomicRegionSequence = coded(*ABDOMEN)
    assert skip_reason(ds, policy) == "anatomic region (coded) is not chest"


@pytest.mark.parametrize("policy", ["skip", "process"])
def test_a_view_coded_only_in_its_view_code_sequence_decides(policy):
    """With `process`, a lateral coded only in View Code Sequence was scored (URGENT); a coded
    postero-anterior view is frontal, whatever the policy."""
    lateral = cxr(modality="DX", view=None)
    lateral.ViewCodeSequence = coded(*LATERAL)
    assert skip_reason(lateral, policy) == "view (coded) is not frontal (PA/AP)"
    frontal = cxr(modality="DX", view=None)
    frontal.ViewCodeSequence = coded(*POSTERO_ANTERIOR)
    assert skip_reason(frontal, policy) is None


@pytest.mark.parametrize("conversion, reason", [
    ("WSD", "Secondary Capture (Conversion Type WSD) is not a digitised film"),
    (None, "Secondary Capture (Conversion Type missing) is not a digitised film"),
])
def test_a_secondary_capture_other_than_a_digitised_film_is_skipped(conversion, reason):
    """A gateway that accepts Secondary Capture (for scanned films) let a workstation screenshot labelled CR
    through: scored 0.994, URGENT."""
    ds = cxr()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    if conversion:
        ds.ConversionType = conversion
    assert skip_reason(ds) == reason
    ds.ConversionType = "DF"
    assert skip_reason(ds) is None


@pytest.mark.parametrize("orientation, selected", [(["A", ""], False), (["", "P"], False), (["L", ""], True)])
def test_one_front_to_back_orientation_value_is_a_lateral_even_beside_an_empty_one(orientation, selected):
    """`A\\` says the rows run toward the front: only a lateral has that. An empty value made the whole Patient
    Orientation say nothing, and with `process` such a lateral was scored."""
    ds = cxr(modality="DX", view=None)
    ds.PatientOrientation = orientation
    reason = skip_reason(ds, "process")
    assert (reason is None) if selected else "is not a frontal chest orientation" in reason


def test_sop_classes_that_only_begin_like_secondary_capture_are_not_taken_for_it():
    """VL Endoscopic (…1.1.77.1.1) and Ophthalmic (…1.1.78.1) begin with Secondary Capture's UID."""
    for uid in ("1.2.840.10008.5.1.4.1.1.77.1.1", "1.2.840.10008.5.1.4.1.1.78.1"):
        ds = cxr()
        ds.SOPClassUID = uid
        assert skip_reason(ds) is None or "Secondary Capture" not in skip_reason(ds)
