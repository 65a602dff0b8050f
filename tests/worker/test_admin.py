"""`pneumonia-admin` against a populated database, including speed on 100k rows."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from tests.worker.support import run_admin
from worker import admin, db
from worker.samples import ADMIN_QUERIES, STRATA, populate_results as populate
from worker.migrate import upgrade

@pytest.fixture
def small_db(database_url):
    return database_url, populate(database_url, 200)


def test_list_filters_match_the_data(small_db):
    url, rows = small_db
    urgent = json.loads(run_admin(url, "list", "--flag", "URGENT", "--format", "json"))
    assert {r["sop_instance_uid"] for r in urgent} == {r["sop_instance_uid"] for r in rows if r["flag"] == "URGENT"}
    failed = json.loads(run_admin(url, "list", "--status", "failed", "--format", "json"))
    assert len(failed) == sum(r["status"] == "failed" for r in rows) and all(f["reason"] for f in failed)
    by_acc = json.loads(run_admin(url, "list", "--accession", "A3", "--format", "json"))
    assert sorted(r["sop_instance_uid"] for r in by_acc) == ["1.2.12", "1.2.13", "1.2.14", "1.2.15"]
    cutoff = sorted(r["received_at"] for r in rows)[100]
    recent = json.loads(run_admin(url, "list", "--since", cutoff.isoformat(), "--format", "json"))
    assert len(recent) == 100
    studies = json.loads(run_admin(url, "list", "--studies", "--flag", "URGENT", "--format", "json"))
    assert studies and all(s["flag"] == "URGENT" for s in studies)


def test_show_study_and_csv_export(small_db, tmp_path):
    url, rows = small_db
    shown = json.loads(run_admin(url, "show", "1.3.7", "--format", "json"))
    assert len(shown["instances"]) == 4
    severities = [r["severity"] for r in rows if r["study_instance_uid"] == "1.3.7" and r["status"] == "done"]
    if severities:
        assert shown["study"]["flag"] == STRATA[max(severities)][2]
    out = tmp_path / "export.csv"
    run_admin(url, "export", "--format", "csv", "--out", str(out), "--stratum", "indeterminate")
    exported = list(csv.DictReader(out.open()))
    assert len(exported) == sum(r["stratum"] == "indeterminate" for r in rows)
    assert "patient" not in ",".join(exported[0]).lower()
    assert {"model_version", "model_sha256", "site_calibration_sha256"} <= set(exported[0])


def test_csv_export_does_not_hand_spreadsheets_a_formula(database_url, tmp_path):
    """AccessionNumber comes from the modality; '=cmd|...' must stay text when the audit CSV is opened."""
    upgrade(database_url)
    engine = db.make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(insert(db.instances).values(
            sop_instance_uid="1.2.3.4", study_instance_uid="1.2.3", spool_relpath="pending/1.2.3/1.2.3.4.dcm",
            accession_number='=cmd|" /C calc"!A0', status="done", attempts=1, received_at=db.utcnow()))
    engine.dispose()
    out = tmp_path / "export.csv"
    run_admin(database_url, "export", "--format", "csv", "--out", str(out))
    (exported,) = list(csv.DictReader(out.open()))
    assert exported["accession_number"] == '\'=cmd|" /C calc"!A0'
    assert exported["sop_instance_uid"] == "1.2.3.4"


def test_requeue_keeps_the_gateway_receive_time_and_skips_files_archived_meanwhile(tmp_path, sqlite_url, monkeypatch):
    """The requeued row's received_at is the file's (the gateway's) time, as in the task, not the
    requeue's; a file a running worker archives between the listing and its stat is skipped."""
    import os
    from pathlib import Path

    from worker import contract

    upgrade(sqlite_url)
    spool = tmp_path / "spool"
    files = []
    for i in range(3):
        path = spool / contract.pending_relpath("1.2.3", f"1.2.3.{i}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))
        files.append(path)
    real_stat, archived = Path.stat, files[1]

    def stat_after_archiving(self, *args, **kwargs):
        if self == archived and os.path.exists(self):
            self.unlink()  # a worker retires it right after the glob
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat_after_archiving)
    stale, foreign = admin.stale_pending(spool, cutoff=1_800_000_000)
    assert [p.name for p, _ in stale] == ["1.2.3.0.dcm", "1.2.3.2.dcm"] and foreign == 0
    assert stale[0][1] == dt.datetime.fromtimestamp(1_700_000_000, dt.timezone.utc)

    engine = db.make_engine(sqlite_url)
    admin._mark_queued(engine, "1.2.3", "1.2.3.0", "pending/1.2.3/1.2.3.0.dcm", stale[0][1])
    with engine.connect() as conn:
        assert db.get_instance(conn, "1.2.3", "1.2.3.0")["received_at"] == dt.datetime(2023, 11, 14, 22, 13, 20)
    engine.dispose()


def test_requeue_of_a_late_image_reopens_its_final_study(tmp_path, database_url, redis_server, monkeypatch):
    """A late image of a final study, re-sent by requeue (the worker down): its `queued` row was written but
    the study stayed "final, ROUTINE" with an image the database held unscored, until a worker claimed it."""
    import os

    from worker import contract

    upgrade(database_url)
    engine = db.make_engine(database_url)
    with engine.begin() as conn:
        db.touch_study(conn, "1.2.3", "ACC", dt.datetime(2026, 11, 1), {"severity": 0, "flag": "ROUTINE",
                                                                       "probability": 0.01})
        db.finalize_study(conn, "1.2.3", dt.datetime(2026, 11, 1))
    late = tmp_path / "spool" / contract.pending_relpath("1.2.3", "1.2.3.7")
    late.parent.mkdir(parents=True)
    late.write_bytes(b"x")
    os.utime(late, (1_700_000_000, 1_700_000_000))
    redis_server.flush()
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("TRIAGE_BROKER_URL", redis_server.url)
    for _ in range(2):  # the second requeue finds the row there: nothing reopened twice
        assert admin.main(["--database-url", database_url, "requeue", "--older-than", "0"]) == 0
    with engine.connect() as conn:
        study = conn.execute(select(db.studies).where(db.studies.c.study_instance_uid == "1.2.3")).mappings().one()
        row = db.get_instance(conn, "1.2.3", "1.2.3.7")
    engine.dispose()
    assert (study["final"], study["reopened_count"], study["flag_before_reopen"]) == (False, 1, "ROUTINE")
    assert row["status"] == "queued"


def test_requeue_leaves_out_files_the_gateway_did_not_write(tmp_path, database_url, redis_server, monkeypatch, capsys):
    """A name that is not a UID (too long for PostgreSQL's column: a traceback that re-sent nothing, even
    for the good files after it; on SQLite a `queued` row the worker never finishes) is left out, as the
    gateway's sweep leaves it out, and counted."""
    import os

    import redis

    from worker import contract

    upgrade(database_url)
    spool = tmp_path / "spool"
    names = [("1.2.3", "L" * 70), ("1.2.3", "1.2.3.9"), ("not-a-uid", "1.2.3.8"), ("1.2.3", "zz_after")]
    for study, name in names:
        path = spool / contract.SPOOL_PENDING / study / f"{name}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (1_700_000_000, 1_700_000_000))
    redis_server.flush()
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(spool))
    monkeypatch.setenv("TRIAGE_BROKER_URL", redis_server.url)
    assert admin.main(["--database-url", database_url, "requeue"]) == 0
    messages = [json.loads(m) for m in redis.Redis.from_url(redis_server.url).lrange(contract.QUEUE, 0, -1)]
    # the instance, and its study's finalize, which a Redis restart may have lost with it
    assert sorted(m["headers"]["task"] for m in messages) == [contract.FINALIZE_STUDY, contract.PROCESS_INSTANCE]
    out, err = capsys.readouterr()
    assert out == "requeued 1 pending instance(s) and the finalize of 1 study(ies)\n"
    assert err.startswith("skipped 3 file(s) in pending/ whose folder or name is not a UID")
    engine = db.make_engine(database_url)
    with engine.connect() as conn:
        assert [r.sop_instance_uid for r in conn.execute(select(db.instances.c.sop_instance_uid))] == ["1.2.3.9"]
    engine.dispose()


