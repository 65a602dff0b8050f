"""Schema and upserts on SQLite and PostgreSQL: first terminal result wins, redeliveries change nothing."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import inspect, select, text

from tests.worker.support import iptables_usable
from worker import db
from worker.migrate import current_revision, head_revision, upgrade


@pytest.fixture
def engine(database_url):
    upgrade(database_url)
    engine = db.make_engine(database_url)
    yield engine
    engine.dispose()


def _base(sop="1.2.3.4", study="1.2.3"):
    return {"sop_instance_uid": sop, "study_instance_uid": study, "spool_relpath": f"pending/{study}/{sop}.dcm",
            "received_at": dt.datetime(2026, 1, 1), "started_at": db.utcnow()}


def _done(sop="1.2.3.4", study="1.2.3", stratum="high_suspicion", p=0.9):
    sev = {"likely_normal": 0, "indeterminate": 1, "high_suspicion": 2}[stratum]
    flag = {"likely_normal": "ROUTINE", "indeterminate": "PRIORITY", "high_suspicion": "URGENT"}[stratum]
    return {**_base(sop, study), "status": "done", "probability": p, "stratum": stratum, "severity": sev,
            "flag": flag, "finished_at": db.utcnow(), "processing_ms": 5.0}


def test_migrations_are_idempotent_and_create_indexes(database_url, engine):
    upgrade(database_url)
    assert current_revision(database_url) == head_revision()
    indexes = {i["name"] for i in inspect(engine).get_indexes("instances")}
    assert {"ix_instances_status_finished", "ix_instances_accession", "ix_instances_flag"} <= indexes


def test_sqlite_runs_in_wal_mode(sqlite_url):
    upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


def test_claim_then_finish_then_everything_is_a_noop(engine):
    with engine.begin() as conn:
        assert db.claim_instance(conn, _base())["attempts"] == 1
        assert db.claim_instance(conn, _base())["attempts"] == 2  # redelivery after a crash
        assert db.finish_instance(conn, _done(p=0.9))
    with engine.begin() as conn:
        before = db.get_instance(conn, "1.2.3", "1.2.3.4")
        assert db.claim_instance(conn, _base()) is None
        assert not db.finish_instance(conn, _done(p=0.1, stratum="likely_normal"))
        assert not db.finish_instance(conn, {**_base(), "status": "failed", "reason": "x"})
        assert db.get_instance(conn, "1.2.3", "1.2.3.4") == before
        assert conn.execute(text("SELECT COUNT(*) FROM instances")).scalar() == 1


def test_study_view_takes_most_severe_done_flag_and_finalises(engine):
    with engine.begin() as conn:
        results = [_done("1.1", "9.9", "likely_normal", 0.1), _done("1.2", "9.9", "indeterminate", 0.5),
                   _done("1.4", "9.9", "indeterminate", 0.45)]
        for result, day in zip(results, (1, 2, 1)):
            db.finish_instance(conn, result)
            db.touch_study(conn, "9.9", "ACC9", dt.datetime(2026, 1, day), result)
        db.finish_instance(conn, {**_base("1.3", "9.9"), "status": "skipped", "reason": "lateral"})
        db.touch_study(conn, "9.9", "ACC9", dt.datetime(2026, 1, 1))
    with engine.begin() as conn:
        row = conn.execute(select(db.study_flags).where(db.study_flags.c.study_instance_uid == "9.9")).mappings().one()
        assert row["flag"] == "PRIORITY" and row["n_done"] == 3 and row["n_instances"] == 4
        assert (row["n_skipped"], row["n_failed"]) == (1, 0)  # migration 0005: a skipped lateral is told apart
        db.finish_instance(conn, {**_base("1.5", "9.9"), "status": "failed", "reason": "image is blank"})
        row = conn.execute(select(db.study_flags).where(db.study_flags.c.study_instance_uid == "9.9")).mappings().one()
        assert (row["n_instances"], row["n_skipped"], row["n_failed"]) == (5, 1, 1)  # ... from a failed frontal
        assert row["max_probability"] == 0.5, "ties in severity break on probability"
        assert not row["final"]
        db.finalize_study(conn, "9.9", dt.datetime(2026, 1, 2))
        db.finalize_study(conn, "9.9", dt.datetime(2026, 1, 3))
        row = conn.execute(select(db.study_flags).where(db.study_flags.c.study_instance_uid == "9.9")).mappings().one()
        assert row["final"] and row["accession_number"] == "ACC9"
        assert row["last_received_at"] == dt.datetime(2026, 1, 2)
        assert row["first_received_at"] == dt.datetime(2026, 1, 1)


def test_a_study_finalised_without_a_time_gets_its_window_from_later_images(engine):
    """finalize_study may come without a parseable time; the next image must still set the received
    window on both databases (SQLite's min()/max() return NULL if any argument is NULL)."""
    with engine.begin() as conn:
        db.finalize_study(conn, "9.8", None)
        db.finish_instance(conn, _done("1.9", "9.8"))
        db.touch_study(conn, "9.8", "ACC8", dt.datetime(2026, 1, 5), _done("1.9", "9.8"))
        row = conn.execute(select(db.study_flags).where(db.study_flags.c.study_instance_uid == "9.8")).mappings().one()
    assert row["first_received_at"] == row["last_received_at"] == dt.datetime(2026, 1, 5)
    assert row["final"] and row["flag"] == "URGENT"


def test_timestamps_normalise_to_naive_utc():
    assert db.parse_timestamp("2026-01-01T01:00:00+01:00") == dt.datetime(2026, 1, 1)
    assert db.parse_timestamp("2026-01-01T00:00:00Z") == dt.datetime(2026, 1, 1)
    assert db.parse_timestamp("garbage") is None and db.parse_timestamp(None) is None
    assert db.parse_timestamp("0001-01-01T00:00:00+01:00") is None  # before year 1 in UTC: OverflowError before


def test_database_errors_do_not_quote_bound_values(engine):
    """Celery logs a failed task's exception text; SQLAlchemy would put the bound values in it."""
    from sqlalchemy.exc import DBAPIError

    with pytest.raises(DBAPIError) as caught:
        with engine.connect() as conn:
            conn.execute(text("SELECT * FROM no_such_table WHERE accession_number = :a"), {"a": "ACC-PHI-0001"})
    assert "ACC-PHI-0001" not in str(caught.value)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS:UserWarning")  # the test builds the bad value on purpose
def test_identifiers_with_nul_bytes_are_stored(engine):
    """pydicom keeps NUL padding when validation is off; PostgreSQL refuses NUL in text columns."""
    from pydicom.dataset import Dataset

    from worker.pipeline import identifiers

    ds = Dataset()
    ds.StudyInstanceUID, ds.AccessionNumber, ds.Modality = "1.2.3", "ACC\x0042\x00", "DX\x00"
    ids = identifiers(ds)
    assert ids["accession_number"] == "ACC42" and ids["modality"] == "DX"
    with engine.begin() as conn:
        assert db.finish_instance(conn, {**_done(), **{k: v for k, v in ids.items() if v}})
        assert db.get_instance(conn, "1.2.3", "1.2.3.4")["accession_number"] == "ACC42"


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")  # the test writes the bad values on purpose
def test_identifiers_store_no_free_text_in_the_modality_or_series_columns():
    """With validation off both can hold a patient's name; `list`, `show` and `export` print the modality."""
    from pydicom.dataset import Dataset

    from worker.pipeline import identifiers

    ds = Dataset()
    ds.StudyInstanceUID, ds.AccessionNumber = "1.2.3", "ACC42"
    ds.Modality, ds.SeriesInstanceUID = "ZZPHINAME^ALICE", "ZZPHINAME^ALICE^SERIES"
    assert (identifiers(ds)["modality"], identifiers(ds)["series_instance_uid"]) == (None, None)
    ds.SeriesInstanceUID = "004711"  # digits alone, a record number say: not a UID
    assert identifiers(ds)["series_instance_uid"] is None
    ds.Modality, ds.SeriesInstanceUID = "cr ", "1.2.3.9"
    assert (identifiers(ds)["modality"], identifiers(ds)["series_instance_uid"]) == ("CR", "1.2.3.9")


def test_a_multi_valued_accession_number_is_stored_as_written():
    """It was stored as Python's "['ACC1', 'ACC2']", which no `list --accession` could find."""
    from pydicom.dataset import Dataset

    from worker.pipeline import identifiers

    ds = Dataset()
    ds.AccessionNumber = ["ACC1", "ACC2"]
    assert identifiers(ds)["accession_number"] == "ACC1\\ACC2"


def test_sqlite_commits_are_durable_before_the_file_leaves_pending(sqlite_url):
    """synchronous=FULL: under WAL, NORMAL may lose the last commits on power loss while the file's rename
    out of pending/ survives, leaving an instance with neither a row nor a pending file."""
    engine = db.make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        engine.dispose()


def test_a_new_sqlite_file_is_owner_and_group_readable_only(tmp_path):
    """The results hold accession numbers: SQLite created the file (and its -wal, -shm) 0644, world-readable
    under umask 022, while the gateway spools 0640. An existing file keeps the mode its owner chose."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        for name, mode in (("new.db", None), ("kept.db", 0o600)):
            path = tmp_path / "var" / name
            if mode is not None:
                path.parent.mkdir(exist_ok=True)
                path.touch(mode)
            engine = db.make_engine(f"sqlite:///{path}")
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE t (a)"))
                conn.execute(text("INSERT INTO t VALUES (1)"))
                files = [p for p in (path, path.with_name(name + "-wal"), path.with_name(name + "-shm")) if p.exists()]
                assert len(files) == 3  # WAL: the journal files are open beside it
                assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {mode or 0o640}, name
            engine.dispose()
    finally:
        os.umask(old)


def test_a_reopened_study_keeps_the_flag_it_had_as_final(engine):
    """Final and ROUTINE, then a late pneumonia image: the study went final again as URGENT and nothing
    said that it had been final ROUTINE (a radiologist may have read it from that list)."""
    with engine.begin() as conn:
        db.finish_instance(conn, _done("1.1", "7.7", "likely_normal", 0.05))
        db.touch_study(conn, "7.7", "ACC7", dt.datetime(2026, 1, 1), _done("1.1", "7.7", "likely_normal", 0.05))
        db.finalize_study(conn, "7.7", dt.datetime(2026, 1, 1))
        first = conn.execute(select(db.studies.c.finalized_at).where(db.studies.c.study_instance_uid == "7.7")).scalar()
        assert db.reopen_study(conn, "7.7")
        assert not db.reopen_study(conn, "7.7"), "not final: nothing to reopen, nothing counted"
        db.finish_instance(conn, _done("1.2", "7.7", "high_suspicion", 0.9))
        db.touch_study(conn, "7.7", "ACC7", dt.datetime(2026, 1, 2), _done("1.2", "7.7", "high_suspicion", 0.9))
        db.finalize_study(conn, "7.7", dt.datetime(2026, 1, 2))
        row = conn.execute(select(db.study_flags).where(db.study_flags.c.study_instance_uid == "7.7")).mappings().one()
    assert row["final"] and row["flag"] == "URGENT"
    assert (row["reopened_count"], row["flag_before_reopen"]) == (1, "ROUTINE")
    assert row["first_finalized_at"] == first <= row["finalized_at"]


def test_a_second_reopening_keeps_the_flag_of_the_first_finalisation(engine):
    """Final ROUTINE, reopened by a late PA (final URGENT), then by a late lateral: the second reopening wrote
    URGENT over ROUTINE, and nothing on the study said any longer that a reader may have seen it ROUTINE."""
    with engine.begin() as conn:
        db.touch_study(conn, "7.9", "ACC9", dt.datetime(2026, 1, 1), _done("1.1", "7.9", "likely_normal", 0.05))
        db.finalize_study(conn, "7.9", dt.datetime(2026, 1, 1))
        assert db.reopen_study(conn, "7.9")
        db.touch_study(conn, "7.9", "ACC9", dt.datetime(2026, 1, 2), _done("1.2", "7.9", "high_suspicion", 0.9))
        db.finalize_study(conn, "7.9", dt.datetime(2026, 1, 2))
        assert db.reopen_study(conn, "7.9")  # the late lateral, skipped
        db.finalize_study(conn, "7.9", dt.datetime(2026, 1, 3))
        row = conn.execute(select(db.study_flags).where(db.study_flags.c.study_instance_uid == "7.9")).mappings().one()
    assert (row["flag"], row["reopened_count"], row["flag_before_reopen"]) == ("URGENT", 2, "ROUTINE")


def test_a_study_first_final_without_a_flag_keeps_none_through_later_reopenings(engine):
    """Every image skipped (no flag) when first final, then reprocessed (URGENT), then a late image: the
    second reopening recorded URGENT as the flag it had when first final."""
    with engine.begin() as conn:
        db.touch_study(conn, "7.6", "ACC6", dt.datetime(2026, 1, 1))
        db.finalize_study(conn, "7.6", dt.datetime(2026, 1, 1))
        assert db.reopen_study(conn, "7.6")
        db.touch_study(conn, "7.6", "ACC6", dt.datetime(2026, 1, 1), _done("1.1", "7.6", "high_suspicion", 0.9))
        db.finalize_study(conn, "7.6", dt.datetime(2026, 1, 1))
        assert db.reopen_study(conn, "7.6")
        row = conn.execute(select(db.study_flags).where(db.study_flags.c.study_instance_uid == "7.6")).mappings().one()
    assert (row["flag"], row["reopened_count"], row["flag_before_reopen"]) == ("URGENT", 2, None)


def test_a_study_never_reopened_says_so(engine):
    with engine.begin() as conn:
        db.touch_study(conn, "7.8", "ACC8", dt.datetime(2026, 1, 1), _done("1.1", "7.8"))
        db.finalize_study(conn, "7.8", dt.datetime(2026, 1, 1))
        row = conn.execute(select(db.study_flags).where(db.study_flags.c.study_instance_uid == "7.8")).mappings().one()
    assert (row["reopened_count"], row["flag_before_reopen"]) == (0, None)
    assert row["first_finalized_at"] == row["finalized_at"] is not None


def test_migration_0006_keeps_final_studies_and_goes_back(database_url):
    """Studies of 0005 get no reopenings and their first finalisation from `finalized_at`; workers of 0005
    (which do not name the new columns) keep writing; the downgrade gives 0005's view back."""
    upgrade(database_url, "0005")
    engine = db.make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO studies (study_instance_uid, final, finalized_at, flag) VALUES"
                              " ('5.1', :t, :at, 'URGENT'), ('5.2', :f, NULL, NULL)"),
                         {"t": True, "f": False, "at": dt.datetime(2026, 1, 3)})
        upgrade(database_url)
        assert current_revision(database_url) == head_revision()
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO studies (study_instance_uid, final) VALUES ('5.3', :f)"), {"f": False})
            rows = conn.execute(select(db.study_flags.c.study_instance_uid, db.study_flags.c.reopened_count,
                                       db.study_flags.c.first_finalized_at)
                                .order_by(db.study_flags.c.study_instance_uid)).all()
            assert rows == [("5.1", 0, dt.datetime(2026, 1, 3)), ("5.2", 0, None), ("5.3", 0, None)]
            assert "ix_studies_finalized" in {i["name"] for i in inspect(conn).get_indexes("studies")}
        engine.dispose()
        upgrade(database_url, "0006")  # idempotent
        from alembic import command

        from worker.migrate import alembic_config

        command.downgrade(alembic_config(database_url), "0005")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM study_flags WHERE n_failed = 0")).scalar() == 3
            assert "reopened_count" not in {c["name"] for c in inspect(conn).get_columns("studies")}
    finally:
        engine.dispose()


