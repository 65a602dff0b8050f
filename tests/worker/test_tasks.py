"""Task bodies in-process (no broker): the delivery protocol's edge cases on a real SQLite file."""

from __future__ import annotations

import logging

import numpy as np
import pydicom
import pytest
from sqlalchemy import select as sa_select
from pydicom.uid import generate_uid

from worker import contract, db, tasks
from worker.config import WorkerSettings
from worker.migrate import upgrade
from worker.samples import make_cxr_dataset, save
from worker.spool import study_uid_from_relpath


@pytest.fixture
def runtime(tmp_path, sqlite_url):
    upgrade(sqlite_url)
    return tasks.Runtime(WorkerSettings(database_url=sqlite_url, spool_dir=tmp_path / "spool"))


def stage(rt: tasks.Runtime, image, **kw) -> tuple[str, str, str]:
    ds = make_cxr_dataset(image, size=(256, 256), **kw)
    relpath = contract.pending_relpath(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    save(ds, rt.settings.spool_dir / relpath)
    return relpath, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)


def row(rt: tasks.Runtime, relpath: str, sop: str) -> dict | None:
    """The row of the instance filed at `relpath` (its study is the spool folder)."""
    with rt.engine.connect() as conn:
        return db.get_instance(conn, study_uid_from_relpath(relpath) or "", sop)


def test_done_then_archived_then_noop(runtime, test_split):
    relpath, sop, study = stage(runtime, test_split[0][0])
    assert tasks.process_instance(runtime, relpath, sop, "2026-01-01T00:00:00Z")["status"] == "done"
    archived = runtime.settings.spool_dir / "archive" / study / f"{sop}.dcm"
    assert archived.is_file() and not (runtime.settings.spool_dir / relpath).exists()
    before = row(runtime, relpath, sop)
    again = tasks.process_instance(runtime, relpath, sop, "2026-03-01T00:00:00Z")
    assert again["noop"] and row(runtime, relpath, sop) == before


def test_the_archive_and_the_study_keep_the_row_s_receive_time_not_a_later_message_s(runtime, test_split):
    """A queued row (a reprocessed image) delivered by the gateway's sweep, whose message carries the file's
    restore time: the archived copy was dated by it (kept past its retention) and the study's window widened.
    A duplicate of a scored image is archived dated by the row's time too."""
    import datetime as dt

    relpath, sop, study = stage(runtime, test_split[0][0])
    first = dt.datetime(2026, 10, 1, 8, 0)
    with runtime.engine.begin() as conn:
        conn.execute(db.instances.insert().values(study_instance_uid=study, sop_instance_uid=sop, status="queued",
                                                  attempts=0, received_at=first, spool_relpath=relpath))
    assert tasks.process_instance(runtime, relpath, sop, "2026-11-29T05:00:00Z")["status"] == "done"
    archived = runtime.settings.spool_dir / "archive" / study / f"{sop}.dcm"
    stamp = first.replace(tzinfo=dt.timezone.utc).timestamp()
    assert archived.stat().st_mtime == stamp
    with runtime.engine.connect() as conn:
        window = conn.execute(sa_select(db.studies.c.first_received_at, db.studies.c.last_received_at)).one()
    assert tuple(window) == (first, first)
    stage(runtime, test_split[0][0], study_uid=study, sop_uid=sop)  # delivered again: archived as a duplicate
    assert tasks.process_instance(runtime, relpath, sop, "2026-11-29T06:00:00Z")["noop"]
    duplicates = list(archived.parent.glob(f"{sop}.dup-*.dcm"))
    assert len(duplicates) == 1 and duplicates[0].stat().st_mtime == stamp


def test_worker_lost_too_often_becomes_failed_poison_message(runtime, test_split):
    relpath, sop, study = stage(runtime, test_split[0][0])
    base = {"sop_instance_uid": sop, "study_instance_uid": study, "spool_relpath": relpath,
            "received_at": db.utcnow(), "started_at": db.utcnow()}
    for _ in range(runtime.settings.max_attempts):  # deliveries that died mid-task
        with runtime.engine.begin() as conn:
            db.claim_instance(conn, base)
    result = tasks.process_instance(runtime, relpath, sop, None)
    assert result["status"] == "failed" and "abandoned" in result["reason"]
    assert (runtime.settings.spool_dir / "archive" / study / f"{sop}.dcm").is_file(), "kept for inspection"


def _base(relpath: str, sop: str, study: str) -> dict:
    return {"sop_instance_uid": sop, "study_instance_uid": study, "spool_relpath": relpath,
            "received_at": db.utcnow(), "started_at": db.utcnow()}


def _claim(runtime, base: dict) -> dict:
    with runtime.engine.begin() as conn:
        return db.claim_instance(conn, base)


