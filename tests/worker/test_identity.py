"""An instance is (Study Instance UID, SOP Instance UID): the same SOP UID in another study is another instance.

A PACS re-sends an instance under a corrected study after a split/merge, and some modalities reuse
SOP UIDs. Keyed by the SOP UID alone, the second study's image was taken for a redelivery of the
first and quietly retired: the second study never got a row or a flag and dropped off the worklist.
Real SQLite and PostgreSQL databases, real Redis and `pneumonia-worker run` processes.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from tests.worker.support import run_admin, wait_for
from worker import admin, contract, db, tasks
from worker.config import WorkerSettings
from worker.migrate import current_revision, upgrade
from worker.samples import make_cxr_dataset, save


def _runtime(database_url: str, spool: Path) -> tasks.Runtime:
    upgrade(database_url)
    return tasks.Runtime(WorkerSettings(database_url=database_url, spool_dir=spool))


def _stage(spool: Path, image, study: str, sop: str, accession: str) -> str:
    ds = make_cxr_dataset(image, size=(256, 256), study_uid=study, sop_uid=sop, accession=accession)
    relpath = contract.pending_relpath(study, sop)
    save(ds, spool / relpath)
    return relpath


def _rows_of_sop(url: str, sop: str) -> dict[str, dict]:
    """Rows of one SOP UID by study."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(db.instances).where(db.instances.c.sop_instance_uid == sop)).mappings()
            return {r["study_instance_uid"]: dict(r) for r in rows}
    finally:
        engine.dispose()


def _study(url: str, study: str) -> dict | None:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(select(db.study_flags).where(db.study_flags.c.study_instance_uid == study)).mappings()
            found = row.first()
            return dict(found) if found else None
    finally:
        engine.dispose()


def test_the_same_sop_in_another_study_is_scored_and_flagged_there(database_url, tmp_path, test_split):
    images, _ = test_split
    rt = _runtime(database_url, tmp_path / "spool")
    sop, study_a, study_b = generate_uid(), generate_uid(), generate_uid()
    relpath_a = _stage(rt.settings.spool_dir, images[0], study_a, sop, "ACC-A")
    assert tasks.process_instance(rt, relpath_a, sop, "2026-01-01T00:00:00Z")["status"] == "done"
    first = _rows_of_sop(database_url, sop)[study_a]

    # The PACS re-sends the instance under study B (a study split corrected), with another image.
    relpath_b = _stage(rt.settings.spool_dir, images[1], study_b, sop, "ACC-B")
    result = tasks.process_instance(rt, relpath_b, sop, "2026-01-02T00:00:00Z")

    assert result["status"] == "done" and not result["noop"], "study B's image must be scored, not retired"
    rows = _rows_of_sop(database_url, sop)
    assert set(rows) == {study_a, study_b}
    assert rows[study_a] == first, "study A's result is untouched"
    assert rows[study_b]["accession_number"] == "ACC-B" and rows[study_b]["flag"]
    assert rows[study_b]["spool_relpath"] == relpath_b and rows[study_b]["attempts"] == 1
    for study, accession in ((study_a, "ACC-A"), (study_b, "ACC-B")):
        flags = _study(database_url, study)
        assert flags is not None, f"study {accession} missing from the worklist"
        assert flags["flag"] == rows[study]["flag"] and flags["accession_number"] == accession
        assert flags["n_instances"] == flags["n_done"] == 1 and flags["n_pending"] == 0
    spool = rt.settings.spool_dir
    assert (spool / "archive" / study_a / f"{sop}.dcm").is_file() and (spool / "archive" / study_b / f"{sop}.dcm").is_file()
    assert not (spool / relpath_a).exists() and not (spool / relpath_b).exists()

    # Re-delivery within study B stays a no-op; its file is archived beside the first, not lost.
    _stage(spool, images[1], study_b, sop, "ACC-B")
    again = tasks.process_instance(rt, relpath_b, sop, "2026-03-01T00:00:00Z")
    assert again["noop"] and again["status"] == "done"
    assert _rows_of_sop(database_url, sop) == rows
    assert len(list((spool / "archive" / study_b).glob("*.dcm"))) == 2
    assert len(list((spool / "archive" / study_a).glob("*.dcm"))) == 1

    tasks.finalize_study(rt, study_b, "2026-01-02T00:00:00Z")
    assert _study(database_url, study_b)["final"]


