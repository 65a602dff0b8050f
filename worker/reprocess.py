"""`pneumonia-admin reprocess`: analyse failed or skipped instances again from their archived copy.

Why: a failed or skipped row is final, and every later delivery of the instance is a no-op (the
first result wins, `worker.db`). After the cause is fixed (a decoder bug, a time limit raised, a
modality's missing ViewPosition accepted with `TRIAGE_MISSING_TAG_POLICY=process`), a PACS would have
to re-send the study under new UIDs to get it scored. This puts each archived copy back in the spool,
opens its row again and queues it, as the gateway does for a new image.

Only `failed` and `skipped` rows: a study's flag never goes down (`db.touch_study`), so scoring them
can only add to what the worklist shows. A `done` result may already have been read and acted on, and
a new one could lower the study's flag; re-scoring those belongs to a new model's rollout, not here.

Order per instance, each step safe to interrupt:
  1. archive/<Study>/<SOP>.dcm (or its newest re-sent copy) -> pending/<Study>/<SOP>.dcm, dated now. Stopped here, the
     row is still terminal: the gateway's sweep re-sends the file and the worker archives it again.
  2. The row, still in its old status, goes back to `queued` (attempts and results cleared, the old
     status and reason kept in its reason) and its study, if final, is reopened. Stopped here, the
     file waits in pending/ for the sweep (or `requeue`), as any image whose message was lost.
  3. `process_instance` is sent; then each study's `finalize_study`, which waits for its images.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from worker import contract, db
from worker.config import WorkerSettings
from worker.spool import newest_archived_copy, valid_uid

REPROCESSABLE = ("failed", "skipped")


class Outcome(enum.Enum):
    """What became of one instance. A file error makes the command exit 3 after the batch: exit 0 read as
    done to a script, while every copy may have stayed put (run as the wrong user, say)."""

    SENT = "sent"
    SKIPPED = "skipped"  # not now, for a reason said on stderr: a re-send pending, a row changed meanwhile
    FILE_ERROR = "file error"  # its archived copy could not be moved to pending/


@dataclass(frozen=True)
class Selection:
    """Which terminal rows to analyse again (every filter optional; all given must match)."""

    status: str = "failed"
    study: str | None = None
    accession: str | None = None
    sop: str | None = None
    reason_contains: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    limit: int | None = None


@dataclass(frozen=True)
class Candidate:
    study_uid: str
    sop_uid: str
    status: str
    reason: str | None
    received_at: dt.datetime | None
    finished_at: dt.datetime | None
    requeued_at: dt.datetime | None = None  # an earlier reprocess's, put back should this one be undone


def select_candidates(engine: Engine, selection: Selection) -> list[Candidate]:
    """The rows `selection` names, oldest arrival first (status is indexed with finished_at)."""
    t = db.instances.c
    query = select(t.study_instance_uid, t.sop_instance_uid, t.status, t.reason, t.received_at, t.finished_at,
                   t.requeued_at).where(t.status == selection.status)
    if selection.study:
        query = query.where(t.study_instance_uid == selection.study)
    if selection.accession:
        query = query.where(t.accession_number == selection.accession)
    if selection.sop:
        query = query.where(t.sop_instance_uid == selection.sop)
    if selection.reason_contains:
        query = query.where(_contains(engine, t.reason, selection.reason_contains))
    if selection.since:
        query = query.where(t.received_at >= selection.since)
    if selection.until:
        query = query.where(t.received_at < selection.until)
    query = query.order_by(t.received_at, t.study_instance_uid, t.sop_instance_uid).limit(selection.limit)
    with engine.connect() as conn:
        return [Candidate(*row) for row in conn.execute(query).all()]


def _contains(engine: Engine, column: Any, text: str) -> Any:
    """`column` holds `text`, in the case given, on both backends. Why not LIKE alone: SQLite's LIKE ignores
    the case of ASCII letters, PostgreSQL's does not, so `--reason-contains viewposition` selected rows on
    SQLite that it did not on PostgreSQL. instr() is SQLite's case-sensitive substring search."""
    if engine.dialect.name == "sqlite":
        return func.instr(column, text) > 0
    return column.contains(text, autoescape=True)


def obstacle(spool_dir: Path, candidate: Candidate) -> str | None:
    """Why this instance cannot be analysed again, or None. Its archived copy is the only image of it
    the worker kept: with retention `delete`, after `prune-archive`, or for a row without a study
    folder (a spool path that named none) there is nothing to analyse."""
    if not (valid_uid(candidate.study_uid) and valid_uid(candidate.sop_uid)):
        return "its row names no study folder of the spool"
    if (spool_dir / contract.pending_relpath(candidate.study_uid, candidate.sop_uid)).exists():
        return "a copy of it is pending already (a re-send being processed)"
    if newest_copy(spool_dir, candidate) is None:
        return "no archived copy (TRIAGE_SPOOL_RETENTION=delete, or pruned by prune-archive)"
    return None