def _credit(runtime, base: dict) -> None:
    with runtime.engine.begin() as conn:
        db.credit_failed_claim(conn, base["study_instance_uid"], base["sop_instance_uid"])


def test_transient_retries_do_not_count_as_lost_deliveries(runtime, test_split):
    """Claims followed by database errors, each retried by Celery, with the database down each time
    the failure would be counted on the row: the message's own count keeps them from being lost."""
    relpath, sop, study = stage(runtime, test_split[0][0])
    base = _base(relpath, sop, study)
    for _ in range(runtime.settings.max_attempts):
        _claim(runtime, base)
    result = tasks.process_instance(runtime, relpath, sop, None, retries_after_claim=runtime.settings.max_attempts)
    assert result["status"] == "done"


def test_a_retry_chain_that_ran_out_is_not_read_as_lost_deliveries_by_the_next_message(runtime, test_split):
    """The failed claims were counted only inside their own Celery message: once a chain of retries
    ran out (a database that took every claim and refused every result for ~25 min), the sweep's
    new message read all of them as lost deliveries and the instance was failed "abandoned" unscored."""
    relpath, sop, study = stage(runtime, test_split[0][0])
    base = _base(relpath, sop, study)
    for _ in range(runtime.settings.max_attempts + 3):  # each claim fails transiently, counted on the row
        _claim(runtime, base)
        _credit(runtime, base)
    result = tasks.process_instance(runtime, relpath, sop, None)  # the sweep's re-send: a new message, count 0
    assert result["status"] == "done"


def test_two_messages_failing_side_by_side_are_not_abandoned(runtime, test_split):
    """A gateway restart re-sends what is pending while an older chain still retries; both fail
    transiently (a flapping spool mount), interleaved as a review found them. Counted per message
    only, they were failed "abandoned" with no worker ever lost."""
    relpath, sop, study = stage(runtime, test_split[0][0])
    base = _base(relpath, sop, study)
    for _ in range(runtime.settings.max_attempts + 2):  # d and e each claim, then each fails and is retried
        _claim(runtime, base)
        _claim(runtime, base)
        _credit(runtime, base)
        _credit(runtime, base)
    result = tasks.process_instance(runtime, relpath, sop, None, retries_after_claim=runtime.settings.max_attempts + 2)
    assert result["status"] == "done"


def test_worker_deaths_still_fail_a_poison_image_whatever_was_counted_as_transient(runtime, test_split):
    """The poison limit holds when transient failures came first, on this message or another, and
    for a redelivered retry (its worker died: same message, same retries_after_claim)."""
    relpath, sop, study = stage(runtime, test_split[0][0])
    base = _base(relpath, sop, study)
    for _ in range(4):  # transient failures, counted on the row and in the message
        _claim(runtime, base)
        _credit(runtime, base)
    for _ in range(runtime.settings.max_attempts):  # the retry (count 4) kills its worker, again and again
        _claim(runtime, base)
    result = tasks.process_instance(runtime, relpath, sop, None, retries_after_claim=4)
    assert result["status"] == "failed" and "abandoned after 3 deliveries" in result["reason"]


def test_transient_failures_that_never_clear_end_in_a_failed_row(runtime, test_split):
    """Counted as transient, a file the host never reads (a bad sector: EIO every time) was retried
    chain after chain without end, and its study never finalised; after `max_attempts` whole chains
    it is failed with what happened."""
    relpath, sop, study = stage(runtime, test_split[0][0])
    base = _base(relpath, sop, study)
    chains = runtime.settings.max_attempts * (runtime.settings.max_retries + 1)
    for _ in range(chains - 1):
        _claim(runtime, base)
        _credit(runtime, base)
    assert tasks.process_instance(runtime, relpath, sop, None)["status"] == "done", "one chain short: still scored"
    relpath, sop, study = stage(runtime, test_split[0][1])
    base = _base(relpath, sop, study)
    for _ in range(chains):
        _claim(runtime, base)
        _credit(runtime, base)
    result = tasks.process_instance(runtime, relpath, sop, None)
    assert result["status"] == "failed" and f"abandoned after {chains} deliveries that failed transiently" in result["reason"]


def test_lost_deliveries_take_the_larger_count_never_the_sum():
    claimed = {"attempts": 7, "transient_claims": 3}
    assert db.lost_deliveries(claimed, 0) == 4
    assert db.lost_deliveries(claimed, 5) == 2  # this message knows of more (the database was down)
    assert db.lost_deliveries(claimed, 2) == 4  # a subset of what the row counted: not taken off twice
    assert db.lost_deliveries({"attempts": 2, "transient_claims": None}, 1) == 1  # a 0003 row


