"""The per-instance pipeline in-process with the real ONNX model: encodings agree, bad input is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLossless,
    RLELossless,
    ExplicitVRLittleEndian,
)

from models.dicom_io import dicom_to_grayscale, read_dicom
from models.preprocess import preprocess_batch
from worker.config import WorkerSettings
from worker.pipeline import DetectorCache, analyse_file
from worker.samples import make_cxr_dataset, save

LOSSLESS_VARIANTS = [
    dict(transfer_syntax=ExplicitVRLittleEndian),
    dict(transfer_syntax=ExplicitVRLittleEndian, photometric="MONOCHROME1", bits_stored=16),
    dict(transfer_syntax=RLELossless, modality="DX", view="AP"),
    dict(transfer_syntax=JPEG2000Lossless, bits_stored=16),
    dict(transfer_syntax=JPEG2000Lossless, photometric="MONOCHROME1"),
    pytest.param(dict(transfer_syntax=JPEGLossless), marks=pytest.mark.dcmtk),
    pytest.param(dict(transfer_syntax=JPEGLosslessSV1, photometric="MONOCHROME1", bits_stored=16),
                 marks=pytest.mark.dcmtk),
    pytest.param(dict(transfer_syntax=JPEGLSLossless), marks=pytest.mark.dcmtk),
]


@pytest.fixture(scope="module")
def reference(test_split, detectors) -> dict[int, tuple[float, np.ndarray]]:
    """Probability and logits of the raw 28x28 thumbnails, the model's own domain."""
    images, _ = test_split
    detector = detectors.get()
    batch = preprocess_batch([images[i] for i in (0, 1)])
    return {i: (float(p), logit) for i, p, logit in zip((0, 1), detector.pneumonia_probability(batch),
                                                         detector.logits(batch))}


@pytest.mark.parametrize("variant", LOSSLESS_VARIANTS)
@pytest.mark.parametrize("index", [0, 1])
def test_every_lossless_encoding_scores_like_the_source(tmp_path, test_split, settings, detectors, reference,
                                                         variant, index):
    images, _ = test_split
    path = save(make_cxr_dataset(images[index], size=(2048, 2048), **variant), tmp_path / "x.dcm")
    outcome = analyse_file(path, settings, detectors)
    assert outcome.status == "done", outcome.reason
    probability, logits = reference[index]
    assert abs(outcome.fields["probability"] - probability) < 1e-3
    gray = dicom_to_grayscale(read_dicom(str(path)))
    assert np.allclose(detectors.get().logits(preprocess_batch([gray])), logits, atol=0.05), \
        "logits (before temperature flattening) must agree too"


@pytest.mark.dcmtk
def test_lossy_jpeg_baseline_stays_close(tmp_path, test_split, settings, detectors, reference):
    images, _ = test_split
    path = save(make_cxr_dataset(images[0], bits_stored=8, transfer_syntax=JPEGBaseline8Bit), tmp_path / "b.dcm")
    outcome = analyse_file(path, settings, detectors)
    assert outcome.status == "done"
    assert abs(outcome.fields["probability"] - reference[0][0]) < 1e-2


def test_outcome_fields_follow_card_and_flag_map(tmp_path, test_split, detectors):
    images, _ = test_split
    flags = {"high_suspicion": "STAT", "indeterminate": "SOON", "likely_normal": "LATER"}
    settings = WorkerSettings(flag_map=flags)
    outcome = analyse_file(save(make_cxr_dataset(images[3], size=(512, 512)), tmp_path / "c.dcm"),
                           settings, detectors)
    card = detectors.get().card
    p = outcome.fields["probability"]
    assert outcome.fields["stratum"] == card.stratum_for(p)
    assert outcome.fields["flag"] == flags[outcome.fields["stratum"]]
    assert outcome.fields["prediction"] == (card.labels[1] if p >= card.threshold else card.labels[0])
    assert outcome.fields["model_sha256"] == card.sha256
    stored = set(outcome.fields)
    assert not stored & {"PatientName", "PatientID", "patient_name", "patient_id"}