def newest_copy(spool_dir: Path, candidate: Candidate) -> Path | None:
    """The copy archived last (`spool.newest_archived_copy`): the one the sender means, analysed again."""
    try:
        return newest_archived_copy(spool_dir, candidate.study_uid, candidate.sop_uid)
    except OSError:  # unreadable here: not a copy to analyse (as before the helper moved to worker.spool)
        return None


def restore_to_pending(spool_dir: Path, candidate: Candidate, copy: Path) -> str:
    """Step 1: move `copy` back to pending/ and date it now, so that the gateway's sweep gives the worker its
    grace period before re-sending it (the worker dates the archived copy by its receive time again when it
    retires it, for `prune-archive`). Returns its relpath. The move never replaces a file: a link, then the
    old name removed, so a copy the gateway stored or another run restored since the selection raises
    `FileExistsError` and stays (a rename overwrote a corrected re-send with the old copy)."""
    relpath = contract.pending_relpath(candidate.study_uid, candidate.sop_uid)
    target = spool_dir / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    os.link(copy, target)
    os.unlink(copy)
    os.utime(target)
    return relpath


def put_back(spool_dir: Path, candidate: Candidate, copy: Path) -> None:
    """Undo step 1 for a row that changed meanwhile (it is no longer the terminal row selected), dated by
    its receive time again (step 1 dated it now, and `prune-archive` would have kept it past its time).
    Should `copy`'s name be taken again, the file stays in pending/: the sweep sends it, and the worker
    archives it beside the first as a duplicate of a stored result."""
    source = spool_dir / contract.pending_relpath(candidate.study_uid, candidate.sop_uid)
    try:
        os.link(source, copy)
    except FileExistsError:
        return
    os.unlink(source)
    if candidate.received_at is not None:
        stamp = candidate.received_at.replace(tzinfo=dt.timezone.utc).timestamp()
        os.utime(copy, (stamp, stamp))


def reopen_row(engine: Engine, candidate: Candidate, relpath: str, now: dt.datetime) -> bool:
    """Step 2 in one transaction: the row back to `queued` and its study, if final, reopened. False
    when the row is no longer the one selected (its status and finish time), e.g. another run reprocessed
    it meanwhile, even should that have ended in the same status."""
    note = f"reprocessing requested {now.isoformat(timespec='seconds')}Z (was {candidate.status}: {candidate.reason})"
    with engine.begin() as conn:
        if not db.requeue_terminal_instance(conn, candidate.study_uid, candidate.sop_uid, candidate.status,
                                            candidate.finished_at, relpath, note[:1000], now):
            return False
        db.reopen_study(conn, candidate.study_uid)
    return True


def reprocess(settings: WorkerSettings, engine: Engine, selection: Selection, dry_run: bool,
              client_factory: Any) -> int:
    """Analyse the selected rows again; print what was done. Exit 0, or 3 when the broker does not answer
    (checked before anything changes; one that fails midway leaves the rest to `requeue`) or the spool has no
    archive/ here (TRIAGE_SPOOL_DIR unset or another host's, a mount not up: the gateway makes it at start), and
    3 after the batch when an archived copy could not be moved (the others are reprocessed)."""
    spool_dir = Path(settings.spool_dir)
    archive = spool_dir / contract.SPOOL_ARCHIVE
    if not archive.is_dir():  # every instance read "no archived copy (... pruned)", exit 0, as if the images were gone
        print(f"pneumonia-admin reprocess: no spool with an {contract.SPOOL_ARCHIVE}/ folder in "
              f"{archive.parent.absolute()}: run it where TRIAGE_SPOOL_DIR names the gateway's spool (nothing changed)",
              file=sys.stderr)
        return 3
    candidates = select_candidates(engine, selection)
    blocked = [(c, why) for c in candidates if (why := obstacle(spool_dir, c))]
    ready = [c for c in candidates if c not in {b for b, _ in blocked}]
    for candidate, why in blocked:
        print(f"not reprocessed: {candidate.sop_uid} (study {candidate.study_uid}): {why}", file=sys.stderr)
    if dry_run:
        for candidate in ready:
            print(f"would reprocess {candidate.sop_uid} (study {candidate.study_uid}, {candidate.status}: "
                  f"{candidate.reason})")
        print(f"would reprocess {len(ready)} of {len(candidates)} {selection.status} instance(s)")
        return 0
    if not ready:
        print(f"reprocessed 0 of {len(candidates)} {selection.status} instance(s)")
        return 0
    return _send_all(spool_dir, engine, ready, len(candidates), selection.status, client_factory)