def test_path_outside_the_spool_is_refused_with_a_row(runtime):
    sop = generate_uid()
    relpath = "pending/../../etc/passwd"
    result = tasks.process_instance(runtime, relpath, sop, None)
    assert result["status"] == "failed" and "outside" in result["reason"]
    assert row(runtime, relpath, sop)["status"] == "failed"


def test_invalid_sop_uid_is_rejected_without_a_row(runtime):
    result = tasks.process_instance(runtime, "pending/1.2/x.dcm", "9" * 80, None)
    assert result["status"] == "rejected"
    with runtime.engine.connect() as conn:
        assert conn.execute(db.instances.select()).first() is None


def test_delete_retention_removes_the_file(tmp_path, sqlite_url, test_split):
    upgrade(sqlite_url)
    rt = tasks.Runtime(WorkerSettings(database_url=sqlite_url, spool_dir=tmp_path / "spool", spool_retention="delete"))
    relpath, sop, _ = stage(rt, test_split[0][0], view="LL")
    assert tasks.process_instance(rt, relpath, sop, None)["status"] == "skipped"
    assert not list((tmp_path / "spool").rglob("*.dcm"))


def test_finalize_before_any_instance_creates_a_final_study(runtime):
    (runtime.settings.spool_dir / contract.SPOOL_PENDING).mkdir(parents=True)  # as the gateway makes it at start
    study = generate_uid()
    tasks.finalize_study(runtime, study, "2026-01-01T00:00:00Z")
    tasks.finalize_study(runtime, study, "garbage")
    with runtime.engine.connect() as conn:
        final = conn.execute(db.studies.select().where(db.studies.c.study_instance_uid == study)).mappings().one()
    assert final["final"] and final["finalized_at"] is not None


def test_a_study_is_not_final_while_its_images_wait_for_a_result(runtime, test_split):
    """The gateway asks for finalisation after a quiet period, also while the model is being
    redeployed: the study must not read "final, nothing found" and turn URGENT later."""
    relpath, sop, study = stage(runtime, test_split[0][0])
    with pytest.raises(tasks.StudyNotSettledError):
        tasks.finalize_study(runtime, study, "2026-01-01T00:00:00Z")
    with runtime.engine.connect() as conn:
        assert conn.execute(db.studies.select().where(db.studies.c.study_instance_uid == study)).first() is None

    assert tasks.process_instance(runtime, relpath, sop, "2026-01-01T00:00:00Z")["status"] == "done"
    tasks.finalize_study(runtime, study, "2026-01-01T00:00:00Z")
    with runtime.engine.connect() as conn:
        assert conn.execute(db.studies.select().where(db.studies.c.study_instance_uid == study)).mappings().one()["final"]


def test_an_image_arriving_after_its_study_was_final_reopens_it_until_it_is_scored(runtime, test_split):
    """A late pneumonia image turned a "final, ROUTINE" study URGENT with no sign that it had reopened,
    and with the workers down the study read final while the image waited."""
    images, labels = test_split
    normal, pneumonia = images[int(np.flatnonzero(labels == 0)[0])], images[int(np.flatnonzero(labels == 1)[0])]
    relpath, sop, study = stage(runtime, normal)
    tasks.process_instance(runtime, relpath, sop, "2026-01-01T00:00:00Z")
    tasks.finalize_study(runtime, study, "2026-01-01T00:00:00Z")

    def study_row() -> dict:
        with runtime.engine.connect() as conn:
            return dict(conn.execute(db.studies.select().where(db.studies.c.study_instance_uid == study)).mappings().one())

    first = study_row()
    assert first["final"] and first["finalized_at"] is not None
    late, late_sop, _ = stage(runtime, pneumonia, study_uid=study)
    seen_while_scoring = []
    analyse = tasks._analyse
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tasks, "_analyse", lambda *args: (seen_while_scoring.append(study_row()["final"]), analyse(*args))[1])
        assert tasks.process_instance(runtime, late, late_sop, "2026-01-01T00:05:00Z")["status"] == "done"
    assert seen_while_scoring == [False]
    assert not study_row()["final"] and study_row()["finalized_at"] is None
    tasks.finalize_study(runtime, study, "2026-01-01T00:05:00Z")  # the gateway's second finalize
    again = study_row()
    assert again["final"] and again["finalized_at"] > first["finalized_at"]
    # a duplicate of an image already scored changes nothing
    dup, dup_sop, _ = stage(runtime, pneumonia, study_uid=study, sop_uid=late_sop)
    tasks.process_instance(runtime, dup, dup_sop, "2026-01-01T00:06:00Z")
    assert study_row()["final"]


