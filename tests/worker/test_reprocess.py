"""`pneumonia-admin reprocess`: failed or skipped instances analysed again from their archived copy."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from tests.dicom_gateway.helpers import free_port
from tests.worker.support import wait_for
from worker import admin, contract, db
from worker.migrate import upgrade
from worker.reprocess import Candidate, Outcome, Selection, _send_one, restore_to_pending, select_candidates
from worker.samples import make_cxr_dataset
from worker.spool import archive_path

STUDY = "1.2.826.0.1.3680043.8.498.1"
RECEIVED = dt.datetime(2026, 11, 1, 8, 0, 0)


def terminal_row(engine, sop: str, status: str, reason: str | None, *, study: str = STUDY,
                 accession: str = "ACC1") -> None:
    with engine.begin() as conn:
        db.finish_instance(conn, {"study_instance_uid": study, "sop_instance_uid": sop, "status": status,
                                  "reason": reason, "accession_number": accession, "received_at": RECEIVED,
                                  "finished_at": RECEIVED, "spool_relpath": contract.pending_relpath(study, sop)})
        db.touch_study(conn, study, accession, RECEIVED)


def archived(spool: Path, sop: str, study: str = STUDY) -> Path:
    path = archive_path(spool, study, sop)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"DICM")
    return path


@pytest.fixture
def spool_db(tmp_path, database_url, monkeypatch):
    """A migrated database with one final study: two failed rows (one without an archived copy), one skipped,
    one done; the spool holds the archived copies."""
    upgrade(database_url)
    engine = db.make_engine(database_url)
    spool = tmp_path / "spool"
    terminal_row(engine, f"{STUDY}.1", "failed", "internal error (ValueError)")
    terminal_row(engine, f"{STUDY}.2", "failed", "internal error (ValueError)")
    terminal_row(engine, f"{STUDY}.3", "skipped", "ViewPosition absent")
    terminal_row(engine, f"{STUDY}.4", "done", None)
    with engine.begin() as conn:
        db.finalize_study(conn, STUDY, RECEIVED)
    for sop in (f"{STUDY}.1", f"{STUDY}.3", f"{STUDY}.4"):
        archived(spool, sop)
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(spool))
    yield database_url, engine, spool
    engine.dispose()


def rows(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["sop_instance_uid"]: dict(r) for r in conn.execute(select(db.instances)).mappings()}


def test_dry_run_lists_what_would_be_analysed_again_and_changes_nothing(spool_db, capsys):
    url, engine, spool = spool_db
    before = rows(engine)
    assert admin.main(["--database-url", url, "reprocess", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"would reprocess {STUDY}.1 (study {STUDY}, failed: internal error (ValueError))",
        "would reprocess 1 of 2 failed instance(s)"]
    assert err == (f"not reprocessed: {STUDY}.2 (study {STUDY}): no archived copy (TRIAGE_SPOOL_RETENTION=delete, "
                   "or pruned by prune-archive)\n")
    assert rows(engine) == before
    assert archive_path(spool, STUDY, f"{STUDY}.1").is_file()
    assert not (spool / contract.SPOOL_PENDING).exists()


def test_the_selection_filters_by_status_reason_accession_and_time(spool_db):
    _, engine, _ = spool_db
    terminal_row(engine, "1.2.9.1", "failed", "processing exceeded the 120s time limit", study="1.2.9", accession="B")
    sops = lambda **kw: [c.sop_uid for c in select_candidates(engine, Selection(**kw))]  # noqa: E731
    assert sops() == [f"{STUDY}.1", f"{STUDY}.2", "1.2.9.1"]
    assert sops(status="skipped") == [f"{STUDY}.3"]
    assert sops(reason_contains="time limit") == ["1.2.9.1"]
    assert sops(reason_contains="%") == []  # a LIKE wildcard is matched as text
    assert sops(accession="B") == ["1.2.9.1"] and sops(study=STUDY, limit=1) == [f"{STUDY}.1"]
    assert sops(since=RECEIVED + dt.timedelta(seconds=1)) == [] and sops(until=RECEIVED + dt.timedelta(seconds=1))
    assert sops(sop=f"{STUDY}.2") == [f"{STUDY}.2"]


@pytest.mark.parametrize("status", ["done", "queued", "processing"])
def test_only_failed_or_skipped_rows_can_be_asked_for(sqlite_url, status, capsys):
    """A done result may have been read and acted on: re-scoring it could lower its study's flag."""
    with pytest.raises(SystemExit) as exit_:
        admin.main(["--database-url", sqlite_url, "reprocess", "--status", status])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_with_the_broker_down_nothing_changes(spool_db, monkeypatch, capsys):
    url, engine, spool = spool_db
    before = rows(engine)
    monkeypatch.setenv("TRIAGE_BROKER_URL", f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    assert admin.main(["--database-url", url, "reprocess", "--status", "skipped"]) == 3
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "s3cret" not in err
    assert err.startswith("pneumonia-admin reprocess: cannot send to the broker (OperationalError); 0 of 1")
    assert rows(engine) == before and archive_path(spool, STUDY, f"{STUDY}.3").is_file()


def test_reprocess_reopens_the_rows_and_the_study_and_queues_them(spool_db, redis_server, monkeypatch, capsys):
    url, engine, spool = spool_db
    redis_server.flush()
    monkeypatch.setenv("TRIAGE_BROKER_URL", redis_server.url)
    assert admin.main(["--database-url", url, "reprocess", "--status", "skipped"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"reprocessing {STUDY}.3 (study {STUDY}, was skipped)",
        "reprocessed 1 of 1 skipped instance(s) in 1 study(ies); each study is final again once its images are scored"]
    pending = spool / contract.pending_relpath(STUDY, f"{STUDY}.3")
    assert pending.is_file() and not archive_path(spool, STUDY, f"{STUDY}.3").exists()
    row = rows(engine)[f"{STUDY}.3"]
    assert (row["status"], row["attempts"], row["finished_at"], row["spool_relpath"]) == (
        "queued", 0, None, contract.pending_relpath(STUDY, f"{STUDY}.3"))
    assert row["reason"].endswith("(was skipped: ViewPosition absent)") and row["accession_number"] == "ACC1"
    with engine.connect() as conn:
        study = conn.execute(select(db.studies).where(db.studies.c.study_instance_uid == STUDY)).mappings().one()
    assert (study["final"], study["reopened_count"]) == (False, 1)
    messages = [json.loads(m) for m in redis.Redis.from_url(redis_server.url).lrange(contract.QUEUE, 0, -1)]
    sent = sorted((m["headers"]["task"], m["headers"]["argsrepr"]) for m in messages)
    assert sent == [(contract.FINALIZE_STUDY, repr((STUDY,))),
                    (contract.PROCESS_INSTANCE, repr((contract.pending_relpath(STUDY, f"{STUDY}.3"), f"{STUDY}.3")))]


def test_a_row_that_changed_meanwhile_is_left_alone_and_its_file_put_back(spool_db, capsys):
    """Selected as failed, but another delivery or a second reprocess got there first."""
    _, engine, spool = spool_db
    stale = Candidate(STUDY, f"{STUDY}.4", "failed", "old", RECEIVED, RECEIVED)  # the row is done

    class NoSend:
        def send_task(self, *args, **kwargs):
            raise AssertionError("nothing may be sent for a row that changed")

    before = rows(engine)
    assert _send_one(spool, engine, NoSend(), stale) is Outcome.SKIPPED
    assert rows(engine) == before and archive_path(spool, STUDY, f"{STUDY}.4").is_file()
    assert not (spool / contract.pending_relpath(STUDY, f"{STUDY}.4")).exists()
    assert "its row changed meanwhile" in capsys.readouterr().err


def test_a_skipped_image_is_scored_by_a_real_worker_once_the_policy_lets_it_through(make_triage_env, database_url,
                                                                                   test_split):
    """The use: a modality sent frontals without ViewPosition, skipped under the default policy; the site
    sets TRIAGE_MISSING_TAG_POLICY=process and reprocesses them. The study, final before, is reopened, its
    image scored and the study final again, with the flag a reader may have seen kept."""
    images, labels = test_split
    env = make_triage_env(database_url)
    tagged = make_cxr_dataset(images[int(labels.argmin())], size=(256, 256), sop_uid=f"{STUDY}.1",
                              study_uid=STUDY)
    untagged = make_cxr_dataset(images[int(labels.argmax())], size=(256, 256), sop_uid=f"{STUDY}.2",
                                study_uid=STUDY, view=None, instance_number=2)
    staged = [env.stage(tagged), env.stage(untagged)]
    env.start_worker()
    for relpath, sop in staged:
        env.send(relpath, sop)
    first = env.wait_terminal([f"{STUDY}.1", f"{STUDY}.2"])
    assert first[f"{STUDY}.2"]["status"] == "skipped"
    env.finalize(STUDY)
    before = wait_for(lambda: (s := env.study(STUDY)) and s["final"] and s, 60, what="study final")
    env.workers[-1].stop()

    env.extra_env["TRIAGE_MISSING_TAG_POLICY"] = "process"
    env.start_worker()
    cli = [sys.executable, "-m", "worker.admin", "reprocess", "--status", "skipped", "--study", STUDY]
    done = subprocess.run(cli, env=env.env(), cwd=env.workdir, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("reprocessed 1 of 1 skipped instance(s) in 1 study(ies)")

    after = wait_for(lambda: (s := env.study(STUDY)) and s["final"] and s["n_done"] == 2 and s, 90,
                     what="study final again with both images scored")
    row = env.rows()[f"{STUDY}.2"]
    assert (row["status"], row["attempts"], row["reason"]) == (
        "done", 1, "scored as a frontal chest without ViewPosition (TRIAGE_MISSING_TAG_POLICY=process)")
    assert row["probability"] is not None
    assert (after["reopened_count"], after["flag_before_reopen"]) == (1, before["flag"])
    assert after["max_probability"] >= max(before["max_probability"], row["probability"]) - 1e-9
    archived_copy = archive_path(env.spool, STUDY, f"{STUDY}.2")
    received = row["received_at"].replace(tzinfo=dt.timezone.utc).timestamp()
    assert archived_copy.stat().st_mtime == received  # prune-archive counts from the receive time, not the reprocess
    assert list((env.spool / contract.SPOOL_PENDING).glob("*/*.dcm")) == []


def test_the_newest_copy_is_analysed_again_when_the_image_was_re_sent(spool_db, redis_server, monkeypatch):
    """A PACS re-sending the image with the missing tag added gets a copy archived beside the first
    (`<SOP>.dup-*.dcm`, not re-evaluated): that corrected copy is the one to analyse, not the first."""
    import os

    url, engine, spool = spool_db
    first = archive_path(spool, STUDY, f"{STUDY}.3")
    resent = first.with_name(f"{STUDY}.3.dup-77-1800000000000000000.dcm")
    resent.write_bytes(b"DICM corrected")  # archived after the first ...
    os.utime(resent, (1_700_000_000, 1_700_000_000))  # ... though dated earlier: the worker dates copies by receipt
    redis_server.flush()
    monkeypatch.setenv("TRIAGE_BROKER_URL", redis_server.url)
    assert admin.main(["--database-url", url, "reprocess", "--status", "skipped"]) == 0
    assert (spool / contract.pending_relpath(STUDY, f"{STUDY}.3")).read_bytes() == b"DICM corrected"
    assert first.read_bytes() == b"DICM" and not resent.exists()


class NoSend:
    def send_task(self, *args, **kwargs):
        raise AssertionError("nothing may be sent for this instance")


def test_a_re_send_stored_after_the_selection_is_never_overwritten_by_the_old_copy(spool_db, capsys):
    """The gateway stored a corrected re-send while a batch ran: the old archived copy was renamed over it,
    the instance analysed from the old copy again, and the acknowledged re-send was gone from the spool."""
    _, engine, spool = spool_db
    candidate = select_candidates(engine, Selection(status="skipped"))[0]
    pending = spool / contract.pending_relpath(STUDY, candidate.sop_uid)
    pending.parent.mkdir(parents=True)
    pending.write_bytes(b"DICM corrected re-send")  # stored by the gateway after the selection
    before = rows(engine)
    assert _send_one(spool, engine, NoSend(), candidate) is Outcome.SKIPPED
    assert "a copy of it is pending already" in capsys.readouterr().err
    with pytest.raises(FileExistsError):  # and should it come between that look and the move
        restore_to_pending(spool, candidate, archive_path(spool, STUDY, candidate.sop_uid))
    assert pending.read_bytes() == b"DICM corrected re-send" and archive_path(spool, STUDY, candidate.sop_uid).is_file()
    assert rows(engine) == before


def test_a_row_reprocessed_by_another_run_meanwhile_is_not_opened_again(spool_db, capsys):
    """Another run reprocessed the instance and it ended skipped again: the status alone matched, so this run
    opened the row once more with no file left to analyse (failed, "spool file missing")."""
    _, engine, spool = spool_db
    candidate = select_candidates(engine, Selection(status="skipped"))[0]
    terminal_row(engine, f"{STUDY}.3", "queued", None)  # the other run's reprocessing ...
    with engine.begin() as conn:  # ... which ended skipped again, later
        conn.execute(db.instances.update().where(db.instances.c.sop_instance_uid == f"{STUDY}.3")
                     .values(status="skipped", finished_at=RECEIVED + dt.timedelta(hours=1)))
    assert _send_one(spool, engine, NoSend(), candidate) is Outcome.SKIPPED
    assert "its row changed meanwhile" in capsys.readouterr().err
    assert rows(engine)[f"{STUDY}.3"]["status"] == "skipped"
    assert archive_path(spool, STUDY, f"{STUDY}.3").is_file()
    assert not (spool / contract.pending_relpath(STUDY, f"{STUDY}.3")).exists()


def test_stats_says_unknown_when_the_spool_cannot_be_read(spool_db, monkeypatch):
    """A pending/ this user cannot list was a PermissionError traceback from `stats` and `show`."""
    url, _, spool = spool_db
    (spool / contract.SPOOL_PENDING).write_bytes(b"")  # not a folder: listing it fails as a refused one does
    stats = json.loads(admin_out(url, "stats", "--format", "json"))
    assert stats["waiting_in_spool"] is None and stats["outstanding"] == 0
    assert json.loads(admin_out(url, "show", STUDY, "--format", "json"))["waiting_in_spool"] is None


def admin_out(url: str, *args: str) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert admin.main(["--database-url", url, *args]) == 0
    return out.getvalue()


def test_a_re_send_archived_between_the_move_and_the_reopening_is_the_copy_analysed(spool_db, monkeypatch):
    """A re-send replaced the restored copy in pending/ and a worker, seeing the row still skipped, archived it
    as a duplicate; the row was then reopened for a file no longer there ("spool file missing", the original
    copy gone). Now the newest copy, that re-send, is restored again once the row is open."""
    import worker.reprocess as reprocess_module

    _, engine, spool = spool_db
    candidate = select_candidates(engine, Selection(status="skipped"))[0]
    pending = spool / contract.pending_relpath(STUDY, candidate.sop_uid)
    real_reopen = reprocess_module.reopen_row

    def resend_then_reopen(*args, **kwargs):
        pending.write_bytes(b"DICM corrected re-send")  # the gateway replaced it ...
        pending.rename(pending.parent.parent.parent / "archive" / STUDY / f"{candidate.sop_uid}.dup-9-9.dcm")  # a worker
        return real_reopen(*args, **kwargs)

    monkeypatch.setattr(reprocess_module, "reopen_row", resend_then_reopen)

    class Recorder:
        sent: list = []

        def send_task(self, *args, **kwargs):
            self.sent.append(args)

    assert _send_one(spool, engine, Recorder(), candidate) is Outcome.SENT
    assert pending.read_bytes() == b"DICM corrected re-send" and rows(engine)[candidate.sop_uid]["status"] == "queued"
    assert Recorder.sent == [(contract.PROCESS_INSTANCE,)]


def test_a_copy_put_back_keeps_its_receive_date(spool_db):
    """Step 1 dates the restored copy now; put back after "row changed", it kept that date, and prune-archive
    kept the image past its retention."""
    _, engine, spool = spool_db
    stale = Candidate(STUDY, f"{STUDY}.4", "failed", "old", RECEIVED, RECEIVED)  # the row is done
    assert _send_one(spool, engine, NoSend(), stale) is Outcome.SKIPPED
    received = RECEIVED.replace(tzinfo=dt.timezone.utc).timestamp()
    assert archive_path(spool, STUDY, f"{STUDY}.4").stat().st_mtime == received


def test_stats_measures_a_reprocessed_image_from_its_reprocessing_not_its_first_arrival(spool_db, redis_server,
                                                                                         monkeypatch):
    """An image received weeks ago and reprocessed today put weeks into the window's latency p99 and max: the
    admin read a worker weeks behind. It is measured from the reprocess request and counted apart."""
    url, engine, spool = spool_db
    redis_server.flush()
    monkeypatch.setenv("TRIAGE_BROKER_URL", redis_server.url)
    assert admin.main(["--database-url", url, "reprocess", "--status", "skipped"]) == 0
    requeued_at = rows(engine)[f"{STUDY}.3"]["requeued_at"]
    assert requeued_at is not None and abs((db.utcnow() - requeued_at).total_seconds()) < 60
    with engine.begin() as conn:  # what a worker writes when it has scored the image
        db.finish_instance(conn, {"study_instance_uid": STUDY, "sop_instance_uid": f"{STUDY}.3", "status": "done",
                                  "received_at": RECEIVED, "finished_at": requeued_at + dt.timedelta(seconds=2),
                                  "stratum": "likely_normal", "flag": "ROUTINE", "severity": 0, "probability": 0.1})
    with engine.connect() as conn:
        stats = admin.compute_stats(conn, window_hours=24)
    assert stats["finished"] == 1 and stats["reprocessed"] == 1
    assert stats["latency_s"]["max"] == pytest.approx(2.0, abs=0.01)
    assert rows(engine)[f"{STUDY}.3"]["requeued_at"] == requeued_at  # the result keeps the fact of the reprocessing


def test_a_stale_delivery_leaves_a_copy_that_reprocess_restored_while_it_ran(spool_db, monkeypatch):
    """A stale message (an earlier re-send's) read the row still skipped; `reprocess` then restored the copy and
    reopened the row; the stale delivery archived the restored copy as a duplicate of a stored result, and the
    reprocess's own delivery failed the image "spool file missing". The archiving now re-checks the row under
    its lock: a row reopened meanwhile keeps its file in pending/ for its own delivery."""
    from worker import tasks
    from worker.config import WorkerSettings

    url, engine, spool = spool_db
    candidate = select_candidates(engine, Selection(status="skipped"))[0]
    pending = spool / contract.pending_relpath(STUDY, candidate.sop_uid)
    rt = tasks.Runtime(WorkerSettings(database_url=url, spool_dir=spool))
    real_compare = tasks._compare_with_first

    class Recorder:
        def send_task(self, *args, **kwargs):
            pass

    def reprocess_meanwhile(*args, **kwargs):  # after the stale delivery's read of the row, before its archiving
        assert _send_one(spool, engine, Recorder(), candidate) is Outcome.SENT
        return real_compare(*args, **kwargs)

    monkeypatch.setattr(tasks, "_compare_with_first", reprocess_meanwhile)
    stale = tasks.process_instance(rt, contract.pending_relpath(STUDY, candidate.sop_uid), candidate.sop_uid,
                                   RECEIVED.isoformat())
    assert stale["noop"] and rows(engine)[candidate.sop_uid]["status"] == "queued"
    assert pending.read_bytes() == b"DICM"  # there for the reprocess's own delivery
    rt.engine.dispose()


def test_a_reprocess_undone_for_want_of_a_copy_leaves_no_reprocess_time(spool_db, monkeypatch):
    """The restored copy was taken and no copy was left: the row went back to what it was, but kept the
    reprocess time, and `stats` counted it reprocessed with a negative latency (its old finish before it)."""
    import worker.reprocess as reprocess_module

    _, engine, spool = spool_db
    candidate = select_candidates(engine, Selection(status="skipped"))[0]
    pending = spool / contract.pending_relpath(STUDY, candidate.sop_uid)
    real_reopen = reprocess_module.reopen_row

    def taken_then_reopen(*args, **kwargs):
        pending.unlink()  # the restored copy gone (deleted by hand, say), no other copy archived
        return real_reopen(*args, **kwargs)

    monkeypatch.setattr(reprocess_module, "reopen_row", taken_then_reopen)

    class Recorder:
        def send_task(self, *args, **kwargs):
            raise AssertionError("nothing is sent for a row put back")

    assert _send_one(spool, engine, Recorder(), candidate) is Outcome.SKIPPED
    row = rows(engine)[candidate.sop_uid]
    assert (row["status"], row["finished_at"], row["requeued_at"]) == ("skipped", RECEIVED, None)
    with engine.connect() as conn:
        stats = admin.compute_stats(conn, window_hours=24 * 365 * 10)
    assert stats["reprocessed"] == 0 and stats["latency_s"]["p50"] >= 0
