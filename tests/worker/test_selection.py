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