def test_an_image_claimed_while_its_study_is_being_finalised_reopens_it(runtime, test_split, monkeypatch):
    """The claim landed between finalize's listing of pending/ and its commit: it saw the study not
    final and reopened nothing, and the study read final while the image was being scored."""
    images, _ = test_split
    relpath, sop, study = stage(runtime, images[0])
    tasks.process_instance(runtime, relpath, sop, None)
    late = {}
    listing = tasks.outstanding_instances

    def late_image_arrives_after_the_listing(rt, study_uid):
        found = listing(rt, study_uid)
        if not late:  # the gateway writes it, a worker claims it, then finalize commits
            late["relpath"], late["sop"], _ = stage(runtime, images[1], study_uid=study)
            with runtime.engine.begin() as conn:
                db.claim_instance(conn, {"sop_instance_uid": late["sop"], "study_instance_uid": study,
                                         "spool_relpath": late["relpath"]})
        return found

    monkeypatch.setattr(tasks, "outstanding_instances", late_image_arrives_after_the_listing)
    with pytest.raises(tasks.StudyNotSettledError, match="arrived while it was finalised"):
        tasks.finalize_study(runtime, study, None)
    with runtime.engine.connect() as conn:
        assert not conn.execute(db.studies.select().where(db.studies.c.study_instance_uid == study)).mappings().one()["final"]


def test_a_stored_result_whose_file_was_not_retired_does_not_hold_the_study(runtime, test_split):
    relpath, sop, study = stage(runtime, test_split[0][0])
    tasks.process_instance(runtime, relpath, sop, None)
    archived = runtime.settings.spool_dir / "archive" / study / f"{sop}.dcm"
    (runtime.settings.spool_dir / relpath).write_bytes(archived.read_bytes())  # a crash before the move
    assert tasks.outstanding_instances(runtime, study) == []
    tasks.finalize_study(runtime, study, None)


def test_an_unreadable_model_file_is_retried_before_any_claim(tmp_path, sqlite_url, test_split):
    """Not only a missing or mismatched model: any failure to load it is the host's, so the task is
    retried and the image stays pending instead of becoming a `failed` row that is never retried.
    Here reading the file fails with EIO (a file of /proc that cannot be read), as a stale network
    mount or a permission problem would fail with another OSError."""
    import shutil

    from models.card import card_path_for, default_model_path

    model = tmp_path / "deployed" / "pneumonia_resnet50.onnx"
    model.parent.mkdir()
    model.symlink_to("/proc/self/mem")
    shutil.copy(card_path_for(default_model_path()), card_path_for(model))
    upgrade(sqlite_url)
    rt = tasks.Runtime(WorkerSettings(database_url=sqlite_url, spool_dir=tmp_path / "spool", model_path=model))
    relpath, sop, _ = stage(rt, test_split[0][0])
    with pytest.raises(tasks.ModelUnavailableError, match="could not be loaded"):
        tasks.process_instance(rt, relpath, sop, None)
    assert row(rt, relpath, sop) is None and (rt.settings.spool_dir / relpath).is_file()
    assert tasks.is_model_problem(tasks.ModelUnavailableError("x"))


def test_a_site_calibration_for_another_model_is_retried_not_failed(tmp_path, sqlite_url, test_split):
    """A deployment mistake must not turn every incoming image into a `failed` row: the task raises
    (Celery retries it) and the instance stays pending with its spool file in place, unclaimed, so
    that however long the outage lasts the first delivery after the fix scores it."""
    import json

    from models.card import default_model_path
    from models.detector import load_card
    from models.errors import ModelIntegrityError
    from models.site_calibration import fit_site_calibration

    labels = [1] * 20 + [0] * 20
    site = fit_site_calibration(labels, [[0.0, 1.0 * y + 0.1 * (i % 20)] for i, y in enumerate(labels)],
                                load_card(default_model_path()), "ward-7", folds=4)
    path = tmp_path / "site.json"
    path.write_text(json.dumps(site.to_dict() | {"model_sha256": "0" * 64}))
    upgrade(sqlite_url)
    rt = tasks.Runtime(WorkerSettings(database_url=sqlite_url, spool_dir=tmp_path / "spool", site_calibration=path))
    relpath, sop, _ = stage(rt, test_split[0][0])
    for delivery in range(rt.settings.max_attempts + 2):  # Celery retries and sweep re-sends during the outage
        with pytest.raises(ModelIntegrityError, match="fitted for model sha256"):
            tasks.process_instance(rt, relpath, sop, "2026-01-01T00:00:00Z", retries_after_claim=delivery % 2)
    assert row(rt, relpath, sop) is None and (rt.settings.spool_dir / relpath).is_file(), "nothing claimed, file pending"

    fixed = tasks.Runtime(WorkerSettings(database_url=sqlite_url, spool_dir=tmp_path / "spool"))
    result = tasks.process_instance(fixed, relpath, sop, "2026-01-01T00:00:00Z")  # the sweep's next delivery
    assert result["status"] == "done", "the outage must not read as worker-lost deliveries"
    assert row(fixed, relpath, sop)["attempts"] == 1