def test_stats_counts_and_percentiles(small_db):
    url, rows = small_db
    stats = json.loads(run_admin(url, "stats", "--window-hours", "2", "--format", "json"))
    assert sum(stats["by_status"].values()) == len(rows)
    assert stats["by_stratum"] == {s: sum(r["stratum"] == s for r in rows) for s, _, _ in STRATA
                                   if any(r["stratum"] == s for r in rows)}
    assert 0.1 <= stats["latency_s"]["p50"] <= stats["latency_s"]["p95"] <= 5
    assert stats["throughput_per_s"] > 0
    assert stats["top_reasons"][0]["count"] >= 1


def test_stats_counts_studies_whose_finalize_is_overdue(database_url):
    """A finalize lost with the broker's queue (a Redis restart without persistence) is never sent again:
    the study stayed provisional for good and nothing said so. `stats` counts such studies of its window."""
    upgrade(database_url)
    now = db.utcnow()
    engine = db.make_engine(database_url)
    with engine.begin() as conn:
        for uid, hours_ago in (("1.9.1", 3), ("1.9.2", 3), ("1.9.3", 0.1), ("1.9.4", 30)):
            db.touch_study(conn, uid, None, now - dt.timedelta(hours=hours_ago))
        db.finalize_study(conn, "1.9.2", now - dt.timedelta(hours=3))
    engine.dispose()
    stats = json.loads(run_admin(database_url, "stats", "--window-hours", "24", "--format", "json"))
    assert stats["overdue_studies"] == 1  # 1.9.1: not final 3 h after its last image; 1.9.3 is recent, 1.9.4 older
    assert "overdue_studies: 1" in run_admin(database_url, "stats")


def test_stats_and_show_count_images_waiting_in_the_spool_that_no_worker_took(tmp_path, database_url, monkeypatch,
                                                                              capsys):
    """With no worker taking work the database sees none of the gateway's images: `stats` said outstanding 0 and
    overdue_studies 0 two hours into the outage, and `show` said "not found" for a study the gateway held."""
    import os
    import time as time_

    from worker import contract

    upgrade(database_url)
    spool = tmp_path / "spool"
    stamp = time_.time() - 2 * 3600
    for study, sop in (("1.7.1", "1.7.1.1"), ("1.7.1", "1.7.1.2"), ("1.7.2", "1.7.2.1"), ("bad", "1.7.3.1")):
        path = spool / contract.SPOOL_PENDING / study / f"{sop}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (stamp, stamp if study != "1.7.2" else time_.time()))
    engine = db.make_engine(database_url)
    with engine.begin() as conn:  # 1.7.1 also overdue in the database: counted once
        db.touch_study(conn, "1.7.1", None, db.utcnow() - dt.timedelta(hours=2))
    engine.dispose()
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(spool))
    stats = json.loads(run_admin(database_url, "stats", "--format", "json"))
    assert (stats["outstanding"], stats["waiting_in_spool"], stats["studies_waiting_in_spool"]) == (0, 3, 2)
    assert 7100 < stats["oldest_waiting_s"] < 7300 and stats["overdue_studies"] == 1

    shown = json.loads(run_admin(database_url, "show", "1.7.2", "--format", "json"))
    assert (shown["study"], shown["instances"], shown["waiting_in_spool"]) == ({}, [], 1)
    assert "waiting_in_spool: 1" in run_admin(database_url, "show", "1.7.2")
    capsys.readouterr()
    assert admin.main(["--database-url", database_url, "show", "1.7.9"]) == 1
    assert capsys.readouterr().err == "study 1.7.9 not found\n"

    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(tmp_path / "elsewhere"))  # a host without the spool: unknown, not 0
    stats = json.loads(run_admin(database_url, "stats", "--format", "json"))
    assert stats["waiting_in_spool"] is None and stats["overdue_studies"] == 1


def test_a_study_is_found_by_the_accession_number_of_any_of_its_images(database_url):
    """A lateral scored first with ACC-B, then the URGENT PA with ACC-C: the study took ACC-B, and
    `list --studies --accession ACC-C` found nothing while `list --accession ACC-C` found the PA."""
    upgrade(database_url)
    engine = db.make_engine(database_url)
    with engine.begin() as conn:
        for sop, accession, flag in (("1.8.1.1", "ACC-B", None), ("1.8.1.2", "ACC-C", "URGENT")):
            result = {"severity": 2, "flag": flag, "probability": 0.9} if flag else None
            db.finish_instance(conn, {"study_instance_uid": "1.8.1", "sop_instance_uid": sop, "accession_number": accession,
                                      "status": "done" if flag else "skipped", "flag": flag})
            db.touch_study(conn, "1.8.1", accession, db.utcnow(), result)
        db.touch_study(conn, "1.8.2", "ACC-D", db.utcnow())
    engine.dispose()
    for accession in ("ACC-B", "ACC-C"):
        found = json.loads(run_admin(database_url, "list", "--studies", "--accession", accession, "--format", "json"))
        assert [(r["study_instance_uid"], r["accession_number"], r["flag"]) for r in found] == [("1.8.1", "ACC-B", "URGENT")]


NEWEST_FIRST_UNTIL_LIMIT = {"studies_not_triaged": "USING INDEX ix_studies_last_received"}
"""The one scan allowed: NOT_TRIAGED is the complement of a rule on counts computed per study, which no index
holds, so studies are read newest first until --limit is met (49 ms at 25,000 studies with --limit 50:
`benchmarks/admin_queries.py`, in the README). Matched as a substring: SQLite before 3.36 words the step
`SCAN TABLE studies AS s USING INDEX ...`."""