@pytest.mark.parametrize(
    "mutate, status, reason",
    [
        (lambda ds: ds.update({"Rows": 20000, "Columns": 20000}), "failed", "outside"),
        (lambda ds: setattr(ds, "NumberOfFrames", 2), "failed", "multi-frame"),
        (lambda ds: delattr(ds, "PixelData"), "failed", "no PixelData"),
    ],
    ids=["absurd_size", "multiframe", "no_pixeldata"],
)
def test_refusals_carry_a_reason(tmp_path, test_split, settings, detectors, mutate, status, reason):
    images, _ = test_split
    ds = make_cxr_dataset(images[0], size=(256, 256))
    mutate(ds)
    outcome = analyse_file(save(ds, tmp_path / "r.dcm"), settings, detectors)
    assert outcome.status == status and reason in outcome.reason
    assert "SYNTHETIC" not in outcome.reason and "SYN-000001" not in outcome.reason


def test_missing_tag_policy_process_lets_untagged_frontals_through(tmp_path, test_split, detectors):
    images, _ = test_split
    path = save(make_cxr_dataset(images[0], size=(256, 256), view=None, body_part=None), tmp_path / "u.dcm")
    assert analyse_file(path, WorkerSettings(), detectors).status == "skipped"
    processed = analyse_file(path, WorkerSettings(missing_tag_policy="process"), detectors)
    # what was assumed is on the row: a lateral or an abdomen without these tags is scored as a frontal chest too
    assert processed.status == "done" and processed.reason == (
        "scored as a frontal chest without BodyPartExamined, ViewPosition (TRIAGE_MISSING_TAG_POLICY=process)")
    tagged = save(make_cxr_dataset(images[0], size=(256, 256)), tmp_path / "t.dcm")
    assert analyse_file(tagged, WorkerSettings(missing_tag_policy="process"), detectors).reason is None


def test_unreadable_files_fail_with_reason(tmp_path, settings, detectors):
    garbage = tmp_path / "g.dcm"
    garbage.write_bytes(b"nope" * 50)
    empty = tmp_path / "e.dcm"
    empty.write_bytes(b"")
    for path in (garbage, empty, Path(tmp_path / "absent.dcm")):
        outcome = analyse_file(path, settings, detectors)
        assert outcome.status == "failed" and outcome.reason


def test_site_calibration_replaces_cut_points_and_is_recorded(tmp_path, test_split):
    from models.card import default_model_path
    from models.detector import load_card
    from models.site_calibration import fit_site_calibration

    images, labels = test_split
    card = load_card(default_model_path())
    rng = np.random.default_rng(0)
    fake_labels = np.array([1] * 30 + [0] * 30)
    fake_logits = np.stack([np.zeros(60), fake_labels * 2.0 + rng.normal(0, 1, 60)], axis=1)
    site = fit_site_calibration(fake_labels, fake_logits, card, "ward-7", folds=3)
    site.save(tmp_path / "site.json")
    settings = WorkerSettings(site_calibration=tmp_path / "site.json")
    outcome = analyse_file(save(make_cxr_dataset(images[3], size=(512, 512)), tmp_path / "c.dcm"),
                           settings, DetectorCache(settings))
    applied = site.apply(card)
    assert outcome.fields["site_calibration_sha256"] == site.sha256
    assert outcome.fields["stratum"] == applied.stratum_for(outcome.fields["probability"])
    plain = analyse_file(tmp_path / "c.dcm", WorkerSettings(), DetectorCache(WorkerSettings()))
    assert plain.fields["site_calibration_sha256"] is None
    assert plain.fields["probability"] != pytest.approx(outcome.fields["probability"])  # new temperature