def test_a_required_gpu_that_is_not_there_is_retried_not_failed(tmp_path, sqlite_url, test_split):
    """TRIAGE_EXECUTION_PROVIDER=cuda on a host where CUDA does not start: every task raises
    (Celery retries it) and the instance stays pending with its file, instead of a CPU run nobody chose."""
    import onnxruntime as ort

    from models.errors import ExecutionProviderError

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA; CI installs the CPU build (the serve extra)")
    upgrade(sqlite_url)
    rt = tasks.Runtime(WorkerSettings(database_url=sqlite_url, spool_dir=tmp_path / "spool", execution_provider="cuda"))
    relpath, sop, _ = stage(rt, test_split[0][0])
    with pytest.raises(ExecutionProviderError, match="CUDAExecutionProvider required"):
        tasks.process_instance(rt, relpath, sop, "2026-01-01T00:00:00Z")
    assert row(rt, relpath, sop) is None and (rt.settings.spool_dir / relpath).is_file()


@pytest.mark.postgres
def test_a_result_the_database_refuses_becomes_a_failed_row(tmp_path, pg_url, test_split, monkeypatch):
    """A value PostgreSQL rejects (here a modality longer than its column, as a pipeline bug would
    produce) must not leave the row `processing` until the sweep calls it abandoned."""
    from worker import pipeline

    upgrade(pg_url)
    rt = tasks.Runtime(WorkerSettings(database_url=pg_url, spool_dir=tmp_path / "spool"))
    relpath, sop, study = stage(rt, test_split[0][0])
    unstorable = pipeline.Outcome("done", None, {"modality": "X" * 40, "probability": 0.5, "accession_number": "ACC1"})
    monkeypatch.setattr(tasks, "analyse_file", lambda *args: unstorable)

    result = tasks.process_instance(rt, relpath, sop, None)

    stored = row(rt, relpath, sop)
    assert result["status"] == stored["status"] == "failed"
    assert stored["reason"] == "result could not be stored (DataError)" and stored["modality"] is None
    assert stored["accession_number"] == "ACC1"  # still found from the worklist (it was dropped before)
    assert (rt.settings.spool_dir / "archive" / study / f"{sop}.dcm").is_file()


def test_a_panic_from_a_native_library_becomes_a_failed_row(runtime, test_split, monkeypatch):
    """A Rust panic surfaces as pyo3's PanicException, a BaseException: it escaped `except Exception`,
    Celery acknowledged the message and the row stayed `processing` until the sweep's third round."""

    class PanicException(BaseException):
        pass

    def panics(*args):
        raise PanicException("index out of bounds")

    relpath, sop, _ = stage(runtime, test_split[0][0])
    monkeypatch.setattr(tasks, "analyse_file", panics)
    result = tasks.process_instance(runtime, relpath, sop, None)
    stored = row(runtime, relpath, sop)
    assert result["status"] == stored["status"] == "failed"
    assert stored["reason"] == "internal error (PanicException)"


def test_a_spool_file_the_host_cannot_read_is_retried_not_failed(runtime, test_split, monkeypatch):
    """EACCES, EIO or a stale mount says nothing about the image: before, it became a `failed` row and the
    file left pending/, so neither the sweep nor `requeue` could ever send it again."""
    import errno

    import pydicom

    from models.errors import ImageAccessError
    from worker.celery_app import is_transient

    relpath, sop, _ = stage(runtime, test_split[0][0])
    real_read = pydicom.dcmread

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(pydicom, "dcmread", denied)
    with pytest.raises(tasks.ClaimedDeliveryError) as raised:
        tasks.process_instance(runtime, relpath, sop, None)
    assert isinstance(raised.value.cause, ImageAccessError) and is_transient(raised.value.cause)
    assert row(runtime, relpath, sop)["status"] == "processing"
    assert (runtime.settings.spool_dir / relpath).is_file(), "still pending, where the sweep finds it"

    tasks.credit_failed_claim(runtime, relpath, sop)  # as the Celery wrapper does before it retries
    monkeypatch.setattr(pydicom, "dcmread", real_read)  # the mount is back: Celery's retry scores it
    assert tasks.process_instance(runtime, relpath, sop, None, retries_after_claim=1)["status"] == "done"