def test_admin_queries_use_indexes_not_table_scans(sqlite_url, monkeypatch):
    """Every query of list/show/stats searches an index, so it stays fast at 100k+ rows (timed in
    `benchmarks/admin_queries.py`). In SQLite's plan `SCAN t` reads every row, and so does `SCAN t
    USING INDEX i` (all rows in index order); only a covering-index scan (counts) is allowed."""
    from sqlalchemy import event

    populate(sqlite_url, 2000, seed=1)
    statements: list[tuple[str, tuple]] = []
    make_engine = db.make_engine

    def recording_engine(url, **kwargs):
        engine = make_engine(url, **kwargs)
        event.listen(engine, "before_cursor_execute",
                     lambda conn, cursor, sql, params, context, many: statements.append((sql, params)))
        return engine

    monkeypatch.setattr(db, "make_engine", recording_engine)
    selects: list[tuple[str, str, tuple]] = []
    for name, args in ADMIN_QUERIES.items():
        statements.clear()
        assert len(run_admin(sqlite_url, *args).splitlines()) >= 2, args  # each finds something (as the benchmark asks)
        selects += [(name, sql, params) for sql, params in statements  # the schema check reads alembic's one-row table
                    if sql.lstrip().upper().startswith("SELECT") and "alembic_version" not in sql]
    assert len(selects) >= len(ADMIN_QUERIES)
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        for name, sql, params in selects:
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]
            scans = [step for step in plan if step.startswith("SCAN ") and "COVERING INDEX" not in step
                     and not (name in NEWEST_FIRST_UNTIL_LIMIT and NEWEST_FIRST_UNTIL_LIMIT[name] in step)]
            assert not scans, (sql, plan)
            if "FROM study_flags" in sql:  # a study's images are found by the study, never by their status:
                # an EXISTS (status = 'skipped' ...) was searched by the status index in some processes (40x)
                assert not [step for step in plan if "ix_instances_status" in step], (sql, plan)
    engine.dispose()


def test_console_script_runs(sqlite_url):
    populate(sqlite_url, 8)
    out = subprocess.run([sys.executable, "-m", "worker.admin", "--database-url", sqlite_url, "stats"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "by_status" in out.stdout


def test_throughput_counts_the_intervals_between_finish_times():
    """Five results a second apart are 1.0 per second: dividing 5 by the 4 s between the first and the
    last gave 1.25 (and two results 0.1 s apart 20/s)."""
    start = dt.datetime(2026, 1, 1, 8, 0, 0)
    rows = [(start, start + dt.timedelta(seconds=i), 100.0, None) for i in range(5)]  # received, finished, ms, requeued
    assert admin._timing_stats(rows)["throughput_per_s"] == 1.0
    assert admin._timing_stats(rows[:1])["throughput_per_s"] is None


@pytest.mark.parametrize("limit", ["0", "-1", "99999999999999999999"])
def test_a_limit_must_be_positive(sqlite_url, limit, capsys):
    """`--limit 0` listed every row; `--limit -1` did on SQLite and failed with a traceback on PostgreSQL;
    a limit beyond 64 bits was an OverflowError."""
    upgrade(sqlite_url)
    with pytest.raises(SystemExit) as exited:
        admin.main(["--database-url", sqlite_url, "list", "--limit", limit])
    assert exited.value.code == 2 and f"must be 1 to {2**63 - 1}" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--since", "0001-01-01T00:00:00+01:00"), ("--until", "9999-12-31T23:00-02:00")])
def test_a_time_outside_the_calendar_in_utc_is_refused_in_one_line(sqlite_url, flag, value, capsys):
    upgrade(sqlite_url)
    with pytest.raises(SystemExit) as exited:
        admin.main(["--database-url", sqlite_url, "list", flag, value])
    assert exited.value.code == 2 and "not an ISO-8601 date/time within years 1-9999" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["export", "--format", "csv"], ["list"], ["requeue"]])
def test_a_database_behind_this_release_s_schema_is_refused_in_one_line(tmp_path, sqlite_url, command, monkeypatch, capsys):
    """`export` on schema 0001 failed with "no such column site_calibration_sha256" (a traceback)."""
    from worker.migrate import head_revision

    upgrade(sqlite_url, "0001")
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(tmp_path / "spool"))
    assert admin.main(["--database-url", sqlite_url, *command]) == 3
    err = capsys.readouterr().err
    assert err == (f"pneumonia-admin: the database schema is at 0001, this release needs {head_revision()}: "
                   "run `pneumonia-worker migrate`\n")


def test_a_missing_or_unmigrated_database_is_named_and_not_created(tmp_path, capsys):
    """The default URL is relative to the CWD: run elsewhere, `stats` created an empty var/triage.db
    and died with `no such table`."""
    path = tmp_path / "var" / "triage.db"
    assert admin.main(["--database-url", f"sqlite:///{path}", "stats"]) == 3
    assert f"no database file at {path}" in capsys.readouterr().err
    assert not path.exists()
    path.parent.mkdir()
    path.touch()
    assert admin.main(["--database-url", f"sqlite:///{path}", "list"]) == 3
    assert "no triage tables: run `pneumonia-worker migrate`" in capsys.readouterr().err


def test_a_sqlite_uri_is_opened_as_sqlite_reads_it(sqlite_url, tmp_path):
    """`file:...?mode=ro&uri=true` (a read-only look at a live database) was refused as a missing file."""
    populate(sqlite_url, 20)
    path = sqlite_url.removeprefix("sqlite:///")
    rows = json.loads(run_admin(f"sqlite:///file:{path}?mode=ro&uri=true", "list", "--format", "json"))
    assert len(rows) == 20


def test_a_database_that_is_down_is_one_line_not_a_traceback(capsys):
    from tests.dicom_gateway.helpers import free_port

    down = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"
    assert admin.main(["--database-url", down, "stats"]) == 3
    assert capsys.readouterr().err.startswith("pneumonia-admin: cannot open the database (OperationalError)")


def test_a_database_that_never_answers_is_one_line_not_a_hang(capsys):
    """A PostgreSQL that accepts and never answers (hung, or a proxy before a dead one) hung `stats` for ever."""
    from tests.worker.support import call_within, silent_server

    with silent_server() as port:
        stats = ["--database-url", f"postgresql+psycopg://postgres@127.0.0.1:{port}/test", "stats"]
        status, error = call_within(db.POSTGRES_CONNECT_TIMEOUT_S + 10, lambda: admin.main(stats))
    assert (status, error) == (3, None)
    assert capsys.readouterr().err.startswith("pneumonia-admin: cannot open the database (ConnectionTimeout)")


@pytest.mark.parametrize("url,says", [
    ("sqlite:///{tmp}/garbage.db", "cannot open the database (DatabaseError)"),
    ("postgres+psycopg://user:secret@host/db", "invalid database URL (NoSuchModuleError"),
    (":::", "invalid database URL (ArgumentError"),
    ("postgresql+psycopg://user:secret@db..hospital.org/triage", "cannot open the database (UnicodeError)"),
])
def test_a_database_that_cannot_be_opened_is_one_line_not_a_traceback(tmp_path, capsys, url, says):
    """A file that is not SQLite, a misspelt dialect and a malformed URL were tracebacks (exit 1)."""
    (tmp_path / "garbage.db").write_bytes(bytes(range(256)) * 20)
    assert admin.main(["--database-url", url.format(tmp=tmp_path), "stats"]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"pneumonia-admin: {says}") and err.count("\n") == 1 and "secret" not in err


@pytest.mark.parametrize("hours", ["nan", "1e10", "-1", "x"])
def test_a_window_out_of_range_is_refused_by_the_parser(small_db, hours, capsys):
    with pytest.raises(SystemExit) as exit_:
        admin.main(["--database-url", small_db[0], "stats", "--window-hours", hours])
    assert exit_.value.code == 2 and "--window-hours" in capsys.readouterr().err