def test_empty_or_garbled_window_is_scored_or_refused_with_a_reason(tmp_path, test_split, settings, detectors):
    """CR sends the window as type 3 (optional): empty counts as absent and the study is scored;
    text that is no number fails the instance with a reason that does not repeat it."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement

    images, _ = test_split
    for value, status, reason in ((b"", "done", None), (b"Doe^Jane", "failed", "invalid WindowCenter")):
        ds = make_cxr_dataset(images[0], size=(256, 256))
        for keyword in ("WindowCenter", "WindowWidth"):
            tag = tag_for_keyword(keyword)
            ds._dict[tag] = RawDataElement(tag, "DS", len(value), value, 0, False, True)
        outcome = analyse_file(save(ds, tmp_path / "w.dcm"), settings, detectors)
        assert (outcome.status, outcome.reason) == (status, reason)


def test_a_contradicting_presentation_lut_shape_fails_unless_the_site_chose_a_side(tmp_path, test_split, detectors,
                                                                                   monkeypatch):
    """TRIAGE_PRESENTATION_LUT_CONFLICT, read from the environment as a deployment sets it."""
    images, _ = test_split
    ds = make_cxr_dataset(images[0], size=(256, 256), photometric="MONOCHROME1")
    ds.PresentationLUTShape = "IDENTITY"
    path = save(ds, tmp_path / "fuji.dcm")
    refused = analyse_file(path, WorkerSettings(), detectors)
    assert refused.status == "failed" and "contradicts Presentation LUT Shape IDENTITY" in refused.reason
    monkeypatch.setenv("TRIAGE_PRESENTATION_LUT_CONFLICT", "follow_photometric")
    followed = analyse_file(path, WorkerSettings(), detectors)
    untagged = analyse_file(save(make_cxr_dataset(images[0], size=(256, 256), photometric="MONOCHROME1"),
                                 tmp_path / "plain.dcm"), WorkerSettings(), detectors)
    assert followed.status == "done" and followed.fields["probability"] == untagged.fields["probability"]


def test_a_chest_stored_sideways_fails_naming_the_turn_unless_its_patient_orientation_says_it(
        tmp_path, test_split, detectors, monkeypatch):
    """A portable plate read in landscape with no Patient Orientation was scored sideways (test AUC 0.975 -> 0.87,
    14-23% of pneumonia under 0.5); the pixels now say it. The same pixels tagged F\\R are turned upright and scored."""
    images, labels = test_split
    normal = images[np.flatnonzero(labels == 0)[0]]
    sideways = np.rot90(normal).copy()  # the patient's head to the left
    refused = analyse_file(save(make_cxr_dataset(sideways, size=(1024, 1024)), tmp_path / "side.dcm"), WorkerSettings(),
                           detectors)
    assert refused.status == "failed" and refused.reason.startswith("pixels look stored turned")
    assert "turned 90 degrees clockwise" in refused.reason
    tagged = make_cxr_dataset(sideways, size=(1024, 1024))
    tagged.PatientOrientation = ["F", "R"]  # rows run feet-ward, columns to the patient's right: turned
    upright = analyse_file(save(make_cxr_dataset(normal, size=(1024, 1024)), tmp_path / "ok.dcm"), WorkerSettings(),
                           detectors)
    turned_back = analyse_file(save(tagged, tmp_path / "tagged.dcm"), WorkerSettings(), detectors)
    assert upright.status == turned_back.status == "done"
    monkeypatch.setenv("TRIAGE_POLARITY_CHECK", "off")
    assert analyse_file(tmp_path / "side.dcm", WorkerSettings(), detectors).status == "done"


def test_an_inverted_monochrome2_image_fails_with_its_reason_unless_the_site_turned_the_check_off(
        tmp_path, test_split, detectors, monkeypatch):
    """TRIAGE_POLARITY_CHECK: pixels stored inverted under a consistent MONOCHROME2 header (or MONOCHROME1 pixels
    already in display polarity) were scored as they were; the study is now left not triaged, with the reason."""
    images, labels = test_split
    normal = images[np.flatnonzero(labels == 0)[0]]
    inverted = save(make_cxr_dataset(255 - normal, size=(1024, 1024)), tmp_path / "inv.dcm")
    mislabelled = save(make_cxr_dataset(255 - normal, size=(1024, 1024), photometric="MONOCHROME1"), tmp_path / "m1.dcm")
    for path in (inverted, mislabelled):
        refused = analyse_file(path, WorkerSettings(), detectors)
        assert refused.status == "failed" and refused.reason.startswith("pixels look inverted")
        assert refused.fields["accession_number"] == "ACC0001"  # found from the worklist by its accession
    upright = analyse_file(save(make_cxr_dataset(normal, size=(1024, 1024)), tmp_path / "ok.dcm"), WorkerSettings(),
                           detectors)
    assert upright.status == "done"
    monkeypatch.setenv("TRIAGE_POLARITY_CHECK", "off")
    scored = analyse_file(inverted, WorkerSettings(), detectors)
    assert scored.status == "done" and scored.fields["probability"] > upright.fields["probability"]