def test_a_postgresql_server_that_never_answers_fails_the_connection_instead_of_hanging():
    """libpq waited for ever on a server that accepts and never answers: tasks sat until their soft time
    limit and `pneumonia-admin` hung. The engine sets `connect_timeout`, and a URL's own value wins."""
    import time

    from sqlalchemy.exc import OperationalError

    from tests.worker.support import call_within, silent_server

    def connect(url: str) -> None:
        engine = db.make_engine(url)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            engine.dispose()

    with silent_server() as port:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/test"
        for own, limit in ((f"{url}?connect_timeout=1", 5), (url, db.POSTGRES_CONNECT_TIMEOUT_S + 10)):
            started = time.monotonic()
            _, error = call_within(limit, lambda: connect(own))
            assert isinstance(error, OperationalError), error
        assert time.monotonic() - started >= db.POSTGRES_CONNECT_TIMEOUT_S - 1, "the default is not the URL's 1 s"


@pytest.mark.postgres
@pytest.mark.skipif(not iptables_usable(), reason="needs root with CAP_NET_ADMIN and iptables (deploy/setup_dev.sh)")
def test_a_postgresql_connection_that_goes_silent_fails_instead_of_hanging(monkeypatch):
    """A connection established and then silent (the server's host lost, a failover that moved its address:
    nothing resets it, nothing answers) hung a query in flight for hours and a pooled connection's ping
    for about 15 minutes. libpq's keepalives and tcp_user_timeout (shortened here) make both a database
    error; the path to the server is a local relay whose packets iptables drops."""
    import threading
    import time

    from sqlalchemy.exc import OperationalError

    from tests.worker.support import silenced_port, tcp_forwarder

    monkeypatch.setattr(db, "POSTGRES_TCP_LIVENESS", {"keepalives": 1, "keepalives_idle": 1, "keepalives_interval": 1,
                                                      "keepalives_count": 2, "tcp_user_timeout": 3000})

    def query(engine, sql: str) -> list[Exception]:
        errors: list[Exception] = []

        def run() -> None:
            try:
                with engine.connect() as conn:
                    conn.execute(text(sql))
            except Exception as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return errors, thread

    with tcp_forwarder(5432) as port:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/test?connect_timeout=2"
        in_flight, pooled = db.make_engine(url), db.make_engine(url)
        try:
            with pooled.connect() as conn:  # leaves one idle connection in its pool
                conn.execute(text("SELECT 1"))
            errors, thread = query(in_flight, "SELECT pg_sleep(2)")
            time.sleep(0.5)
            with silenced_port(port):
                started = time.monotonic()
                thread.join(20)
                assert not thread.is_alive(), "a query in flight on a silent connection still waits after 20 s"
                assert isinstance(errors[0], OperationalError), errors
                assert time.monotonic() - started < 15
                errors, thread = query(pooled, "SELECT 1")  # the pool's ping is never acknowledged
                thread.join(20)
                assert not thread.is_alive(), "a pooled connection's ping still waits after 20 s"
                assert isinstance(errors[0], OperationalError), errors
        finally:
            in_flight.dispose()
            pooled.dispose()