def _send_all(spool_dir: Path, engine: Engine, ready: list[Candidate], selected: int, status: str,
              client_factory: Any) -> int:
    from kombu.exceptions import OperationalError as BrokerError

    client = client_factory()
    studies: dict[str, None] = {}  # the studies sent to, in order
    sent, unmoved = 0, 0
    try:
        with client.connection_for_write() as conn:  # before any change: a broker down changes nothing
            conn.ensure_connection(max_retries=1)
        for candidate in ready:
            outcome = _send_one(spool_dir, engine, client, candidate)
            if outcome is Outcome.SENT:
                sent += 1
                print(f"reprocessing {candidate.sop_uid} (study {candidate.study_uid}, was {status})")
                studies[candidate.study_uid] = None
            unmoved += outcome is Outcome.FILE_ERROR
        for study_uid in studies:
            client.send_task(contract.FINALIZE_STUDY, args=(study_uid,),
                             kwargs={"last_received_at": _latest_received(engine, study_uid)}, queue=contract.QUEUE)
    except (BrokerError, OSError) as exc:
        print(f"pneumonia-admin reprocess: cannot send to the broker ({type(exc).__name__}); {sent} of {len(ready)} "
              "instance(s) sent; any opened but unsent waits in pending/ for the gateway's sweep or "
              "`pneumonia-admin requeue --older-than 0`", file=sys.stderr)
        return 3
    finally:
        client.close()
    print(f"reprocessed {sent} of {selected} {status} instance(s) in {len(studies)} study(ies); "
          "each study is final again once its images are scored")
    if unmoved:
        print(f"pneumonia-admin reprocess: {unmoved} instance(s) not reprocessed: their archived copy could not be "
              "moved (above); run it again, as the spool's owner, once that is fixed", file=sys.stderr)
        return 3
    return 0


def _send_one(spool_dir: Path, engine: Engine, client: Any, candidate: Candidate) -> Outcome:
    """Steps 1-3 for one instance; when it cannot be done now, why is said on stderr."""
    restored = _restore_and_reopen(spool_dir, engine, candidate)
    if restored.relpath is None:
        print(f"not reprocessed: {candidate.sop_uid} (study {candidate.study_uid}): {restored.why}", file=sys.stderr)
        return Outcome.FILE_ERROR if restored.file_error else Outcome.SKIPPED
    received = candidate.received_at or db.utcnow()
    client.send_task(contract.PROCESS_INSTANCE, args=(restored.relpath, candidate.sop_uid),
                     kwargs={"received_at": received.replace(tzinfo=dt.timezone.utc).isoformat()},
                     queue=contract.QUEUE)
    return Outcome.SENT


@dataclass(frozen=True)
class Restored:
    """Steps 1 and 2 of one instance: its pending relpath when done, else why not."""

    relpath: str | None
    why: str = ""
    file_error: bool = False


def _restore_and_reopen(spool_dir: Path, engine: Engine, candidate: Candidate) -> Restored:
    """Steps 1 and 2. The obstacles are looked at again here: a batch runs for a while, and a re-send or
    another run may have come since the selection. A file-system error is this instance's, not the batch's."""
    why = obstacle(spool_dir, candidate)
    copy = newest_copy(spool_dir, candidate) if why is None else None
    if copy is None:
        return Restored(None, why or "its archived copy is gone")
    try:
        relpath = restore_to_pending(spool_dir, candidate, copy)
    except FileExistsError:
        return Restored(None, "a copy of it is pending already (a re-send being processed)")
    except OSError as exc:
        return Restored(None, f"its archived copy could not be moved to pending/ ({type(exc).__name__})", file_error=True)
    if not reopen_row(engine, candidate, relpath, db.utcnow()):
        put_back(spool_dir, candidate, copy)
        return Restored(None, "its row changed meanwhile")
    if not (spool_dir / relpath).exists():
        return _after_a_resend(spool_dir, engine, candidate, relpath)
    return Restored(relpath)


def _after_a_resend(spool_dir: Path, engine: Engine, candidate: Candidate, relpath: str) -> Restored:
    """The restored copy left pending/ before its row was reopened: a re-send replaced it there and a worker,
    seeing the row still terminal, archived it as a duplicate. The row is open now, so the newest copy (that
    re-send) is restored again and analysed; were there none left, the row goes back to what it was rather
    than wait, queued, for a file that will never come."""
    copy = newest_copy(spool_dir, candidate)
    try:
        if copy is not None:
            return Restored(restore_to_pending(spool_dir, candidate, copy))
    except FileExistsError:  # yet another re-send, pending: the gateway has sent it, the worker takes it
        return Restored(relpath)
    except OSError:
        pass
    with engine.begin() as conn:
        db.finish_instance(conn, {"study_instance_uid": candidate.study_uid, "sop_instance_uid": candidate.sop_uid,
                                  "status": candidate.status, "reason": candidate.reason,
                                  "finished_at": candidate.finished_at, "requeued_at": candidate.requeued_at})
    return Restored(None, "its copy was replaced and taken while it was being restored; the row is as it was")


def _latest_received(engine: Engine, study_uid: str) -> str | None:
    """The study's last arrival, for its finalize (the gateway sends the same)."""
    with engine.connect() as conn:
        last = conn.execute(select(db.studies.c.last_received_at)
                            .where(db.studies.c.study_instance_uid == study_uid)).scalar()
    return last.replace(tzinfo=dt.timezone.utc).isoformat() if last else None
