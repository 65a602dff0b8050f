"""Review of `pneumonia-admin` (requeue, reprocess): a spool that is not where the command looks, a
`--reason-contains` read alike on both backends, an `--older-than` a script mistyped."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import redis
from sqlalchemy import select

from worker import admin, contract, db
from worker.migrate import upgrade
from worker.reprocess import Selection, select_candidates
from worker.spool import archive_path

STUDY = "1.2.826.0.1.3680043.8.498.7"
RECEIVED = dt.datetime(2026, 11, 1, 8, 0, 0)


def terminal_row(engine, sop: str, status: str, reason: str | None) -> None:
    with engine.begin() as conn:
        db.finish_instance(conn, {"study_instance_uid": STUDY, "sop_instance_uid": sop, "status": status,
                                  "reason": reason, "accession_number": "ACC7", "received_at": RECEIVED,
                                  "finished_at": RECEIVED, "spool_relpath": contract.pending_relpath(STUDY, sop)})
        db.touch_study(conn, STUDY, "ACC7", RECEIVED)


def rows(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["sop_instance_uid"]: dict(r) for r in conn.execute(select(db.instances)).mappings()}


def queued_tasks(url: str) -> list[str]:
    return [json.loads(m)["headers"]["task"] for m in redis.Redis.from_url(url).lrange(contract.QUEUE, 0, -1)]


def test_requeue_where_the_spool_is_not_says_so_and_exits_3(tmp_path, database_url, redis_server, monkeypatch,
                                                            capsys):
    """TRIAGE_SPOOL_DIR unset (./var/spool), another host's, or a mount not up: the listing of pending/ found
    nothing and requeue said "requeued 0 pending instance(s)", exit 0, to an admin recovering from an outage
    while the gateway's spool held stranded images. The overdue finalizes, which need the database only, are
    still sent."""
    upgrade(database_url)
    engine = db.make_engine(database_url)
    with engine.begin() as conn:
        db.touch_study(conn, "1.3.1", "ACC1", dt.datetime(2026, 1, 1))  # not final, its finalize overdue
    engine.dispose()
    redis_server.flush()
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(tmp_path / "not-the-spool"))
    monkeypatch.setenv("TRIAGE_BROKER_URL", redis_server.url)
    assert admin.main(["--database-url", database_url, "requeue", "--older-than", "0"]) == 3
    out, err = capsys.readouterr()
    assert out == "requeued 0 pending instance(s) and the finalize of 1 study(ies)\n"
    assert err.count("\n") == 1 and err.startswith(
        f"pneumonia-admin: cannot read the spool's pending/ in {tmp_path / 'not-the-spool'} (FileNotFoundError)")
    assert queued_tasks(redis_server.url) == [contract.FINALIZE_STUDY]


def test_requeue_with_an_empty_pending_folder_is_still_a_success(tmp_path, database_url, redis_server, monkeypatch,
                                                                 capsys):
    upgrade(database_url)
    (tmp_path / "spool" / contract.SPOOL_PENDING / STUDY).mkdir(parents=True)  # a study folder left empty
    redis_server.flush()
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("TRIAGE_BROKER_URL", redis_server.url)
    assert admin.main(["--database-url", database_url, "requeue", "--older-than", "0"]) == 0
    assert capsys.readouterr() == ("requeued 0 pending instance(s) and the finalize of 0 study(ies)\n", "")


@pytest.mark.parametrize("dry_run", [True, False])
def test_reprocess_where_the_spool_is_not_changes_nothing_and_exits_3(tmp_path, database_url, redis_server,
                                                                       monkeypatch, capsys, dry_run):
    """Run with TRIAGE_SPOOL_DIR unset or on a host without the spool, every instance read "no archived copy
    (TRIAGE_SPOOL_RETENTION=delete, or pruned by prune-archive)", exit 0: the images seemed gone for good while
    the gateway's archive held them."""
    upgrade(database_url)
    engine = db.make_engine(database_url)
    terminal_row(engine, f"{STUDY}.1", "failed", "internal error (ValueError)")
    copy = archive_path(tmp_path / "spool", STUDY, f"{STUDY}.1")
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"DICM")
    before = rows(engine)
    redis_server.flush()
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("TRIAGE_BROKER_URL", redis_server.url)
    assert admin.main(["--database-url", database_url, "reprocess", *(["--dry-run"] if dry_run else [])]) == 3
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "no archived copy" not in err
    assert err.startswith(f"pneumonia-admin reprocess: no spool with an archive/ folder in {tmp_path / 'elsewhere'}")
    assert rows(engine) == before and copy.is_file() and queued_tasks(redis_server.url) == []
    assert not (tmp_path / "elsewhere").exists()
    engine.dispose()