def test_migration_0007_adds_the_reprocess_time_in_place_and_goes_back(database_url):
    """Rows of 0006 keep their values with no reprocess time; workers of 0006 (which do not name the column)
    keep writing; the downgrade drops it."""
    from alembic import command

    from worker.migrate import alembic_config

    upgrade(database_url, "0006")
    engine = db.make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO instances (sop_instance_uid, study_instance_uid, status, attempts)"
                              " VALUES ('6.1', '6', 'done', 1)"))
        upgrade(database_url)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO instances (sop_instance_uid, study_instance_uid, status, attempts)"
                              " VALUES ('6.2', '6', 'queued', 0)"))
            assert conn.execute(text("SELECT sop_instance_uid, status, requeued_at FROM instances"
                                     " ORDER BY sop_instance_uid")).all() == [("6.1", "done", None), ("6.2", "queued", None)]
        engine.dispose()
        command.downgrade(alembic_config(database_url), "0006")
        with engine.connect() as conn:
            assert "requeued_at" not in {c["name"] for c in inspect(conn).get_columns("instances")}
            assert conn.execute(text("SELECT COUNT(*) FROM instances")).scalar() == 2
    finally:
        engine.dispose()


def test_migration_0008_adds_the_accession_aliases_and_goes_back(database_url):
    """A new table beside the others: rows of 0007 are untouched, an alias is recorded once, the downgrade drops it."""
    from alembic import command

    from worker.migrate import alembic_config

    upgrade(database_url, "0007")
    engine = db.make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO instances (sop_instance_uid, study_instance_uid, status, attempts,"
                              " accession_number) VALUES ('8.1', '8', 'done', 1, 'TEMP')"))
        upgrade(database_url)
        with engine.begin() as conn:
            assert db.add_accession_alias(conn, "8", "8.1", "ACC-8") and not db.add_accession_alias(conn, "8", "8.1", "ACC-8")
            assert conn.execute(text("SELECT accession_number FROM instances")).scalar() == "TEMP"
        engine.dispose()
        command.downgrade(alembic_config(database_url), "0007")
        with engine.connect() as conn:
            assert "accession_aliases" not in inspect(conn).get_table_names()
            assert conn.execute(text("SELECT COUNT(*) FROM instances")).scalar() == 1
    finally:
        engine.dispose()