def test_an_export_that_cannot_be_written_is_one_line(small_db, tmp_path, capsys):
    assert admin.main(["--database-url", small_db[0], "export", "--out", str(tmp_path / "no" / "such.csv")]) == 2
    err = capsys.readouterr().err
    assert err == "pneumonia-admin: cannot write the output (FileNotFoundError: No such file or directory)\n"


@pytest.mark.postgres
def test_output_held_by_a_stalled_pipe_holds_no_transaction_open(pg_url):
    """`pneumonia-admin list | less`: the session sat idle in transaction holding locks on instances
    while the pipe was full, and a migration's exclusive lock behind it would queue every worker."""
    from sqlalchemy import text

    populate(pg_url, 3000)
    proc = subprocess.Popen([sys.executable, "-m", "worker.admin", "--database-url", pg_url, "list", "--format", "csv"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    engine = db.make_engine(pg_url)
    try:
        time.sleep(1)
        states, settled = [], 0
        for _ in range(200):  # until the admin has connected, queried and blocked on the full pipe
            with engine.connect() as conn:
                states = conn.execute(text(
                    "SELECT state FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )).scalars().all()
            # between two statements a session is briefly idle in transaction (seen on a loaded CI
            # machine), and briefly idle between its connect and its query: only a state that lasts
            # (5 looks in a row here; 20 s for the one that fails) is the command blocked on the pipe
            calm = proc.poll() is None and states and not {"active", "idle in transaction"} & set(states)
            settled = settled + 1 if calm else 0
            if settled == 5:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the output should not fit the pipe: the command is blocked writing it"
        assert states, "the command's session was never seen: nothing was checked"
        assert "idle in transaction" not in states
    finally:
        engine.dispose()
        proc.stdout.read(100)
        proc.stdout.close()  # a reader that stops early (`| head`): no traceback
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and b"Traceback" not in err, err


def test_populated_studies_keep_their_most_severe_then_most_probable_image(sqlite_url):
    """The benchmark and test data follow db.touch_study's rule; severity 0 (likely normal) counted
    as none, so an all-normal study kept its last image's probability, not its highest."""
    from sqlalchemy import select

    rows = populate(sqlite_url, 400)
    expected: dict[str, tuple[int, float]] = {}
    for r in rows:
        if r["severity"] is not None:
            expected[r["study_instance_uid"]] = max(expected.get(r["study_instance_uid"], (-1, -1.0)),
                                                    (r["severity"], r["probability"]))
    engine = db.make_engine(sqlite_url)
    with engine.connect() as conn:
        stored = {s: (sev, p) for s, sev, p in conn.execute(
            select(db.studies.c.study_instance_uid, db.studies.c.severity, db.studies.c.max_probability))
            if sev is not None}
    engine.dispose()
    assert any(severity == 0 for severity, _ in expected.values())
    assert stored == expected


def test_requeue_sends_the_finalize_of_a_study_left_not_final_with_nothing_pending(tmp_path, database_url,
                                                                                 redis_server, monkeypatch, capsys):
    """Redis lost the finalize after the study's images were all scored: nothing pending to re-send, and
    the study read not final for good."""
    import redis

    from worker import contract

    upgrade(database_url)
    old, recent = dt.datetime(2026, 1, 1), db.utcnow()
    engine = db.make_engine(database_url)
    with engine.begin() as conn:
        db.touch_study(conn, "1.3.1", "ACC1", old)  # left not final
        db.touch_study(conn, "1.3.2", "ACC2", recent)  # still within --older-than: its finalize may be coming
        db.touch_study(conn, "1.3.3", "ACC3", old)
        db.finalize_study(conn, "1.3.3", old)  # final already
    engine.dispose()
    (tmp_path / "spool" / contract.SPOOL_PENDING).mkdir(parents=True)  # the gateway's spool, nothing pending
    redis_server.flush()
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("TRIAGE_BROKER_URL", redis_server.url)
    assert admin.main(["--database-url", database_url, "requeue", "--older-than", "3600"]) == 0
    messages = [json.loads(m) for m in redis.Redis.from_url(redis_server.url).lrange(contract.QUEUE, 0, -1)]
    assert [(m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0]) for m in messages] == [
        (contract.FINALIZE_STUDY, ["1.3.1"])]
    assert capsys.readouterr().out == "requeued 0 pending instance(s) and the finalize of 1 study(ies)\n"


def test_table_output_keeps_each_row_on_one_line_whatever_the_modality_wrote(sqlite_url):
    """An AccessionNumber "ACC1\\nX" split its row over two lines, the second one able to pass for another
    worklist row; an escape sequence could rewrite the terminal. Table cells write them as escapes."""
    upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(insert(db.instances).values(
            sop_instance_uid="1.2.3.4", study_instance_uid="1.2.3", spool_relpath="pending/1.2.3/1.2.3.4.dcm",
            accession_number="ACC1\n1.9.9.9  1.9.9  URGENT\x1b[2J\u2028", status="failed", attempts=1,
            reason="bad\rvalue", received_at=db.utcnow()))
    engine.dispose()
    for args in (("list",), ("show", "1.2.3"), ("list", "--studies"), ("stats",)):
        out = run_admin(sqlite_url, *args)
        assert "\x1b" not in out and "\r" not in out and "\u2028" not in out, args
        rows = [line for line in out.splitlines() if "ACC1" in line]
        assert all("URGENT" in line for line in rows), (args, out)  # the injected text stayed on the row
    listed = run_admin(sqlite_url, "list").splitlines()
    assert len(listed) == 2 and "ACC1\\n1.9.9.9  1.9.9  URGENT\\x1b[2J\\u2028" in listed[1]
    assert json.loads(run_admin(sqlite_url, "list", "--format", "json"))[0]["accession_number"].startswith("ACC1\n")


def test_final_since_finds_a_study_that_became_final_after_its_images(database_url):
    """A RIS polling `--studies --since <last poll>` never saw a study final whose images arrived before the
    poll and whose finalize came after it: --since filters on arrival. --final-since filters on finalized_at,
    and a study re-finalised after a late image appears again with its new finalisation time."""
    from sqlalchemy import update

    upgrade(database_url)
    poll = db.utcnow()
    before, after = poll - dt.timedelta(hours=1), poll + dt.timedelta(minutes=1)
    engine = db.make_engine(database_url)
    with engine.begin() as conn:
        for uid, received in (("1.5.1", before), ("1.5.2", before), ("1.5.3", after), ("1.5.4", before)):
            db.touch_study(conn, uid, f"ACC{uid}", received)
            db.finalize_study(conn, uid, received)
        # 1.5.1 became final after the poll (its finalize is later than `poll`); 1.5.2 and 1.5.4 before it
        conn.execute(update(db.studies).where(db.studies.c.study_instance_uid.in_(("1.5.2", "1.5.4")))
                     .values(finalized_at=before))
        db.reopen_study(conn, "1.5.4")  # a late image: final again only after the poll
        db.finalize_study(conn, "1.5.4", before)
        db.touch_study(conn, "1.5.5", "ACC5", after)  # arrived after the poll, not final
        for sop, study, finished in (("1.5.1.1", "1.5.1", after), ("1.5.2.1", "1.5.2", before)):
            conn.execute(insert(db.instances).values(
                sop_instance_uid=sop, study_instance_uid=study, status="done", attempts=1, received_at=before,
                finished_at=finished, flag="ROUTINE", stratum="likely_normal"))
        conn.execute(insert(db.instances).values(sop_instance_uid="1.5.1.2", study_instance_uid="1.5.1",
                                                 status="processing", attempts=1, received_at=before))
    engine.dispose()
    since = poll.replace(tzinfo=dt.timezone.utc).astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()

    def studies(*args: str) -> list[str]:
        return sorted(s["study_instance_uid"] for s in json.loads(run_admin(
            database_url, "export", "--studies", "--format", "json", *args)))

    assert studies("--final-since", since) == ["1.5.1", "1.5.3", "1.5.4"]
    assert studies("--since", since) == ["1.5.3", "1.5.5"]  # what a RIS polling on arrival saw
    assert studies("--final-since", poll.isoformat(), "--flag", "ROUTINE") == []
    listed = json.loads(run_admin(database_url, "list", "--final-since", since, "--format", "json"))
    assert [r["sop_instance_uid"] for r in listed] == ["1.5.1.1"]  # per instance: results finished since


def test_a_final_since_poll_with_a_limit_pages_through_a_burst_oldest_first(database_url):
    """Three studies final within moments, the first URGENT, polled with --limit 2 as the README says (the next
    T from the answer's latest finalized_at): newest first, every poll returned the same two newest studies and
    the URGENT one was never delivered. Oldest first, the polls page through all of them, per study and per
    instance."""
    from sqlalchemy import update

    upgrade(database_url)
    engine = db.make_engine(database_url)
    start = db.utcnow()
    with engine.begin() as conn:
        for i, flag in enumerate(("URGENT", "ROUTINE", "ROUTINE")):
            uid = f"1.6.{i}"
            db.touch_study(conn, uid, f"ACC{i}", start, {"severity": 2 - i, "flag": flag, "probability": 0.5})
            db.finalize_study(conn, uid, start)
            finished = start + dt.timedelta(milliseconds=3 * i)
            conn.execute(update(db.studies).where(db.studies.c.study_instance_uid == uid).values(finalized_at=finished))
            conn.execute(insert(db.instances).values(sop_instance_uid=f"{uid}.1", study_instance_uid=uid, status="done",
                                                     attempts=1, received_at=start, finished_at=finished, flag=flag))
    engine.dispose()

    def poll(*args: str, key: str, stamp: str) -> list[str]:
        taken: list[str] = []
        since = start.isoformat()
        for _ in range(4):
            rows = json.loads(run_admin(database_url, "export", *args, "--format", "json", "--final-since", since,
                                        "--limit", "2"))
            taken += [r[key] for r in rows if r[key] not in taken]
            since = max(r[stamp] for r in rows)
        return taken

    assert poll("--studies", key="study_instance_uid", stamp="finalized_at") == ["1.6.0", "1.6.1", "1.6.2"]
    assert poll(key="sop_instance_uid", stamp="finished_at") == ["1.6.0.1", "1.6.1.1", "1.6.2.1"]


def test_an_unknown_flag_or_stratum_is_refused_naming_the_accepted_values(small_db, capsys):
    """`--flag urgnt` printed an empty worklist with exit 0 (read as "nothing urgent"), while `--status bogus`
    exits 2. Any case names a value when it names one only."""
    url, rows = small_db
    for args, named in ((("--flag", "URGNT"), "'URGENT', 'PRIORITY', 'ROUTINE'"),
                        (("--studies", "--stratum", "high"), "'likely_normal', 'indeterminate', 'high_suspicion'")):
        assert admin.main(["--database-url", url, "list", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"pneumonia-admin list: error: argument {args[-2]}: invalid choice: {args[-1]!r}")
        assert named in err and err.count("\n") == 1
    urgent = {r["sop_instance_uid"] for r in rows if r["flag"] == "URGENT"}
    assert {r["sop_instance_uid"] for r in json.loads(run_admin(url, "list", "--flag", "urgent", "--format", "json"))
            } == urgent
    high = json.loads(run_admin(url, "export", "--stratum", "HIGH_SUSPICION", "--format", "json"))
    assert len(high) == sum(r["stratum"] == "high_suspicion" for r in rows)


def test_not_triaged_is_a_study_filter_in_any_spelling_and_refused_for_images(small_db, capsys):
    """The studies to read without the model's help were found only by reading `worklist_flag` row by row."""
    url, _ = small_db
    studies = json.loads(run_admin(url, "list", "--studies", "--format", "json"))
    expected = sorted(s["study_instance_uid"] for s in studies if s["worklist_flag"] == "NOT_TRIAGED")
    assert expected and len(expected) < len(studies)
    for spelling in ("NOT_TRIAGED", "not triaged", "Not-Triaged"):
        listed = json.loads(run_admin(url, "list", "--studies", "--flag", spelling, "--format", "json"))
        assert sorted(s["study_instance_uid"] for s in listed) == expected
    assert admin.main(["--database-url", url, "list", "--flag", "NOT_TRIAGED"]) == 2
    err = capsys.readouterr().err
    assert "NOT_TRIAGED is a study's worklist flag, not an image's: add --studies" in err and err.count("\n") == 1


@pytest.mark.parametrize("option", ["--flag", "--stratum", "--accession", "--study"])
def test_an_empty_filter_is_refused_not_read_as_no_filter(small_db, capsys, option):
    """`--accession "$ACC"` with the variable unset printed every study's results, exit 0."""
    url, _ = small_db
    for command in (["list"], ["list", "--studies"], ["export"]):
        with pytest.raises(SystemExit) as exited:
            admin.main(["--database-url", url, *command, option, ""])
        assert exited.value.code == 2
        assert f"argument {option}: empty" in capsys.readouterr().err


def test_a_flag_of_an_earlier_flag_map_stays_listable(small_db, monkeypatch, capsys):
    """Results scored under an earlier TRIAGE_FLAG_MAP keep their flag: refusing it would hide them."""
    url, rows = small_db
    monkeypatch.setenv("TRIAGE_FLAG_MAP", json.dumps({"high_suspicion": "STAT", "indeterminate": "SOON",
                                                      "likely_normal": "ROUTINE"}))
    assert len(json.loads(run_admin(url, "list", "--flag", "URGENT", "--format", "json"))) == sum(
        r["flag"] == "URGENT" for r in rows)
    assert json.loads(run_admin(url, "list", "--flag", "stat", "--format", "json")) == []  # configured, none yet
    assert admin.main(["--database-url", url, "list", "--flag", "urgent"]) == 2  # stored values: exact only
    assert "'STAT', 'SOON', 'ROUTINE'" in capsys.readouterr().err


def test_printed_times_carry_their_utc_offset(sqlite_url, tmp_path):
    """Stored times are UTC; printed without an offset an ISO-8601 reader in another zone took them for local."""
    upgrade(sqlite_url)
    received = dt.datetime(2026, 11, 28, 11, 56, 36, 344551)
    engine = db.make_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(insert(db.instances).values(sop_instance_uid="1.2.3.4", study_instance_uid="1.2.3",
                                                 status="done", attempts=1, received_at=received))
        db.touch_study(conn, "1.2.3", "ACC", received)
    engine.dispose()
    aware = received.replace(tzinfo=dt.timezone.utc)
    (row,) = json.loads(run_admin(sqlite_url, "list", "--format", "json"))
    assert row["received_at"] == "2026-11-28T11:56:36.344551+00:00"
    assert dt.datetime.fromisoformat(row["received_at"]) == aware
    (study,) = json.loads(run_admin(sqlite_url, "list", "--studies", "--format", "json"))
    assert study["last_received_at"] == "2026-11-28T11:56:36.344551+00:00"
    (exported,) = list(csv.DictReader(io.StringIO(run_admin(sqlite_url, "export", "--format", "csv"))))
    assert exported["received_at"] == "2026-11-28T11:56:36.344551+00:00"
    shown = json.loads(run_admin(sqlite_url, "show", "1.2.3", "--format", "json"))
    assert shown["study"]["last_received_at"] == shown["instances"][0]["received_at"] == row["received_at"]
    assert "2026-11-28T11:56:36+00:00" in run_admin(sqlite_url, "list").splitlines()[1]


def test_requeue_with_the_broker_down_is_one_line_and_records_nothing_unsent(tmp_path, database_url, monkeypatch,
                                                                            capsys):
    """A broker that did not answer was a 114-line traceback (kombu OperationalError), after a `queued` row
    had been written for a file never sent. The line names the problem, not the URL's password."""
    import os

    from tests.dicom_gateway.helpers import free_port
    from worker import contract

    upgrade(database_url)
    path = tmp_path / "spool" / contract.pending_relpath("1.2.3", "1.2.3.4")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    os.utime(path, (1_700_000_000, 1_700_000_000))
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("TRIAGE_BROKER_URL", f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    assert admin.main(["--database-url", database_url, "requeue"]) == 3
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "s3cret" not in err
    assert err.startswith("pneumonia-admin: cannot send to the broker (OperationalError: ")
    assert "re-sent 0 of 1 pending instance(s)" in err
    engine = db.make_engine(database_url)
    with engine.connect() as conn:
        assert conn.execute(select(db.instances.c.sop_instance_uid)).all() == []
    engine.dispose()


def test_broker_problem_blanks_the_broker_passwords():
    from worker.config import WorkerSettings

    settings = WorkerSettings(broker_url="redis://user:p%40ss@127.0.0.1:6379/0")
    said = admin._broker_problem(ConnectionError("auth p@ss and p%40ss failed"), settings)
    assert said == "ConnectionError: auth *** and *** failed"


def test_an_export_file_is_created_owner_and_group_readable_only(small_db, tmp_path):
    """An export holds accession numbers: open() created it 0644 (world-readable) under umask 022, where the
    gateway spools 0640. A file that exists keeps the mode its owner gave it."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        new, kept = tmp_path / "new.csv", tmp_path / "kept.csv"
        kept.write_text("old\n")
        kept.chmod(0o604)
        for out in (new, kept):
            run_admin(small_db[0], "export", "--out", str(out))
    finally:
        os.umask(old)
    assert stat.S_IMODE(new.stat().st_mode) == 0o640
    assert stat.S_IMODE(kept.stat().st_mode) == 0o604 and kept.read_text().startswith("sop_instance_uid,")


def test_a_final_since_poll_searches_the_finalized_index(sqlite_url):
    """The RIS's poll runs every minute or so over the whole history: it must search `finalized_at`
    (migration 0006) and read in that order, not walk the studies in arrival order."""
    from sqlalchemy import event

    populate(sqlite_url, 2000, seed=1)
    engine = db.make_engine(sqlite_url)
    with engine.begin() as conn:
        for uid in conn.execute(select(db.studies.c.study_instance_uid)).scalars().all()[::2]:
            db.finalize_study(conn, uid, None)
    statements: list[tuple[str, tuple]] = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, sql, params, context, many: statements.append((sql, params)))
    for argv, index in ((["list", "--studies", "--final-since", "2026-01-01"], "ix_studies_finalized"),
                        (["list", "--final-since", "2026-01-01"], "ix_instances_status_finished")):
        with engine.connect() as conn:
            rows = admin.fetch_list(conn, admin.build_parser().parse_args(argv))
        assert rows
        sql, params = next(s for s in statements[::-1] if "study_flags" in s[0] or "--studies" not in argv)
        with engine.connect() as conn:
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]
        assert plan[0].startswith("SEARCH ") and index in plan[0], (argv, plan)
    engine.dispose()


@pytest.mark.postgres
def test_a_database_lost_after_it_opened_is_one_line_not_a_traceback(pg_url, monkeypatch, capsys):
    """The server ends the session between the schema check and the query (a restart, a connection that went
    silent and was cut by the keepalives): a traceback before, now one line and exit 3 as for one that is down."""
    import psycopg

    from tests.worker.support import PG_ADMIN_DSN

    upgrade(pg_url)
    name = pg_url.rsplit("/", 1)[1]
    real_fetch, real_command = admin.fetch_stats, admin.COMMANDS["stats"]

    def fetch_after_the_server_ended_the_session(conn, args):
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        return real_fetch(conn, args)

    monkeypatch.setitem(admin.COMMANDS, "stats", (fetch_after_the_server_ended_the_session, real_command[1]))
    assert admin.main(["--database-url", pg_url, "stats"]) == 3
    out, err = capsys.readouterr()
    assert out == "" and err == "pneumonia-admin: lost the database (AdminShutdown)\n"


def test_a_study_with_a_failed_image_is_not_triage_complete(database_url, tmp_path):
    """The flag comes from the images that were scored: a study whose second image failed (a truncated file,
    perhaps the one with the pneumonia) read final and ROUTINE, and a RIS mapping the flag to a priority
    filed it so. `triage_complete` says it is not, in the study view, the export and `show`."""
    upgrade(database_url)
    now = db.utcnow()
    engine = db.make_engine(database_url)
    with engine.begin() as conn:
        for study in ("1.7.1", "1.7.2", "1.7.3", "1.7.4"):
            db.touch_study(conn, study, f"ACC{study}", now)
        rows = [("1.7.1.1", "1.7.1", "done"), ("1.7.1.2", "1.7.1", "failed"), ("1.7.2.1", "1.7.2", "done"),
                ("1.7.2.2", "1.7.2", "skipped"), ("1.7.3.1", "1.7.3", "done"), ("1.7.4.1", "1.7.4", "skipped")]
        for sop, study, status in rows:
            done = status == "done"
            conn.execute(insert(db.instances).values(
                sop_instance_uid=sop, study_instance_uid=study, status=status, attempts=1, received_at=now,
                finished_at=now, flag="ROUTINE" if done else None, stratum="likely_normal" if done else None,
                reason=None if done else "a reason"))
        for study in ("1.7.1", "1.7.2", "1.7.4"):  # 1.7.3 is not final yet; 1.7.4 holds a lateral only
            db.finalize_study(conn, study, now)
    engine.dispose()
    studies = {s["study_instance_uid"]: s for s in json.loads(run_admin(database_url, "export", "--studies",
                                                                          "--format", "json"))}
    assert {uid: (s["final"], s["n_failed"], s["triage_complete"]) for uid, s in studies.items()} == {
        "1.7.1": (True, 1, False), "1.7.2": (True, 0, True), "1.7.3": (False, 0, False),
        "1.7.4": (True, 0, False)}  # no image scored: not triaged, though nothing failed (it read complete)
    assert json.loads(run_admin(database_url, "show", "1.7.1", "--format", "json"))["study"]["triage_complete"] is False
    out = tmp_path / "studies.csv"
    run_admin(database_url, "export", "--studies", "--format", "csv", "--out", str(out))
    assert {r["study_instance_uid"]: r["triage_complete"] for r in csv.DictReader(out.open())}["1.7.2"] == "True"


@pytest.mark.parametrize("reason,complete", [
    ("ViewPosition missing (policy: skip)", False), ("BodyPartExamined missing (policy: skip)", False),
    ("patient orientation 'L\\F\\A' has 3 values, 2 expected", False),
    ("view position 'LL' (left lateral) is not frontal (PA/AP)", True),
    ("patient orientation 'P\\F' is not a frontal chest orientation", True), ("body part 'KNEE' is not CHEST", True),
])
def test_an_image_skipped_for_want_of_tags_leaves_its_study_incomplete(database_url, reason, complete):
    """A frontal without ViewPosition (the default `skip` policy) may be the study's pneumonia image: its study
    read final, ROUTINE and triage_complete from its scored normal image, and a RIS filed it so. A lateral, or
    another body part, is not the model's to score and leaves the study complete."""
    upgrade(database_url)
    now = db.utcnow()
    engine = db.make_engine(database_url)
    with engine.begin() as conn:
        db.touch_study(conn, "1.9.1", "ACC191", now)
        for sop, status in (("1.9.1.1", "done"), ("1.9.1.2", "skipped")):
            done = status == "done"
            conn.execute(insert(db.instances).values(
                sop_instance_uid=sop, study_instance_uid="1.9.1", status=status, attempts=1, received_at=now,
                finished_at=now, flag="ROUTINE" if done else None, stratum="likely_normal" if done else None,
                reason=None if done else reason))
        db.finalize_study(conn, "1.9.1", now)
    engine.dispose()
    listed = json.loads(run_admin(database_url, "list", "--studies", "--format", "json"))
    exported = json.loads(run_admin(database_url, "export", "--studies", "--format", "json"))
    shown = json.loads(run_admin(database_url, "show", "1.9.1", "--format", "json"))["study"]
    for study in (listed[0], exported[0], shown):
        assert (study["triage_complete"], study["n_unverified"]) == (complete, 0 if complete else 1), study


WORKLIST_CASES = {  # study: (final, its images as (status, stratum or skip reason), the worklist flag)
    "2.1.1": (True, [("done", "likely_normal"), ("failed", "truncated")], "NOT_TRIAGED"),
    "2.1.2": (True, [("done", "likely_normal"), ("skipped", "view position 'LL' (left lateral) is not frontal (PA/AP)")],
              "ROUTINE"),
    "2.1.3": (False, [("done", "likely_normal")], "NOT_TRIAGED"),  # more images may come
    "2.1.4": (True, [("done", "high_suspicion"), ("failed", "truncated")], "URGENT"),
    "2.1.5": (True, [("done", "likely_normal"), ("skipped", "patient orientation '%\\_\\F' has 3 values, 2 expected")],
              "NOT_TRIAGED"),
    "2.1.6": (True, [("done", "indeterminate"), ("queued", None)], "PRIORITY"),
    "2.1.7": (True, [("skipped", "view position 'LL' (left lateral) is not frontal (PA/AP)")], "NOT_TRIAGED"),
    "2.1.8": (True, [("done", "likely_normal"), ("skipped", "ViewPosition missing (policy: skip)")], "NOT_TRIAGED"),
    "2.1.9": (False, [("done", "high_suspicion")], "URGENT"),  # an URGENT image raises its study at once
    "2.1.10": (True, [("done", "likely_normal"), ("skipped", "patient orientation 'P\\F' has 2 values, 3 expected!")],
               "ROUTINE"),  # not `display_orientation`'s wording: a skip the SQL and Python matches both refuse
    "2.1.11": (True, [("done", "likely_normal"), ("skipped", "Patient orientation 'P\\F' has 3 values, 2 Expected")],
               "ROUTINE"),  # nor this, in another case (SQLite's LIKE ignores case, unverified_skip does not)
}


def store_worklist_cases(url: str, cases: dict, flags: dict[str, str]) -> dict[str, str]:
    """Studies as `cases` describes them (final, images as (status, stratum or skip reason), worklist flag), the
    images flagged by `flags`; returns each study's expected worklist flag."""
    upgrade(url)
    now = db.utcnow()
    severity = {"likely_normal": 0, "indeterminate": 1, "high_suspicion": 2}
    engine = db.make_engine(url)
    with engine.begin() as conn:
        for study, (final, images, _) in cases.items():
            db.touch_study(conn, study, f"ACC{study}", now)
            for n, (status, detail) in enumerate(images):
                scored = ({"stratum": detail, "flag": flags[detail], "severity": severity[detail], "probability": 0.5}
                          if status == "done" else {})
                conn.execute(insert(db.instances).values(
                    sop_instance_uid=f"{study}.{n}", study_instance_uid=study, status=status, attempts=1,
                    received_at=now, finished_at=None if status == "queued" else now,
                    **(scored if status == "done" else {"reason": detail})))
                if status == "done":
                    db.touch_study(conn, study, f"ACC{study}", now, scored)
            if final:
                db.finalize_study(conn, study, now)
    engine.dispose()
    return {study: case[2] for study, case in cases.items()}


def assert_worklist(url: str, expected: dict[str, str], flags: tuple[str, ...]) -> None:
    """The printed `worklist_flag` (list and export) and the `--flag` filter (SQL) agree with `expected`."""
    for command in ("list", "export"):
        rows = json.loads(run_admin(url, command, "--studies", "--format", "json"))
        assert {r["study_instance_uid"]: r["worklist_flag"] for r in rows} == expected, command
    for flag in flags:
        for command in ("list", "export"):
            rows = json.loads(run_admin(url, command, "--studies", "--flag", flag, "--format", "json"))
            assert sorted(r["study_instance_uid"] for r in rows) == sorted(
                study for study, worklist in expected.items() if worklist == flag), (command, flag)


def test_a_study_not_triage_complete_is_never_listed_as_routine(database_url):
    """The flag comes from the images that were scored: a study whose second image failed, still waited or could
    not be told a frontal chest read ROUTINE from its first, and `list --studies --flag ROUTINE`, the query a RIS
    uses to file studies low, returned it. `worklist_flag` says NOT_TRIAGED there, and `--flag` with `--studies`
    filters on it; an URGENT or PRIORITY image still raises its study at once, complete or not. The SQL filter
    and the printed column are two statements of one rule, so every case is checked through both."""
    flags = {"likely_normal": "ROUTINE", "indeterminate": "PRIORITY", "high_suspicion": "URGENT"}
    expected = store_worklist_cases(database_url, WORKLIST_CASES, flags)
    assert_worklist(database_url, expected, ("URGENT", "PRIORITY", "ROUTINE", "NOT_TRIAGED"))
    shown = json.loads(run_admin(database_url, "show", "2.1.1", "--format", "json"))["study"]
    assert (shown["flag"], shown["worklist_flag"]) == ("ROUTINE", "NOT_TRIAGED")
    table = run_admin(database_url, "list", "--studies").splitlines()
    assert table[0].split()[:3] == ["study_instance_uid", "accession_number", "worklist_flag"]


def test_a_site_map_giving_indeterminate_the_routine_flag_keeps_incomplete_studies_out_of_routine(database_url,
                                                                                               monkeypatch):
    """A site may map `indeterminate` to ROUTINE too (two flags only). An incomplete study whose scored image was
    indeterminate then read ROUTINE, and `--flag ROUTINE` listed it (review): a flag that says "may wait" under
    the site's map needs a complete study, whatever the stratum behind it."""
    flags = {"likely_normal": "ROUTINE", "indeterminate": "ROUTINE", "high_suspicion": "URGENT"}
    monkeypatch.setenv("TRIAGE_FLAG_MAP", json.dumps(flags))
    cases = {
        "3.1.1": (True, [("done", "indeterminate"), ("failed", "truncated")], "NOT_TRIAGED"),
        "3.1.2": (True, [("done", "indeterminate")], "ROUTINE"),
        "3.1.3": (True, [("done", "high_suspicion"), ("failed", "truncated")], "URGENT"),
    }
    assert_worklist(database_url, store_worklist_cases(database_url, cases, flags), ("URGENT", "ROUTINE", "NOT_TRIAGED"))


def test_a_study_export_says_which_model_scored_it_and_why_images_failed(database_url):
    """A RIS polling `export --studies` got the flag with no model, site calibration or failure reason: it
    needed an export per study to learn what produced a flag, or why an image was not scored."""
    upgrade(database_url)
    now = db.utcnow()
    engine = db.make_engine(database_url)
    with engine.begin() as conn:
        for study in ("1.8.1", "1.8.2"):
            db.touch_study(conn, study, f"ACC{study}", now)
        rows = [("1.8.1.1", "1.8.1", "done", "1.1.0", None), ("1.8.1.2", "1.8.1", "failed", None, "cut short"),
                ("1.8.1.3", "1.8.1", "failed", None, "cut short"), ("1.8.2.1", "1.8.2", "done", "1.1.0", None),
                ("1.8.2.2", "1.8.2", "done", "1.2.0", None)]
        for sop, study, status, version, reason in rows:
            conn.execute(insert(db.instances).values(
                sop_instance_uid=sop, study_instance_uid=study, status=status, attempts=1, received_at=now,
                finished_at=now, reason=reason, model_version=version, model_sha256=version and f"sha-{version}",
                site_calibration_sha256="cal-a" if version else None))
    engine.dispose()
    studies = {s["study_instance_uid"]: s for s in json.loads(run_admin(database_url, "export", "--studies",
                                                                          "--format", "json"))}
    assert {k: studies["1.8.1"][k] for k in ("model_version", "model_sha256", "site_calibration_sha256",
                                             "failure_reasons")} == {
        "model_version": "1.1.0", "model_sha256": "sha-1.1.0", "site_calibration_sha256": "cal-a",
        "failure_reasons": "cut short"}
    assert studies["1.8.2"]["model_version"] == "mixed" and studies["1.8.2"]["failure_reasons"] is None
    listed = json.loads(run_admin(database_url, "list", "--studies", "--format", "json"))
    assert "model_version" not in listed[0]  # the worklist stays as it was


def test_an_export_is_utf_8_whatever_the_locale(database_url, tmp_path):
    """In an ASCII locale an accession number in another script raised UnicodeEncodeError, a traceback, and
    left the CSV cut short after the rows before it."""
    import os
    import subprocess
    import sys

    upgrade(database_url)
    now = db.utcnow()
    engine = db.make_engine(database_url)
    with engine.begin() as conn:
        for study, accession in (("1.9.1", "A1"), ("1.9.2", "MÜLLER-Ø")):
            db.touch_study(conn, study, accession, now)
    engine.dispose()
    out = tmp_path / "studies.csv"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": ""}
    command = [sys.executable, "-c", "import sys; from worker.admin import main; sys.exit(main(sys.argv[1:]))",
               "--database-url", database_url, "export", "--studies", "--format", "csv"]
    done = subprocess.run([*command, "--out", str(out)], env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "MÜLLER-Ø" in out.read_text(encoding="utf-8")
    to_stdout = subprocess.run(command, env=env, capture_output=True, timeout=120)  # a RIS reading the pipe
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert "MÜLLER-Ø" in to_stdout.stdout.decode("utf-8")


def test_an_export_that_fails_part_way_leaves_the_earlier_file_whole(small_db, tmp_path, monkeypatch, capsys):
    """A poller reading the file must never see half an export: it is written beside and renamed over."""
    out = tmp_path / "export.csv"
    run_admin(small_db[0], "export", "--out", str(out))
    before = out.read_bytes()
    real_write = admin._write

    def disk_full_half_way(rows, columns, fmt, handle):
        real_write(rows[: len(rows) // 2], columns, fmt, handle)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(admin, "_write", disk_full_half_way)
    assert admin.main(["--database-url", small_db[0], "export", "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == before and not list(tmp_path.glob("*partial*")) and not list(tmp_path.glob(".*"))


def test_an_export_through_a_symlink_replaces_what_it_points_at(small_db, tmp_path):
    """Renamed over the link, the export left the link's target (what the RIS reads) stale."""
    target, link = tmp_path / "exports" / "latest.csv", tmp_path / "latest.csv"
    target.parent.mkdir()
    target.write_text("old\n")
    link.symlink_to(target)
    run_admin(small_db[0], "export", "--out", str(link))
    assert link.is_symlink() and target.read_text().startswith("sop_instance_uid,")


def test_an_export_keeps_the_owner_and_group_of_the_file_it_replaces(small_db, tmp_path):
    import os

    if os.geteuid() != 0:
        pytest.skip("giving a file another owner needs root")
    out = tmp_path / "export.csv"
    out.write_text("old\n")
    os.chown(out, 65534, 65534)
    run_admin(small_db[0], "export", "--out", str(out))
    assert (out.stat().st_uid, out.stat().st_gid) == (65534, 65534) and out.read_text().startswith("sop_instance_uid,")


def test_an_export_into_a_folder_it_cannot_write_is_written_in_place(small_db, tmp_path, monkeypatch):
    """A file the user may write in a folder they may not: the temporary file beside it cannot be made, so the
    export is written in place, as before 2026-11-29 (it failed with PermissionError)."""
    import os

    out = tmp_path / "export.csv"
    out.write_text("old\n")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == tmp_path else real_access(path, mode, **kw))
    run_admin(small_db[0], "export", "--out", str(out))
    assert out.read_text().startswith("sop_instance_uid,") and not list(tmp_path.glob(".*partial"))