def test_a_spool_the_host_cannot_stat_is_retried_for_the_instance_and_the_study(runtime, test_split, monkeypatch):
    """A stale NFS handle fails stat() itself, before the file is opened: `Path.is_file` raised a plain
    OSError, which was not retried, so the row stayed `processing`, the claim later read as a lost
    delivery, and finalize was dropped for good (a glob over the folder would have found it empty)."""
    import errno
    from pathlib import Path

    from models.errors import ImageAccessError
    from worker.celery_app import is_transient

    relpath, sop, study = stage(runtime, test_split[0][0])
    real_stat, real_scandir = Path.stat, tasks.os.scandir

    def stale(path, *args, **kwargs):
        if study in str(path):
            raise OSError(errno.ESTALE, "Stale file handle", str(path))
        return real_stat(path, *args, **kwargs)

    def stale_folder(path):
        if study in str(path):
            raise OSError(errno.ESTALE, "Stale file handle", str(path))
        return real_scandir(path)

    monkeypatch.setattr(Path, "stat", stale)
    monkeypatch.setattr(tasks.os, "scandir", stale_folder)
    with pytest.raises(tasks.ClaimedDeliveryError) as raised:
        tasks.process_instance(runtime, relpath, sop, None)
    assert isinstance(raised.value.cause, ImageAccessError) and is_transient(raised.value.cause)
    assert "ESTALE" in str(raised.value.cause) and study not in str(raised.value.cause)
    with pytest.raises(ImageAccessError) as refused:
        tasks.finalize_study(runtime, study, None)
    assert is_transient(refused.value)
    assert row(runtime, relpath, sop)["status"] == "processing"

    tasks.credit_failed_claim(runtime, relpath, sop)
    monkeypatch.undo()  # the mount is back
    assert tasks.process_instance(runtime, relpath, sop, None, retries_after_claim=1)["status"] == "done"
    assert tasks.finalize_study(runtime, study, None)["final"]


def test_a_result_that_lost_the_race_says_so_in_the_log(runtime, test_split, caplog, monkeypatch):
    """The log said 'done' for a result the database did not take (another delivery's was there)."""
    relpath, sop, study = stage(runtime, test_split[0][0])
    real_store = tasks._store

    def other_delivery_first(rt, values, received, counts_for_study):
        with rt.engine.begin() as conn:
            db.finish_instance(conn, {**values, "status": "failed", "reason": "the other delivery's"})
        return real_store(rt, values, received, counts_for_study)

    monkeypatch.setattr(tasks, "_store", other_delivery_first)
    with caplog.at_level("INFO", logger="worker.tasks"):
        result = tasks.process_instance(runtime, relpath, sop, None)
    assert result["noop"] and row(runtime, relpath, sop)["reason"] == "the other delivery's"
    assert any("-> done" in r.getMessage() and "not stored" in r.getMessage() for r in caplog.records)


def _abandon(runtime, relpath: str, sop: str, study: str) -> dict:
    """Claims that never finished, as many as the poison limit allows, then the sweep's re-send."""
    for _ in range(runtime.settings.max_attempts):
        _claim(runtime, _base(relpath, sop, study))
    return tasks.process_instance(runtime, relpath, sop, None)


def test_an_abandoned_instance_keeps_its_identifiers(tmp_path, database_url, test_split):
    """An instance failed "abandoned" (or by a time limit, or a bug) was stored without accession
    number, series UID and modality, so `list --accession` did not find it."""
    upgrade(database_url)
    runtime = tasks.Runtime(WorkerSettings(database_url=database_url, spool_dir=tmp_path / "spool"))
    relpath, sop, study = stage(runtime, test_split[0][0], accession="ACC-LOST", modality="DX")
    series = str(pydicom.dcmread(runtime.settings.spool_dir / relpath).SeriesInstanceUID)
    result = _abandon(runtime, relpath, sop, study)
    stored = row(runtime, relpath, sop)
    assert result["status"] == stored["status"] == "failed" and "abandoned" in stored["reason"]
    assert (stored["accession_number"], stored["modality"], stored["series_instance_uid"]) == ("ACC-LOST", "DX", series)


def test_the_abandoned_reason_names_a_hard_time_limit_as_well_as_a_lost_worker(runtime, test_split):
    """A task killed by Celery's hard time limit is acknowledged, re-sent by the sweep and ends the same
    way as a worker lost; the reason sent admins looking for an OOM kill or a crash only."""
    relpath, sop, study = stage(runtime, test_split[0][0])
    assert _abandon(runtime, relpath, sop, study)["reason"] == (
        "abandoned after 3 deliveries that did not finish (worker lost or hard time limit exceeded)")