def test_migration_0009_adds_the_reports_and_goes_back(database_url):
    """A new table beside the others: rows of 0008 are untouched, a report is recorded once per study, PACS and
    finalisation (the last word wins), the downgrade drops it."""
    from alembic import command

    from worker.migrate import alembic_config

    upgrade(database_url, "0008")
    engine = db.make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO instances (sop_instance_uid, study_instance_uid, status, attempts)"
                              " VALUES ('9.1', '9', 'done', 1)"))
        upgrade(database_url)
        final = db.utcnow()
        with engine.begin() as conn:
            db.record_report(conn, "9", "PACS@h:104", final, db.REPORT_REFUSED, reason="no image scored")
            db.record_report(conn, "9", "PACS@h:104", final, db.REPORT_REFUSED, reason="status 0xA900")
            assert conn.execute(text("SELECT reason FROM reports")).scalar() == "status 0xA900"  # the last answer
            db.record_report(conn, "9", "PACS@h:104", final, db.REPORT_SENT, series_uid="1.2", sop_uid="1.2.3")
            db.record_report(conn, "9", "PACS@h:104", final, db.REPORT_REFUSED, reason="a failed re-send by hand")
            assert db.sent_reports(conn, "9", "PACS@h:104") == [
                {"series_instance_uid": "1.2", "sop_instance_uid": "1.2.3", "finalized_at": final}]
            assert conn.execute(text("SELECT COUNT(*) FROM reports")).scalar() == 1
        engine.dispose()
        command.downgrade(alembic_config(database_url), "0008")
        with engine.connect() as conn:
            assert "reports" not in inspect(conn).get_table_names()
            assert conn.execute(text("SELECT COUNT(*) FROM instances")).scalar() == 1
    finally:
        engine.dispose()