def test_a_pending_copy_in_another_study_holds_that_study_back(database_url, tmp_path, test_split):
    """Study B's image waits in pending/ while the same SOP UID is done in study A: B is not final yet
    (else it would read "final, no flag" and turn URGENT later)."""
    images, _ = test_split
    rt = _runtime(database_url, tmp_path / "spool")
    sop, study_a, study_b = generate_uid(), generate_uid(), generate_uid()
    relpath_a = _stage(rt.settings.spool_dir, images[0], study_a, sop, "ACC-A")
    tasks.process_instance(rt, relpath_a, sop, None)
    relpath_b = _stage(rt.settings.spool_dir, images[1], study_b, sop, "ACC-B")

    assert tasks.outstanding_instances(rt, study_b) == [sop]
    with pytest.raises(tasks.StudyNotSettledError):
        tasks.finalize_study(rt, study_b, None)
    assert _study(database_url, study_b) is None

    assert tasks.process_instance(rt, relpath_b, sop, None)["status"] == "done"
    assert tasks.outstanding_instances(rt, study_b) == []
    tasks.finalize_study(rt, study_b, None)
    assert _study(database_url, study_b)["final"]


@pytest.mark.redis
def test_requeue_records_a_pending_copy_in_another_study_as_queued(database_url, tmp_path, redis_server):
    """`pneumonia-admin requeue` writes `queued` rows so nothing pending is invisible, also for a SOP
    UID that is already finished in another study."""
    spool = tmp_path / "spool"
    sop, study_a, study_b = generate_uid(), generate_uid(), generate_uid()
    upgrade(database_url)
    engine = db.make_engine(database_url)
    try:
        done = {"sop_instance_uid": sop, "study_instance_uid": study_a, "status": "done", "flag": "URGENT",
                "severity": 2, "received_at": dt.datetime(2026, 1, 1), "finished_at": dt.datetime(2026, 1, 1)}
        with engine.begin() as conn:
            assert db.finish_instance(conn, done)
        path = spool / contract.pending_relpath(study_b, sop)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        settings = WorkerSettings(database_url=database_url, spool_dir=spool, broker_url=redis_server.url)
        redis_server.flush()
        assert admin.requeue(settings, engine, older_than_s=0) == 0
        admin.requeue(settings, engine, older_than_s=0)  # repeated: still one row
        rows = _rows_of_sop(database_url, sop)
        assert set(rows) == {study_a, study_b}, "the pending copy must have a row of its own"
        assert rows[study_b]["status"] == "queued" and rows[study_a]["status"] == "done"
        assert rows[study_b]["spool_relpath"] == contract.pending_relpath(study_b, sop)
    finally:
        engine.dispose()
    import redis

    messages = [json.loads(m)["headers"]["task"] for m in redis.Redis(port=redis_server.port).lrange(contract.QUEUE, 0, -1)]
    assert messages.count(contract.PROCESS_INSTANCE) == 2, "one task per requeue run"


def test_db_upserts_are_per_study(database_url):
    upgrade(database_url)
    engine = db.make_engine(database_url)
    base = {"sop_instance_uid": "1.2.3.4", "received_at": dt.datetime(2026, 1, 1), "started_at": db.utcnow()}
    try:
        with engine.begin() as conn:
            assert db.claim_instance(conn, {**base, "study_instance_uid": "1.1"})["attempts"] == 1
            assert db.finish_instance(conn, {**base, "study_instance_uid": "1.1", "status": "done", "flag": "ROUTINE"})
            claimed = db.claim_instance(conn, {**base, "study_instance_uid": "2.2"})
            assert claimed is not None and claimed["attempts"] == 1, "terminal in 1.1 says nothing about 2.2"
            assert db.finish_instance(conn, {**base, "study_instance_uid": "2.2", "status": "done", "flag": "URGENT"})
            assert not db.finish_instance(conn, {**base, "study_instance_uid": "2.2", "status": "failed"})
            assert db.claim_instance(conn, {**base, "study_instance_uid": "2.2"}) is None
            assert db.terminal_sops(conn, "2.2", ["1.2.3.4", "9.9"]) == {"1.2.3.4"}
            assert db.terminal_sops(conn, "3.3", ["1.2.3.4"]) == set()
            assert db.get_instance(conn, "1.1", "1.2.3.4")["flag"] == "ROUTINE"
            assert db.get_instance(conn, "2.2", "1.2.3.4")["flag"] == "URGENT"
    finally:
        engine.dispose()


