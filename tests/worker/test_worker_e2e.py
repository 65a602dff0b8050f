"""A real `pneumonia-worker run` process on Redis + SQLite/PostgreSQL: every object ends in one row."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, generate_uid
from sqlalchemy import select, text

from tests.worker.support import wait_for
from worker import db
from worker.samples import make_cxr_dataset, make_sr_dataset

pytestmark = [pytest.mark.redis]


def _mixed_study(env, images: np.ndarray) -> dict[str, tuple[str, str]]:
    """Stage one study holding every kind of object the worker must handle."""
    study = generate_uid()
    kw = {"study_uid": study, "accession": "ACC-E2E", "size": (1024, 1024)}
    objects = {
        "pa_cr": make_cxr_dataset(images[0], transfer_syntax=JPEGLosslessSV1, **kw),
        "ap_dx": make_cxr_dataset(images[1], modality="DX", view="AP", photometric="MONOCHROME1",
                                  bits_stored=16, transfer_syntax=JPEG2000Lossless, **kw),
        "lateral": make_cxr_dataset(images[2], view="LL", **kw),
        "ct": make_cxr_dataset(images[3], modality="CT", body_part="CHEST", view=None, **kw),
        "knee": make_cxr_dataset(images[3], body_part="KNEE", **kw),
        "dx_processing": make_cxr_dataset(images[4], modality="DX", presentation_intent="FOR PROCESSING", **kw),
        "no_view": make_cxr_dataset(images[5], view=None, **kw),
        "sr": make_sr_dataset(study_uid=study, accession="ACC-E2E"),
        "no_pixels": make_cxr_dataset(images[6], **kw),
    }
    del objects["no_pixels"].PixelData
    objects["lateral"].PatientName = "SECRETNAME^" + "X" * 70  # over-long PN: must not be echoed in a warning
    staged = {name: env.stage(ds) for name, ds in objects.items()}
    good = make_cxr_dataset(images[7], **kw)
    staged["truncated"] = env.stage(good)
    path = env.spool / staged["truncated"][0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    sop = generate_uid()
    relpath = f"pending/{study}/{sop}.dcm"
    (env.spool / relpath).write_bytes(b"\x00garbage, not DICOM" * 100)
    staged["corrupt"] = (relpath, sop)
    staged["missing_file"] = (f"pending/{study}/{generate_uid()}.dcm", "")
    staged["missing_file"] = (staged["missing_file"][0], Path(staged["missing_file"][0]).stem)
    return staged


EXPECTED = {
    "pa_cr": ("done", None),
    "ap_dx": ("done", None),
    "lateral": ("skipped", "view position LL is not frontal"),
    "ct": ("skipped", "modality CT is not CR or DX"),
    "knee": ("skipped", "body part KNEE is not CHEST"),
    "dx_processing": ("skipped", "For Processing"),
    "no_view": ("skipped", "ViewPosition missing"),
    "sr": ("skipped", "modality SR is not CR or DX"),
    "no_pixels": ("failed", "no PixelData"),
    "truncated": ("failed", "pixel data could not be decoded"),
    "corrupt": ("failed", "not a readable DICOM file"),
    "missing_file": ("failed", "spool file missing"),
}


def test_every_object_gets_exactly_one_row(make_triage_env, database_url, test_split):
    images, _ = test_split
    env = make_triage_env(database_url)
    staged = _mixed_study(env, images)
    env.start_worker()
    for relpath, sop in staged.values():
        env.send(relpath, sop)
    sops = [sop for _, sop in staged.values()]
    rows = env.wait_terminal(sops, timeout=120)

    assert len(rows) == len(staged)
    for name, (relpath, sop) in staged.items():
        status, reason = EXPECTED[name]
        row = rows[sop]
        assert row["status"] == status, (name, row["status"], row["reason"])
        if status == "done":
            assert 0.0 <= row["probability"] <= 1.0
            assert row["stratum"] in ("likely_normal", "indeterminate", "high_suspicion")
            assert row["flag"] == {"likely_normal": "ROUTINE", "indeterminate": "PRIORITY",
                                   "high_suspicion": "URGENT"}[row["stratum"]]
            assert len(row["model_sha256"]) == 64 and row["model_version"]
            assert row["accession_number"] == "ACC-E2E"
            assert row["processing_ms"] > 0 and row["finished_at"] >= row["started_at"]
        else:
            assert row["reason"] and reason in row["reason"], (name, row["reason"])
            assert row["probability"] is None
        if name != "missing_file":
            assert not (env.spool / relpath).exists(), f"{name} still pending"

    # Study level: the most severe flag of the two frontal images, skipped/failed ones ignored.
    frontals = [rows[staged[n][1]] for n in ("pa_cr", "ap_dx")]
    worst = max(frontals, key=lambda r: (r["severity"], r["probability"]))
    engine = db.make_engine(database_url)
    try:
        with engine.connect() as conn:
            study = conn.execute(select(db.study_flags)).mappings().one()
    finally:
        engine.dispose()
    assert study["flag"] == worst["flag"] and study["n_done"] == 2 and study["n_instances"] == len(staged)
    assert study["accession_number"] == "ACC-E2E" and not study["final"]

    # No patient data in the logs, even for objects with invalid patient tags.
    log_text = "".join(w.log() for w in env.workers)
    assert "SECRETNAME" not in log_text and "SYNTHETIC" not in log_text and "SYN-000001" not in log_text

    # Spool: every readable object archived under its study, pending empty of files.
    assert not [p for p in (env.spool / "pending").rglob("*") if p.is_file()]
    assert len([p for p in (env.spool / "archive").rglob("*.dcm")]) == len(staged) - 1


def test_redelivery_and_duplicates_change_nothing(make_triage_env, database_url, test_split):
    images, _ = test_split
    env = make_triage_env(database_url)
    ds = make_cxr_dataset(images[10], size=(512, 512), accession="ACC-DUP")
    relpath, sop = env.stage(ds)
    env.start_worker()
    for _ in range(3):  # the gateway resending while the first is still queued
        env.send(relpath, sop)
    first = env.wait_terminal([sop])[sop]
    archive_dir = env.spool / "archive" / str(ds.StudyInstanceUID)
    wait_for(lambda: (archive_dir / f"{sop}.dcm").exists(), 30, what="first copy archived")
    # The same instance arrives again later (a modality re-send): staged again, sent again.
    env.stage(ds)
    env.send(relpath, sop, received_at="2026-02-02T00:00:00+00:00")
    env.wait_terminal([sop])
    wait_for(lambda: not (env.spool / relpath).exists(), 30, what="duplicate retired")
    time.sleep(1)
    after = env.rows()
    assert list(after) == [sop]
    assert after[sop] == first, "a redelivery must not modify a finished row"
    archived = sorted(archive_dir.iterdir())
    assert len(archived) == 2, "the duplicate file is archived beside the original, not lost"

    env.finalize(str(ds.StudyInstanceUID))
    engine = db.make_engine(database_url)
    try:
        def final() -> bool:
            with engine.connect() as conn:
                row = conn.execute(text("SELECT final, flag, n_done FROM study_flags")).one()
                return bool(row.final) and row
        row = wait_for(final, 30, what="study finalised")
        assert row.flag == first["flag"] and row.n_done == 1
    finally:
        engine.dispose()


def test_same_image_in_every_encoding_scores_the_same_through_the_worker(make_triage_env, sqlite_url, test_split):
    from pydicom.uid import ExplicitVRLittleEndian, JPEGLossless, JPEGLSLossless, RLELossless

    images, _ = test_split
    env = make_triage_env(sqlite_url)
    study = generate_uid()
    variants = [
        dict(transfer_syntax=ExplicitVRLittleEndian),
        dict(transfer_syntax=JPEGLossless, photometric="MONOCHROME1"),
        dict(transfer_syntax=JPEGLosslessSV1, bits_stored=16, modality="DX"),
        dict(transfer_syntax=JPEG2000Lossless, photometric="MONOCHROME1", bits_stored=16),
        dict(transfer_syntax=JPEGLSLossless),
        dict(transfer_syntax=RLELossless, view="AP"),
    ]
    staged = [env.stage(make_cxr_dataset(images[20], study_uid=study, size=(2048, 2048), **v)) for v in variants]
    env.start_worker()
    for relpath, sop in staged:
        env.send(relpath, sop)
    rows = env.wait_terminal([sop for _, sop in staged])
    probabilities = [rows[sop]["probability"] for _, sop in staged]
    assert all(rows[sop]["status"] == "done" for _, sop in staged)
    assert max(probabilities) - min(probabilities) < 1e-3, probabilities
    assert len({rows[sop]["stratum"] for _, sop in staged}) == 1


def test_a_scored_instance_re_sent_with_other_pixels_is_logged_by_a_real_worker(make_triage_env, database_url,
                                                                                test_split):
    """The same Study and SOP UID re-sent with another image after it was scored: the first result is
    kept, as documented, but the worker now says so at WARNING (before: a silent no-op)."""
    images, _ = test_split
    env = make_triage_env(database_url)
    worker = env.start_worker()
    kw = {"study_uid": generate_uid(), "series_uid": generate_uid(), "sop_uid": generate_uid(),
          "accession": "ACC-RESENT", "size": (512, 512)}
    relpath, sop = env.stage(make_cxr_dataset(images[0], **kw))
    env.send(relpath, sop)
    first = env.wait_terminal([sop])[sop]
    assert first["status"] == "done"
    env.stage(make_cxr_dataset(images[5], **kw))
    env.send(relpath, sop)
    wait_for(lambda: not (env.spool / relpath).exists(), 60, 0.2, "the re-sent copy archived")
    wait_for(lambda: "re-sent with different pixel data" in worker.log(), 30, 0.2, "the warning in the worker log")
    log = worker.log()
    assert f"instance {sop} re-sent with different pixel data" in log and "ACC-RESENT" not in log
    assert env.rows()[sop]["probability"] == first["probability"], "first result kept"
    assert list((env.spool / "archive" / kw["study_uid"]).glob(f"{sop}.dup-*.dcm")), "both copies kept"