def test_reason_contains_matches_the_case_as_stored_on_both_backends(database_url):
    """The help says "case as stored", and PostgreSQL's LIKE keeps case; SQLite's ignored it, so
    `--reason-contains viewposition` reprocessed rows on SQLite that it did not on PostgreSQL."""
    upgrade(database_url)
    engine = db.make_engine(database_url)
    terminal_row(engine, f"{STUDY}.1", "skipped", "ViewPosition missing (policy: skip)")
    terminal_row(engine, f"{STUDY}.2", "skipped", "view position LL is not frontal (PA/AP)")
    sops = lambda text: [c.sop_uid for c in select_candidates(engine, Selection(status="skipped",  # noqa: E731
                                                                                 reason_contains=text))]
    assert sops("ViewPosition") == [f"{STUDY}.1"]
    assert sops("viewposition") == [] and sops("VIEW POSITION") == []
    assert sops("view position") == [f"{STUDY}.2"]
    assert sops("View_osition") == [] and sops("%") == [] and sops("(PA/AP)") == [f"{STUDY}.2"]  # no wildcards
    engine.dispose()


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1e300", "x"])
def test_requeue_refuses_an_age_it_cannot_count_back(sqlite_url, value, capsys):
    """nan, inf or an age beyond the calendar was a traceback, raised after the pending files had been sent."""
    with pytest.raises(SystemExit) as exit_:
        admin.main(["--database-url", sqlite_url, "requeue", f"--older-than={value}"])
    assert exit_.value.code == 2 and "--older-than" in capsys.readouterr().err


def test_prune_archive_where_the_spool_is_not_says_so_and_exits_3(tmp_path, monkeypatch, capsys):
    """A cron job or the compose service with TRIAGE_SPOOL_DIR unset or its volume not mounted printed
    "deleted 0 archived instance(s)", exit 0, every night, while the gateway's archive kept patient images
    past the retention period."""
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(tmp_path / "not-the-spool"))
    assert admin.main(["prune-archive", "--older-than-days", "30"]) == 3
    out, err = capsys.readouterr()
    assert out == "" and err == (f"pneumonia-admin prune-archive: no spool in {tmp_path / 'not-the-spool'} "
                                 "(no pending/ or archive/): nothing pruned; TRIAGE_SPOOL_DIR must name the "
                                 "gateway's spool\n")
    (tmp_path / "not-the-spool" / contract.SPOOL_PENDING).mkdir(parents=True)  # a spool, nothing archived yet
    assert admin.main(["prune-archive", "--older-than-days", "30", "--dry-run"]) == 0
    assert capsys.readouterr().out == "would delete 0 archived instance(s), 0.0 MiB, received more than 30 days ago\n"


def test_the_periodic_pruner_keeps_running_while_the_spool_is_not_there(tmp_path, monkeypatch, capsys):
    """The compose service starts beside the gateway, which makes the spool's folders: no restart loop."""
    class Slept(Exception):
        pass

    def sleep(seconds):
        raise Slept(seconds)

    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(tmp_path / "fresh-volume"))
    monkeypatch.setattr(admin.time, "sleep", sleep)
    with pytest.raises(Slept):
        admin.main(["prune-archive", "--older-than-days", "30", "--every-hours", "24"])
    assert "nothing pruned" in capsys.readouterr().err


def test_reprocess_whose_copies_cannot_be_moved_exits_3(tmp_path, sqlite_url, redis_server, monkeypatch, capsys):
    """Run as another user than the spool's owner (Linux's protected_hardlinks refuses the link that moves the
    copy), every instance was "not reprocessed ... could not be moved (PermissionError)" on stderr and the
    command said "reprocessed 0 of 2" with exit 0, which a script reads as done. The other instances of the
    batch still go (a file-system error is that instance's), and the rows stay as they were."""
    import os

    from worker import reprocess

    upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    spool = tmp_path / "spool"
    for sop in (f"{STUDY}.1", f"{STUDY}.2"):
        terminal_row(engine, sop, "failed", "internal error (ValueError)")
        copy = archive_path(spool, STUDY, sop)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(b"DICM")
    real_link = os.link

    def link(source, target):
        if str(source).endswith(f"{STUDY}.1.dcm"):
            raise PermissionError(1, "Operation not permitted")
        return real_link(source, target)

    monkeypatch.setattr(reprocess.os, "link", link)
    redis_server.flush()
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(spool))
    monkeypatch.setenv("TRIAGE_BROKER_URL", redis_server.url)
    assert admin.main(["--database-url", sqlite_url, "reprocess"]) == 3
    out, err = capsys.readouterr()
    assert out.splitlines()[-1].startswith("reprocessed 1 of 2 failed instance(s)")
    assert "could not be moved to pending/ (PermissionError)" in err and err.splitlines()[-1].startswith(
        "pneumonia-admin reprocess: 1 instance(s) not reprocessed")
    after = rows(engine)
    assert after[f"{STUDY}.1"]["status"] == "failed" and after[f"{STUDY}.2"]["status"] == "queued"
    assert archive_path(spool, STUDY, f"{STUDY}.1").is_file()
    assert sorted(queued_tasks(redis_server.url)) == [contract.FINALIZE_STUDY, contract.PROCESS_INSTANCE]
    engine.dispose()


def test_requeue_with_a_pending_folder_it_cannot_list_exits_3(tmp_path, sqlite_url, redis_server, monkeypatch, capsys):
    """A pending/ that cannot be listed (not a folder here; a refused or stale one alike) read as empty."""
    upgrade(sqlite_url)
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / contract.SPOOL_PENDING).write_bytes(b"")
    redis_server.flush()
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("TRIAGE_BROKER_URL", redis_server.url)
    assert admin.main(["--database-url", sqlite_url, "requeue", "--older-than", "0"]) == 3
    assert "(NotADirectoryError): no pending file re-sent" in capsys.readouterr().err