def test_migration_keeps_rows_of_the_previous_head_and_keys_by_study_and_sop(database_url):
    upgrade(database_url, "0002")
    engine = db.make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO instances (sop_instance_uid, study_instance_uid, accession_number, status, attempts,"
                " flag, severity, probability, site_calibration_sha256, received_at, finished_at)"
                " VALUES (:sop, :study, 'ACC1', :status, 1, :flag, :severity, :p, :cal, :t, :t)"),
                [{"sop": "1.2.1", "study": "1.3.1", "status": "done", "flag": "URGENT", "severity": 2, "p": 0.9,
                  "cal": "c" * 64, "t": dt.datetime(2026, 1, 1)},
                 {"sop": "1.2.2", "study": "1.3.1", "status": "skipped", "flag": None, "severity": None, "p": None,
                  "cal": None, "t": dt.datetime(2026, 1, 2)},
                 {"sop": "1.2.3", "study": "1.3.2", "status": "processing", "flag": None, "severity": None,
                  "p": None, "cal": None, "t": dt.datetime(2026, 1, 3)}])
            conn.execute(text("INSERT INTO studies (study_instance_uid, accession_number, final, flag, severity,"
                              " max_probability) VALUES ('1.3.1', 'ACC1', :f, 'URGENT', 2, 0.9)"), {"f": True})
            before = [dict(r) for r in conn.execute(text("SELECT * FROM instances ORDER BY sop_instance_uid")).mappings()]
        engine.dispose()

        upgrade(database_url, "0003")
        upgrade(database_url, "0003")  # idempotent
        assert current_revision(database_url) == "0003"
        with engine.connect() as conn:
            after = [dict(r) for r in conn.execute(text("SELECT * FROM instances ORDER BY sop_instance_uid")).mappings()]
            assert after == before, "every row and value kept"
            v = db.study_flags.c  # the columns of 0003's view (0005 added n_failed and n_skipped)
            study = conn.execute(select(v.flag, v.n_instances, v.n_done).where(v.study_instance_uid == "1.3.1")).mappings().one()
            assert study["flag"] == "URGENT" and study["n_instances"] == 2 and study["n_done"] == 1
            from sqlalchemy import inspect

            assert inspect(conn).get_pk_constraint("instances")["constrained_columns"] == [
                "study_instance_uid", "sop_instance_uid"]
            indexes = {i["name"] for i in inspect(conn).get_indexes("instances")}
            assert {"ix_instances_study_received", "ix_instances_status_finished", "ix_instances_flag"} <= indexes
        with engine.begin() as conn:  # the same SOP UID in another study is now another row
            conn.execute(db.instances.insert().values(sop_instance_uid="1.2.1", study_instance_uid="1.3.9",
                                                      status="queued", attempts=0))
        with pytest.raises(IntegrityError):  # within a study it is still one row
            with engine.begin() as conn:
                conn.execute(db.instances.insert().values(sop_instance_uid="1.2.1", study_instance_uid="1.3.1",
                                                          status="queued", attempts=0))
    finally:
        engine.dispose()