def test_a_claimed_instance_resent_after_a_hard_time_limit_is_failed_at_once(runtime, test_split, monkeypatch):
    """The main process re-sends a delivery it killed at the hard time limit (`hard_time_limit_s`): its
    claimed row is failed with that reason, keeps its identifiers, and its file is archived, without
    loading the model or decoding the file again (it stalled a pool process once already)."""
    relpath, sop, study = stage(runtime, test_split[0][0], accession="ACC-STUCK")
    _claim(runtime, _base(relpath, sop, study))

    def decoded(*args):
        raise AssertionError("the file must not be decoded again")

    monkeypatch.setattr(tasks, "analyse_file", decoded)
    monkeypatch.setattr(tasks, "_require_model", decoded)
    result = tasks.process_instance(runtime, relpath, sop, None, hard_time_limit_s=180)
    stored = row(runtime, relpath, sop)
    assert result["status"] == stored["status"] == "failed"
    assert stored["reason"] == "processing exceeded the 180s hard time limit (its worker process was killed)"
    assert stored["accession_number"] == "ACC-STUCK" and stored["processing_ms"] >= 180_000
    assert not (runtime.settings.spool_dir / relpath).exists()
    assert (runtime.settings.spool_dir / "archive" / study / f"{sop}.dcm").is_file()


def test_a_hard_time_limit_resend_of_an_unclaimed_or_finished_instance_is_an_ordinary_delivery(runtime, test_split):
    """A delivery killed before it claimed the instance spent its time elsewhere (the database, the
    model), not on the image: the re-send scores it. One whose result is stored changes nothing."""
    relpath, sop, _ = stage(runtime, test_split[0][0])
    assert tasks.process_instance(runtime, relpath, sop, None, hard_time_limit_s=180)["status"] == "done"
    before = row(runtime, relpath, sop)
    again = tasks.process_instance(runtime, relpath, sop, None, hard_time_limit_s=180)
    assert again["noop"] and row(runtime, relpath, sop) == before


def test_a_soft_time_limit_or_a_bug_keeps_the_identifiers(runtime, test_split, monkeypatch):
    from celery.exceptions import SoftTimeLimitExceeded

    def too_slow(*args):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(tasks, "analyse_file", too_slow)
    relpath, sop, _ = stage(runtime, test_split[0][0], accession="ACC-SLOW")
    assert "time limit" in tasks.process_instance(runtime, relpath, sop, None)["reason"]
    assert row(runtime, relpath, sop)["accession_number"] == "ACC-SLOW"
    monkeypatch.setattr(tasks, "analyse_file", lambda *args: 1 / 0)
    relpath, sop, _ = stage(runtime, test_split[0][1], accession="ACC-BUG")
    assert tasks.process_instance(runtime, relpath, sop, None)["reason"] == "internal error (ZeroDivisionError)"
    assert row(runtime, relpath, sop)["accession_number"] == "ACC-BUG"


def test_an_abandoned_file_whose_header_cannot_be_read_is_still_failed(runtime, test_split):
    """The identifiers come from a guarded header read: a poison file's garbage, a file cut short in
    its header or one without a Part-10 preamble must still end in the failed row, only without them."""
    for content in (b"\x00" * 128 + b"DICM" + b"\xff" * 300, b"not dicom at all", None):
        relpath, sop, study = stage(runtime, test_split[0][0], accession="ACC-POISON")
        path = runtime.settings.spool_dir / relpath
        path.write_bytes(content if content is not None else path.read_bytes()[:300])
        result = _abandon(runtime, relpath, sop, study)
        assert result["status"] == "failed" and "abandoned" in result["reason"]
        assert row(runtime, relpath, sop)["accession_number"] is None


def test_the_header_read_stops_before_the_pixels(tmp_path, test_split):
    """A poison image's pixels are never decoded nor even loaded to find its identifiers."""
    from worker import pipeline

    ds = make_cxr_dataset(test_split[0][0], size=(256, 256), accession="ACC-HDR")
    path = save(ds, tmp_path / "a.dcm")
    raw = path.read_bytes()
    cut = raw[: raw.rindex(b"\xe0\x7f\x10\x00") + 12]  # Pixel Data's header, none of its value
    path.write_bytes(cut)
    assert pipeline.header_identifiers(path)["accession_number"] == "ACC-HDR"


def _resend(runtime, relpath: str, image, study: str, sop: str, series: str, **kw) -> None:
    ds = make_cxr_dataset(image, size=(256, 256), study_uid=study, series_uid=series, sop_uid=sop, **kw)
    save(ds, runtime.settings.spool_dir / relpath)


def _scored_then_resent(runtime, test_split, caplog, second, **kw) -> tuple[str, list]:
    relpath, sop, study = stage(runtime, test_split[0][0], accession="ACC-SAME")
    series = str(pydicom.dcmread(runtime.settings.spool_dir / relpath).SeriesInstanceUID)
    assert tasks.process_instance(runtime, relpath, sop, None)["status"] == "done"
    before = row(runtime, relpath, sop)
    _resend(runtime, relpath, second, study, sop, series, **{"accession": "ACC-SAME", **kw})
    caplog.clear()
    with caplog.at_level("INFO", logger="worker.tasks"):
        again = tasks.process_instance(runtime, relpath, sop, None)
    assert again["noop"] and row(runtime, relpath, sop) == before, "the first result is kept"
    assert not any("ACC-" in r.getMessage() for r in caplog.records), "no accession number in the logs"
    return sop, [r for r in caplog.records if sop in r.getMessage()]