def test_a_site_view_on_instances_never_costs_the_worklist_view(database_url):
    """A site's own view over `instances` (a report, a dashboard): the upgrade keeps it and the
    worklist's study_flags view working. It used to drop and re-create study_flags around SQLite's
    table copy, which the site view then made fail, leaving the worklist without its view; on
    PostgreSQL the re-creation also dropped the view's grants and failed on views built on it."""
    upgrade(database_url, "0002")
    engine = db.make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE VIEW site_report AS SELECT study_instance_uid, status FROM instances"))
            conn.execute(text("CREATE VIEW site_worklist AS SELECT study_instance_uid, flag FROM study_flags"))
            conn.execute(text("INSERT INTO instances (sop_instance_uid, study_instance_uid, status, attempts)"
                              " VALUES ('1.2.1', '1.3.1', 'done', 1)"))
            conn.execute(text("INSERT INTO studies (study_instance_uid, final) VALUES ('1.3.1', :f)"), {"f": False})
        upgrade(database_url, "0003")
        assert current_revision(database_url) == "0003"
        with engine.connect() as conn:
            assert conn.execute(text("SELECT n_instances FROM study_flags")).scalars().all() == [1]
            assert conn.execute(text("SELECT study_instance_uid, status FROM site_report")).all() == [("1.3.1", "done")]
            assert conn.execute(text("SELECT study_instance_uid FROM site_worklist")).scalars().all() == ["1.3.1"]
        with engine.begin() as conn:  # the views read the new table
            conn.execute(db.instances.insert().values(sop_instance_uid="1.2.1", study_instance_uid="1.3.2",
                                                      status="queued", attempts=0))
            assert conn.execute(text("SELECT COUNT(*) FROM site_report")).scalar() == 2
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP VIEW IF EXISTS site_worklist"))
            conn.execute(text("DROP VIEW IF EXISTS site_report"))
        engine.dispose()


def test_an_sqlite_upgrade_killed_part_way_can_be_run_again(sqlite_url):
    """SQLite's driver commits the copy's new table on its own; a migration killed after that (the
    rest rolls back, the database stays at 0002) left `_alembic_tmp_instances` behind, and every
    later upgrade, so every worker start, failed on it."""
    upgrade(sqlite_url, "0002")
    engine = db.make_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO instances (sop_instance_uid, study_instance_uid, status, attempts)"
                              " VALUES ('1.2.1', '1.3.1', 'done', 1)"))
            conn.execute(text("CREATE TABLE _alembic_tmp_instances (sop_instance_uid VARCHAR(64))"))  # the leftover
        upgrade(sqlite_url, "0003")
        assert current_revision(sqlite_url) == "0003"
        with engine.connect() as conn:
            assert conn.execute(text("SELECT sop_instance_uid FROM instances")).scalars().all() == ["1.2.1"]
            assert "_alembic_tmp_instances" not in conn.execute(
                text("SELECT name FROM sqlite_master WHERE type = 'table'")).scalars().all()
    finally:
        engine.dispose()


def test_requeue_of_a_folder_that_is_not_a_uid_leaves_no_row_queued_for_ever(database_url, tmp_path, redis_server,
                                                                               test_split):
    """Outside the gateway's contract: the worker fails such a path under study "", so requeue must
    mark that row, not one under the folder's name that nothing would ever finish."""
    images, _ = test_split
    spool = tmp_path / "spool"
    sop = generate_uid()
    relpath = f"pending/STUDY-X/{sop}.dcm"
    save(make_cxr_dataset(images[0], size=(256, 256), sop_uid=sop), spool / relpath)
    settings = WorkerSettings(database_url=database_url, spool_dir=spool, broker_url=redis_server.url)
    rt = _runtime(database_url, spool)
    redis_server.flush()
    assert admin.requeue(settings, rt.engine, older_than_s=0) == 0
    assert tasks.process_instance(rt, relpath, sop, None)["status"] == "failed"
    assert {study: row["status"] for study, row in _rows_of_sop(database_url, sop).items()} == {"": "failed"}


def test_downgrade_refuses_to_merge_two_studies_instances(database_url):
    """Back to the SOP-only key would have to drop one of two rows: refused, nothing lost."""
    from alembic import command

    from worker.migrate import alembic_config

    upgrade(database_url, "0003")
    engine = db.make_engine(database_url)
    try:
        with engine.begin() as conn:
            for study in ("1.3.1", "1.3.2"):
                conn.execute(db.instances.insert().values(sop_instance_uid="1.2.1", study_instance_uid=study,
                                                          status="done", attempts=1))
        with pytest.raises(Exception, match="more than one study"):
            command.downgrade(alembic_config(database_url), "0002")
        assert current_revision(database_url) == "0003"
        with engine.begin() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM instances")).scalar() == 2
            conn.execute(text("DELETE FROM instances WHERE study_instance_uid = '1.3.2'"))
        command.downgrade(alembic_config(database_url), "0002")
        assert current_revision(database_url) == "0002"
        with engine.connect() as conn:
            assert conn.execute(text("SELECT study_instance_uid FROM instances")).scalars().all() == ["1.3.1"]
            assert conn.execute(text("SELECT n_instances FROM study_flags")).all() == []
    finally:
        engine.dispose()


@pytest.mark.redis
def test_worker_scores_the_same_sop_in_two_studies(make_triage_env, database_url, test_split):
    """Through Redis and a real worker process: both studies get their rows and flags, and a
    re-send within study B changes nothing."""
    images, _ = test_split
    env = make_triage_env(database_url)
    sop, study_a, study_b = generate_uid(), generate_uid(), generate_uid()
    relpath_a = _stage(env.spool, images[2], study_a, sop, "ACC-A")
    env.start_worker()
    env.send(relpath_a, sop)
    wait_for(lambda: _rows_of_sop(database_url, sop).get(study_a, {}).get("status") == "done", 120,
             what="study A's row")
    wait_for(lambda: not (env.spool / relpath_a).exists(), 30, what="study A's file archived")

    relpath_b = _stage(env.spool, images[3], study_b, sop, "ACC-B")
    env.send(relpath_b, sop, received_at="2026-01-02T00:00:00+00:00")
    rows = wait_for(lambda: (r := _rows_of_sop(database_url, sop)).get(study_b, {}).get("status") in db.TERMINAL
                    and r, 120, what="study B's row")
    assert rows[study_b]["status"] == "done" and rows[study_b]["accession_number"] == "ACC-B"
    for study in (study_a, study_b):
        assert _study(database_url, study)["flag"] == rows[study]["flag"] is not None

    _stage(env.spool, images[3], study_b, sop, "ACC-B")
    env.send(relpath_b, sop, received_at="2026-02-02T00:00:00+00:00")
    wait_for(lambda: not (env.spool / relpath_b).exists(), 60, what="re-sent copy retired")
    time.sleep(1)
    assert _rows_of_sop(database_url, sop) == rows, "a re-send within the study changes nothing"
    assert len(list((env.spool / "archive" / study_b).glob("*.dcm"))) == 2
    env.finalize(study_b)
    wait_for(lambda: _study(database_url, study_b)["final"], 30, what="study B finalised")


@pytest.mark.parametrize("relpath", ["pending/{sop}.dcm", "pending/not-a-uid/{sop}.dcm", "pending/{study}/x/{sop}.dcm"])
def test_a_spool_path_without_a_study_folder_fails_with_its_reason(database_url, tmp_path, test_split, relpath):
    """The study folder is half of the instance's identity: a task whose path has none (outside the
    gateway's contract) is failed with a reason, not scored under an empty study that no worklist shows."""
    images, _ = test_split
    rt = _runtime(database_url, tmp_path / "spool")
    sop, study = generate_uid(), generate_uid()
    relpath = relpath.format(sop=sop, study=study)
    save(make_cxr_dataset(images[0], size=(256, 256), study_uid=study, sop_uid=sop), rt.settings.spool_dir / relpath)
    result = tasks.process_instance(rt, relpath, sop, None)
    assert result["status"] == "failed"
    assert result["reason"] == "spool path is not pending/<StudyInstanceUID>/<SOPInstanceUID>.dcm"