def test_a_scored_instance_re_sent_with_other_pixels_is_a_warning(runtime, test_split, caplog):
    """The same SOP UID re-sent with another image after it was scored was dropped without a sign:
    the gateway logged it stored, the worker a no-op, and the study kept the first image's flag."""
    sop, records = _scored_then_resent(runtime, test_split, caplog, test_split[0][5])
    seen = [(r.levelname, "re-sent with different pixel data" in r.getMessage()) for r in records]
    assert seen == [("WARNING", True)]
    assert "first result kept" in records[0].getMessage()


@pytest.mark.parametrize("changed, corrected", [("AccessionNumber", {"accession": "ACC-REAL-1"}),
                                                 ("BodyPartExamined", {"body_part": "ABDOMEN"})])
def test_a_scored_instance_re_sent_with_a_corrected_header_is_a_warning(runtime, test_split, caplog, changed, corrected):
    """A PACS replacing a temporary accession number (or correcting a selection tag) re-sends the same
    SOP UID: the first result is kept and was a silent no-op, so `list --accession` with the real number
    found nothing and nobody knew why. The element is named, its values are not logged."""
    sop, records = _scored_then_resent(runtime, test_split, caplog, test_split[0][0], **corrected)
    assert [(r.levelname, f"with another {changed};" in r.getMessage()) for r in records][:1] == [("WARNING", True)]
    assert "first result kept" in records[0].getMessage() and "ABDOMEN" not in records[0].getMessage()
    found = [r for r in records if "also found under the re-send's" in r.getMessage()]
    assert len(found) == (changed == "AccessionNumber") and all(r.levelname == "WARNING" for r in found)


def test_an_identical_re_send_is_not_a_warning(runtime, test_split, caplog):
    _, records = _scored_then_resent(runtime, test_split, caplog, test_split[0][0])
    assert not [r for r in records if r.levelno >= logging.INFO and "pixel data" in r.getMessage()]


def test_a_re_send_in_another_transfer_syntax_is_not_compared(runtime, test_split, caplog):
    from pydicom.uid import RLELossless

    _, records = _scored_then_resent(runtime, test_split, caplog, test_split[0][5], transfer_syntax=RLELossless)
    assert [(r.levelname, "another transfer syntax" in r.getMessage()) for r in records] == [("INFO", True)]


def test_a_re_send_without_an_archived_first_copy_says_it_was_not_compared(tmp_path, sqlite_url, test_split, caplog):
    upgrade(sqlite_url)
    rt = tasks.Runtime(WorkerSettings(database_url=sqlite_url, spool_dir=tmp_path / "spool", spool_retention="delete"))
    _, records = _scored_then_resent(rt, test_split, caplog, test_split[0][5])
    assert [(r.levelname, "no archived copy" in r.getMessage()) for r in records] == [("INFO", True)]


def test_a_copy_re_sent_while_the_first_is_scored_is_left_for_its_own_delivery(runtime, test_split, caplog, monkeypatch):
    """The gateway replaces a pending file in place when the same SOP UID arrives again. Replaced while the first
    copy was being scored, the new copy was archived as if it were the scored one and its own delivery found no
    file to compare: another image (or a corrected accession number) went without the promised warning."""
    relpath, sop, study = stage(runtime, test_split[0][0], accession="ACC-SAME")
    series = str(pydicom.dcmread(runtime.settings.spool_dir / relpath).SeriesInstanceUID)
    real_analyse = tasks.analyse_file

    def resent_meanwhile(path, *args, **kwargs):
        outcome = real_analyse(path, *args, **kwargs)
        _resend(runtime, relpath, test_split[0][5], study, sop, series, accession="ACC-SAME")
        return outcome

    monkeypatch.setattr(tasks, "analyse_file", resent_meanwhile)
    with caplog.at_level("INFO", logger="worker.tasks"):
        assert tasks.process_instance(runtime, relpath, sop, None)["status"] == "done"
    assert (runtime.settings.spool_dir / relpath).is_file(), "the re-sent copy waits in pending/ for its delivery"
    assert [r.levelname for r in caplog.records if "replaced by a copy sent again" in r.getMessage()] == ["WARNING"]
    monkeypatch.setattr(tasks, "analyse_file", real_analyse)
    assert tasks.process_instance(runtime, relpath, sop, None)["noop"]  # its own delivery retires it
    assert not (runtime.settings.spool_dir / relpath).exists()