def test_every_migration_goes_down_to_base_and_up_again_keeping_rows(database_url):
    """An operator rolling back a release walks the chain down; each step must work on both
    backends with the study_flags view in place, and the rows must survive what they can."""
    from alembic import command

    from worker.migrate import alembic_config, head_revision

    config = alembic_config(database_url)
    upgrade(database_url)
    engine = db.make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(db.instances.insert().values(sop_instance_uid="1.2.1", study_instance_uid="1.3.1",
                                                      status="done", attempts=1))
        for revision in ("0002", "0001"):
            command.downgrade(config, revision)
            assert current_revision(database_url) == revision
            with engine.connect() as conn:
                assert conn.execute(text("SELECT sop_instance_uid FROM instances")).scalars().all() == ["1.2.1"]
                assert conn.execute(text("SELECT COUNT(*) FROM study_flags")).scalar() == 0
        command.downgrade(config, "base")
        upgrade(database_url)
        assert current_revision(database_url) == head_revision()
    finally:
        engine.dispose()


def test_a_header_study_uid_that_is_not_a_uid_is_not_logged(sqlite_url, tmp_path, test_split, caplog):
    """The file's own StudyInstanceUID is free text when a sender ignores the VR (pydicom does not
    validate here): it may hold anything, a patient's name included, so the log names no such value."""
    import logging

    from pydicom import config as pydicom_config

    images, _ = test_split
    rt = _runtime(sqlite_url, tmp_path / "spool")
    study, sop = generate_uid(), generate_uid()
    ds = make_cxr_dataset(images[0], size=(256, 256), study_uid=study, sop_uid=sop)
    with pydicom_config.disable_value_validation():
        ds.StudyInstanceUID = "DOE^JANE"
    relpath = contract.pending_relpath(study, sop)
    save(ds, rt.settings.spool_dir / relpath)
    with caplog.at_level(logging.WARNING, logger="worker"):
        assert tasks.process_instance(rt, relpath, sop, None)["status"] == "done"
    assert "carries StudyInstanceUID (not a UID)" in caplog.text
    assert "DOE" not in caplog.text


def test_a_re_send_under_a_corrected_accession_number_is_found_under_it_too(database_url, tmp_path, test_split,
                                                                             caplog):
    """A PACS reconciling an order re-sends the image under the corrected accession number: the first result is
    kept (not re-scored) and was filed under the old number only, so `list --accession` with the right one found
    nothing. It is found under both now, and a stale re-send under the old number moves nothing back."""
    import logging

    spool = tmp_path / "spool"
    rt = _runtime(database_url, spool)
    study, sop = "1.2.826.0.1.3680043.8.498.71", "1.2.826.0.1.3680043.8.498.71.1"
    image = test_split[0][0]
    relpath = _stage(spool, image, study, sop, "TEMP-0001")
    assert tasks.process_instance(rt, relpath, sop, None)["status"] == "done"
    scored = _rows_of_sop(database_url, sop)[study]
    _stage(spool, image, study, sop, "ACC-2026-77")  # the same image, its order reconciled
    with caplog.at_level(logging.WARNING, logger="worker.tasks"):
        assert tasks.process_instance(rt, relpath, sop, None)["noop"]
    assert _rows_of_sop(database_url, sop)[study] == scored  # the first result and its number kept
    for number in ("ACC-2026-77", "TEMP-0001"):
        for listing in (["list"], ["list", "--studies"], ["export"]):
            found = json.loads(run_admin(database_url, *listing, "--accession", number, "--format", "json"))
            assert [r["study_instance_uid"] for r in found] == [study], (number, listing)
    assert "ACC-2026-77" not in caplog.text and "TEMP-0001" not in caplog.text  # named by element, never by value
    assert "also found under the re-send's" in caplog.text
    for stale in ("TEMP-0001", ""):  # the old number again, or none: nothing moves, nothing is added
        _stage(spool, image, study, sop, stale)
        tasks.process_instance(rt, relpath, sop, None)
    assert _rows_of_sop(database_url, sop)[study]["accession_number"] == "TEMP-0001"
    assert json.loads(run_admin(database_url, "list", "--accession", "ACC-2026-77", "--format", "json"))
    rt.engine.dispose()
