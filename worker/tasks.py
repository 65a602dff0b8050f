"""Task bodies: exactly one terminal row per instance, whatever is delivered how often.

An instance is (Study Instance UID, SOP Instance UID), the study read from the spool path
`pending/<StudyUID>/<SOPUID>.dcm` (the gateway files each object under its own study): the same
SOP UID arriving in another study is another instance, scored and flagged in that study.

Protocol per delivery:
  1. a terminal row exists            -> no-op (re-archive the file if a crash left it).
     a claimed row re-sent after Celery killed its delivery at the hard time limit -> failed, reason.
  2. the model is loadable, else raise (retried; nothing claimed, so an outage costs no attempts).
  3. claim the row as `processing`    -> attempts += 1; too many worker-lost attempts -> failed.
  4. analyse the file                 -> done / skipped / failed with reason.
  5. terminal upsert (first one wins), then archive the spool file.
Database and broker errors propagate to the Celery wrapper, which retries with backoff.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import stat
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, IntegrityError

from models.errors import ImageAccessError
from worker import db
from worker.config import WorkerSettings
from worker.contract import SPOOL_PENDING, quiet_pydicom
from worker.pipeline import (DetectorCache, Outcome, analyse_file, header_differences, header_identifiers,
                             pixel_data_digest)
from worker.spool import (SpoolPathError, archive_path, resolve_pending, retire, study_uid_from_relpath,
                          valid_uid)

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Per-process resources, created lazily after the prefork fork."""

    settings: WorkerSettings
    _engine: Engine | None = None
    detectors: DetectorCache | None = None

    def __post_init__(self) -> None:
        self.detectors = DetectorCache(self.settings)
        quiet_pydicom()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = db.make_engine(self.settings.database_url)
        return self._engine

    def after_fork(self) -> None:
        """Drop connections inherited from the parent; warm the model so task 1 is not slow."""
        if self._engine is not None:
            self._engine.dispose(close=False)
        self._engine = None
        self.detectors = DetectorCache(self.settings)
        self.detectors.get()


class ClaimedDeliveryError(Exception):
    """A delivery failed after it claimed its row (the database went away while storing, say).

    The Celery wrapper retries `cause` if it is transient and counts that retry in the task's
    `retries_after_claim` and, while the database answers, on the row (`db.credit_failed_claim`):
    neither is a lost delivery (`db.lost_deliveries`). A retry before any claim
    (model not deployed yet, database down at the first read) claimed nothing and must not raise
    the poison-message limit for the deliveries that follow.
    """

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"after the claim: {type(cause).__name__}")
        self.cause = cause


class StudyNotSettledError(Exception):
    """Images of the study still wait in pending/ without a result, so the study cannot be final yet."""


def process_instance(
    rt: Runtime, relpath: str, sop_uid: str, received_at: str | None, retries_after_claim: int = 0,
    hard_time_limit_s: int | None = None,
) -> dict[str, Any]:
    """Run one delivery of `triage.process_instance` (see module docstring).

    `retries_after_claim` (transient failures after a claim, each retried by Celery) and the row's
    `transient_claims` (the same, counted on the row while the database answered) keep database
    blips after a claim from making an instance look like a poison message (`db.lost_deliveries`);
    any failure after the claim is raised as `ClaimedDeliveryError` so that the wrapper can count it.
    `hard_time_limit_s` marks the message Celery's main process re-sends after it killed the pool
    process that ran this instance past the hard time limit (`celery_app.ProcessInstanceTask`).
    """
    received = db.parse_timestamp(received_at) or db.utcnow()
    if not sop_uid or len(sop_uid) > 64:
        # Cannot be a row key; the gateway validates UIDs, so this is a contract breach worth an error.
        log.error("rejected task with invalid SOP Instance UID (length %d) for %s", len(sop_uid or ""), relpath[:120])
        return {"sop_instance_uid": sop_uid, "status": "rejected", "noop": True}
    study_uid = study_uid_from_relpath(relpath) or ""
    with rt.engine.begin() as conn:
        existing = db.get_instance(conn, study_uid, sop_uid)
    if existing is not None and existing["status"] in db.TERMINAL:
        _retire_quietly(rt, relpath, study_uid, sop_uid, existing["status"], existing.get("received_at"))
        return {"sop_instance_uid": sop_uid, "status": existing["status"], "noop": True}
    try:
        path = resolve_pending(rt.settings.spool_dir, relpath)
        if not study_uid:  # the instance's identity is its study folder and its SOP UID
            raise SpoolPathError("spool path is not pending/<StudyInstanceUID>/<SOPInstanceUID>.dcm")
    except SpoolPathError as exc:
        return _finish(rt, sop_uid, relpath, received, time.time(), Outcome("failed", str(exc)), None)
    if hard_time_limit_s and existing is not None and existing["status"] == "processing":
        return _finish(rt, sop_uid, relpath, received, time.time() - hard_time_limit_s,
                       hard_time_limit_outcome(path, hard_time_limit_s), path)
    _require_model(rt)
    started = time.time()
    base = {
        "sop_instance_uid": sop_uid,
        "study_instance_uid": study_uid,
        "spool_relpath": relpath[:300],
        "received_at": received,
        "started_at": db.utcnow(),
    }
    with rt.engine.begin() as conn:
        claimed = db.claim_instance(conn, base)
        # an image's first claim after its study was finalised: the study is not final until it is scored
        if claimed is not None and claimed["attempts"] == 1 and db.reopen_study(conn, study_uid):
            log.info("study %s reopened: instance %s arrived after it was final", study_uid, sop_uid)
    if claimed is None:
        return {"sop_instance_uid": sop_uid, "status": "terminal", "noop": True}
    try:
        scored = file_identity(path)
        outcome = _analyse(rt, path, db.lost_deliveries(claimed, retries_after_claim), claimed.get("transient_claims") or 0)
        return _finish(rt, sop_uid, relpath, received, started, outcome, path, scored=scored)
    except Exception as exc:
        raise ClaimedDeliveryError(exc) from exc


def hard_time_limit_outcome(path: Path, seconds: int) -> Outcome:
    """The result of a delivery that Celery killed at the hard time limit, recorded at once.

    The pool process was past the soft limit too, whose exception cannot interrupt native code (a
    decoder stuck in C), so sending the file again would most likely stall and kill another pool process;
    a soft time limit fails the instance at once too. Before, the row stayed `processing` until the
    gateway's sweep had re-sent the file `TRIAGE_MAX_ATTEMPTS` times (about 1.5 h with the defaults) and
    its study could not go final. Only a claimed row is failed this way: a delivery killed before it
    claimed the instance spent its time elsewhere (the database, the model), and is processed again."""
    reason = f"processing exceeded the {seconds}s hard time limit (its worker process was killed)"
    return Outcome("failed", reason, _identifiers_that_fit(header_identifiers(path)))


def credit_failed_claim(rt: Runtime, relpath: str, sop_uid: str) -> None:
    """Best effort, before Celery retries a delivery that failed after its claim: count that claim as
    transient on the row (`db.credit_failed_claim`). When the database does not answer (often why
    the delivery failed), the retry's `retries_after_claim` still counts it within its own message."""
    study_uid = study_uid_from_relpath(relpath)
    if not study_uid:
        return
    try:
        with rt.engine.begin() as conn:
            db.credit_failed_claim(conn, study_uid, sop_uid)
    except Exception as exc:  # the message's own count stands in for it
        log.debug("transient claim of %s not counted on its row (%s)", sop_uid, type(exc).__name__)


def _require_model(rt: Runtime) -> None:
    """Raise a deployment problem (model missing or not matching its card, a required GPU absent)
    before the row is claimed. Each claim counts a delivery; were the claim first, an outage longer
    than Celery's retries would leave attempts that later read as worker-lost deliveries, and the
    sweep's next delivery would fail the instance as abandoned once the model was back.
    No image has been read yet, so any load failure (an unreadable file, a stale network mount,
    onnxruntime's own errors) is the deployment's and is retried, never recorded as the image's."""
    try:
        rt.detectors.get()  # type: ignore[union-attr]
    except Exception as exc:
        if is_model_problem(exc):
            raise
        raise ModelUnavailableError(f"the model could not be loaded ({type(exc).__name__})") from exc


def _analyse(rt: Runtime, path: Path, attempts: int, transient_claims: int = 0) -> Outcome:
    """`_outcome`, where a failure that never read the file's identifiers (deliveries abandoned, a
    time limit, a bug) gets those its header holds: without its accession number a failure cannot
    be found from the worklist (`list --accession`)."""
    outcome = _outcome(rt, path, attempts, transient_claims)
    if outcome.status != "failed" or outcome.fields:
        return outcome
    return Outcome(outcome.status, outcome.reason, _identifiers_that_fit(header_identifiers(path)))


def _outcome(rt: Runtime, path: Path, attempts: int, transient_claims: int = 0) -> Outcome:
    """Input problems, time limits and unexpected bugs all end in a recorded outcome.

    Transient failures after a claim are retried, but not without end: as many as
    `max_attempts` whole retry chains (a file the host never manages to read, a bad sector) fail
    the instance, so its study can still be finalised; a database that refuses results that long
    cannot record this either, and the next delivery after it recovers does."""
    if attempts > rt.settings.max_attempts:
        return Outcome("failed", f"abandoned after {attempts - 1} deliveries that did not finish "
                                 "(worker lost or hard time limit exceeded)")
    if transient_claims >= rt.settings.max_attempts * (rt.settings.max_retries + 1):
        return Outcome("failed", f"abandoned after {transient_claims} deliveries that failed transiently "
                                 "(unreadable file or storage error that did not clear)")
    if not spool_file_exists(path):
        require_pending_area(rt.settings.spool_dir)  # no spool at all is the host's problem, not this file's
        return Outcome("failed", "spool file missing and no earlier result exists")
    try:
        return analyse_file(path, rt.settings, rt.detectors)  # type: ignore[arg-type]
    except ImageAccessError:
        raise  # retried (celery_app.is_transient); the file stays in pending/ for the sweep
    except SoftTimeLimitExceeded:
        return Outcome("failed", f"processing exceeded the {rt.settings.soft_time_limit_s}s time limit")
    except MemoryError:
        return Outcome("failed", "out of memory while processing the image")
    except (OSError, RuntimeError) as exc:
        if is_model_problem(exc):
            raise
        return _internal_error(exc, path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a bug must not turn into a crash loop or a lost instance; a native
        return _internal_error(exc, path)  # library's panic (pyo3's PanicException) is a BaseException


def spool_file_exists(path: Path) -> bool:
    """Whether the spool file is there. Only "no such file" says it is not: any other error of the
    storage (a stale network mount, EIO) is the host's, retried as `ImageAccessError`, where
    `Path.is_file` raised a plain OSError that failed the delivery unretried."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise storage_error("spool file", exc) from exc


def require_pending_area(spool_dir: Path) -> None:
    """Raise `ImageAccessError` (retried) unless the spool's pending/ is there. The gateway makes it before it
    accepts anything, so without it the spool itself is missing (its network mount not up yet, a volume left
    out, TRIAGE_SPOOL_DIR unset and ./var/spool used), not a file: every instance was failed "spool file
    missing" and every study finalised with no flag, while the images waited in the gateway's pending/."""
    pending = Path(spool_dir) / SPOOL_PENDING
    try:
        if stat.S_ISDIR(pending.stat().st_mode):
            return
        exc: OSError = NotADirectoryError(errno.ENOTDIR, "not a folder")
    except OSError as error:
        exc = error
    raise storage_error("spool pending folder", exc)


def storage_error(what: str, exc: OSError) -> ImageAccessError:
    """The error's type and errno name only: its text holds the path (a study's UID)."""
    return ImageAccessError(f"{what} could not be read ({type(exc).__name__}, "
                            f"{errno.errorcode.get(exc.errno or 0, exc.errno)})")


def _internal_error(exc: BaseException, path: Path) -> Outcome:
    """Log where it failed but not the exception message, which could quote a DICOM value."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("unexpected %s for %s\n%s", type(exc).__name__, path.name, frames)
    return Outcome("failed", f"internal error ({type(exc).__name__})")


class ModelUnavailableError(RuntimeError):
    """Loading the model failed for a reason of the host (permissions, I/O, the runtime): retried."""


def is_model_problem(exc: BaseException) -> bool:
    """A missing/corrupt model or a missing GPU is the deployment's fault, not the image's: retry, don't fail rows."""
    from models.errors import ExecutionProviderError, ModelIntegrityError

    if isinstance(exc, (ModelIntegrityError, ExecutionProviderError, ModelUnavailableError)):  # incl. a bad site calibration
        return True
    return isinstance(exc, FileNotFoundError) and "model" in str(exc).lower()


def _finish(
    rt: Runtime, sop_uid: str, relpath: str, received: Any, started: float, outcome: Outcome, path: Path | None,
    *, scored: tuple[int, int, int, int] | None = None,
) -> dict[str, Any]:
    """Terminal upsert plus study bookkeeping in one transaction, then retire the file, unless it is no longer
    the file that was scored (`scored`, its `file_identity` before the analysis): a copy sent again meanwhile is
    left in pending/ for its own delivery, which archives it, and a WARNING says so. The scored copy itself is
    gone (the gateway renamed the new one over it), so the two cannot be compared; before 2026-11-29 the new
    copy was archived here as if it had been scored, and nothing was logged.

    A row the database refuses (a value it cannot hold) is recorded as `failed` with the error's
    type instead, so it never stays `processing` until the sweep mistakes it for a lost delivery.
    The row's key is the claimed one (study from the spool path): the file's own StudyInstanceUID
    never moves the result to another row or study.
    """
    study_uid = study_uid_from_relpath(relpath) or ""
    header_study = outcome.fields.get("study_instance_uid")
    if header_study and header_study != study_uid:
        shown = header_study if valid_uid(header_study) else "(not a UID)"  # free text could hold anything
        log.warning("instance %s filed under study %s carries StudyInstanceUID %s; recorded under %s",
                    sop_uid, study_uid or "(none)", shown, study_uid or "(none)")
    values = {
        "spool_relpath": relpath[:300],
        "received_at": received,
        **{k: v for k, v in outcome.fields.items() if v is not None},
        "sop_instance_uid": sop_uid,
        "study_instance_uid": study_uid,
        "status": outcome.status,
        "reason": (outcome.reason or None) and outcome.reason[:1000],
        "finished_at": db.utcnow(),
        "processing_ms": (time.time() - started) * 1000.0,
    }
    try:
        landed, received = _store(rt, values, received, outcome.status == "done")
    except (DataError, IntegrityError) as exc:  # this row's values, not the database: retrying cannot help
        log.error("result of %s could not be stored (%s); recording the failure instead", sop_uid, type(exc).__name__)
        outcome = Outcome("failed", f"result could not be stored ({type(exc).__name__})")
        keys = ("sop_instance_uid", "study_instance_uid", "spool_relpath", "received_at", "processing_ms")
        values = {**{k: values[k] for k in keys}, **_identifiers_that_fit(values), "status": outcome.status,
                  "reason": outcome.reason, "finished_at": db.utcnow()}
        landed, received = _store(rt, values, received, False)
    if path is not None and scored is not None and file_identity(path) not in (None, scored):
        log.warning("instance %s: its pending file was replaced by a copy sent again while it was scored; the "
                    "result is the first copy's, the new copy is left for its own delivery", sop_uid)
    elif path is not None:
        retire(rt.settings.spool_dir, path, values["study_instance_uid"] or "unknown", sop_uid,
               rt.settings.spool_retention, received if isinstance(received, dt.datetime) else None)
    log.info("instance %s -> %s%s%s", sop_uid, outcome.status, f" ({outcome.reason})" if outcome.reason else "",
             "" if landed else " [not stored: another delivery's result was there first]")
    return {"sop_instance_uid": sop_uid, "status": outcome.status, "reason": outcome.reason,
            "stratum": outcome.fields.get("stratum"), "noop": not landed}


def file_identity(path: Path) -> tuple[int, int, int, int] | None:
    """(device, inode, size, mtime) of a pending file, None when it cannot be read: the gateway replaces a
    pending file by renaming a new one over it, which changes the inode."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _identifiers_that_fit(values: dict[str, Any]) -> dict[str, str]:
    """The refused row's identifiers that fit their columns: without its accession number a failure
    cannot be found from the worklist (`list --accession`)."""
    keys = ("accession_number", "series_instance_uid", "modality")
    return {k: values[k] for k in keys
            if isinstance(values.get(k), str) and len(values[k]) <= db.instances.c[k].type.length}


def _store(rt: Runtime, values: dict[str, Any], received: Any, counts_for_study: bool) -> tuple[bool, Any]:
    """Terminal upsert and the study's bookkeeping in one transaction; (whether this delivery's row landed, the
    row's receive time). The row's time, not this message's: a message the gateway's sweep re-sent for a file
    `pneumonia-admin reprocess` restored carries the restore time, which widened the study's window and
    re-dated the archived copy past the retention period."""
    with rt.engine.begin() as conn:
        landed = db.finish_instance(conn, values)
        if landed and values["study_instance_uid"]:
            row = db.get_instance(conn, values["study_instance_uid"], values["sop_instance_uid"])
            received = (row or {}).get("received_at") or received
            db.touch_study(conn, values["study_instance_uid"], values.get("accession_number"), received,
                           values if counts_for_study else None)
    return landed, received


def _retire_quietly(rt: Runtime, relpath: str, study_uid: str, sop_uid: str, status: str,
                    received_at: dt.datetime | None = None) -> None:
    """A delivery of an instance whose result is stored: its file (left by a crash, or a re-send) is
    archived beside the first, dated by the row's receive time (retention counts from the first copy),
    and said to differ from the first when its pixel data does.

    The row is read again, locked, while the file moves: `pneumonia-admin reprocess` may have restored a copy
    to pending/ and reopened the row since this delivery found it terminal, and archiving that copy failed the
    reprocessed image "spool file missing". A reopened row keeps its file for its own delivery; a reopening
    that waits for the lock finds the copy archived and restores it again (`reprocess._after_a_resend`)."""
    try:
        path = resolve_pending(rt.settings.spool_dir, relpath)
    except SpoolPathError:
        return
    if study_uid:
        _compare_with_first(rt, path, study_uid, sop_uid, status)
    resent_accession = header_identifiers(path).get("accession_number") if path.is_file() else None  # not under the lock
    with rt.engine.begin() as conn:
        row = db.lock_instance(conn, study_uid, sop_uid)
        if row is None or row["status"] not in db.TERMINAL:  # reopened by `reprocess`, or (a database restored
            # from a lagging replica) gone: the sweep's next delivery scores the file
            log.info("instance %s is no longer terminal (reopened for reprocessing, or its row gone) while a stale "
                     "delivery ran; its file is left in pending/ for its own delivery", sop_uid)
            return
        _record_accession_alias(conn, study_uid, sop_uid, row["accession_number"], resent_accession)
        retire(rt.settings.spool_dir, path, study_uid or "unknown", sop_uid, rt.settings.spool_retention, received_at)


def _record_accession_alias(conn: Any, study_uid: str, sop_uid: str, stored: str | None, resent: str | None) -> None:
    """A re-send under another accession number (a PACS reconciling the order) makes the kept result findable
    under it too (`accession_aliases`, `list --accession`); the stored number stays the first. Why not replace
    it: a stale re-send under the old number would move it back, and a prior re-sent under today's order would
    put its flag on that order. A re-send without a number changes nothing."""
    if not resent or resent == stored or not study_uid:
        return
    if db.add_accession_alias(conn, study_uid, sop_uid, resent):
        log.warning("instance %s re-sent after its result was stored with another AccessionNumber: the result is "
                    "now also found under the re-send's (`list --accession`); first result and number kept", sop_uid)


def _compare_with_first(rt: Runtime, path: Path, study_uid: str, sop_uid: str, status: str) -> None:
    """The first result of an instance is kept, but a re-send whose image changed (the same SOP UID
    re-sent with other pixels) went unnoticed: the gateway logged it stored, the worker a no-op.
    Its Pixel Data is compared, as stored, with the archived first copy's; a difference is a
    WARNING, a copy that cannot be compared (none kept, another transfer syntax) is logged at INFO.
    So is a header that changed what finds or selects the result (`RESEND_COMPARED`: a PACS correcting
    a temporary accession number, adding a missing BodyPartExamined), named by element only.
    Logged by SOP UID only, as elsewhere; nothing here may fail the delivery."""
    first = archive_path(rt.settings.spool_dir, study_uid, sop_uid)
    try:
        if not path.is_file():  # a redelivered message whose file was retired already
            return
        if rt.settings.spool_retention == "delete" or not first.is_file():
            log.info("instance %s delivered again after its result (%s) was stored; no archived copy to "
                     "compare its pixel data with; first result kept", sop_uid, status)
            return
        changed = header_differences(path, first)
        (syntax, digest), (first_syntax, first_digest) = pixel_data_digest(path), pixel_data_digest(first)
    except Exception as exc:
        log.info("instance %s delivered again after its result (%s) was stored; pixel data not compared (%s); "
                 "first result kept", sop_uid, status, type(exc).__name__)
        return
    if changed:  # element names only: the values are identifiers
        log.warning("instance %s re-sent after its result (%s) was stored with another %s; not re-evaluated, "
                    "first result kept", sop_uid, status, ", ".join(changed))
    if syntax != first_syntax:
        log.info("instance %s delivered again after its result (%s) was stored, in another transfer syntax; "
                 "pixel data not compared; first result kept", sop_uid, status)
    elif digest != first_digest:
        log.warning("instance %s re-sent with different pixel data after its result (%s) was stored; "
                    "first result kept", sop_uid, status)


def finalize_study(rt: Runtime, study_uid: str, last_received_at: str | None) -> dict[str, Any]:
    """Mark a study final: its study-level flag no longer waits for more images.

    The gateway asks once the study has been quiet for a while; images it received may still
    wait for a result (the model being redeployed, a backlog). While any does, the study is not
    final: this raises `StudyNotSettledError`, which the wrapper retries until they are done.
    """
    waiting = outstanding_instances(rt, study_uid)
    if waiting:
        raise StudyNotSettledError(f"{len(waiting)} instance(s) of the study still wait for a result")
    with rt.engine.begin() as conn:
        db.finalize_study(conn, study_uid, db.parse_timestamp(last_received_at))
    # An image that arrived after the listing above and was claimed before the commit saw the study
    # not final, so its claim reopened nothing: look again, now that a later claim would reopen it.
    waiting = outstanding_instances(rt, study_uid)
    if waiting:
        with rt.engine.begin() as conn:
            db.reopen_study(conn, study_uid)
        raise StudyNotSettledError(f"{len(waiting)} instance(s) of the study arrived while it was finalised")
    log.info("study %s finalised", study_uid)
    _report_foreign_files(rt, study_uid)
    return {"study_instance_uid": study_uid, "final": True}


def outstanding_instances(rt: Runtime, study_uid: str) -> list[str]:
    """SOP Instance UIDs in pending/<study>/ without a terminal row in that study (a file whose result
    is stored but which was not yet retired does not hold the study back; a row of the same SOP UID
    in another study says nothing about this one). Only `<SOP Instance UID>.dcm` names count, the files
    the gateway's sweep re-sends: another name (an archived `X.dup-....dcm` moved back by hand, an
    editor's temporary file) is never sent, so it was never scored and its study never went final."""
    sops, _ = _pending_listing(rt, study_uid)
    if not sops:
        return []
    with rt.engine.connect() as conn:
        finished = db.terminal_sops(conn, study_uid, sops)
    return [sop for sop in sops if sop not in finished]


def _pending_listing(rt: Runtime, study_uid: str) -> tuple[list[str], int]:
    """(the SOP UIDs named by the `.dcm` files of pending/<study>/, how many other `.dcm` files it holds)."""
    if not valid_uid(study_uid):
        return [], 0
    folder = Path(rt.settings.spool_dir) / SPOOL_PENDING / study_uid
    try:  # not glob: it takes a folder it cannot list (a stale mount) for an empty one, and the study went final
        with os.scandir(folder) as entries:
            names = [entry.name[:-4] for entry in entries if entry.name.endswith(".dcm")]
    except (FileNotFoundError, NotADirectoryError):
        require_pending_area(rt.settings.spool_dir)  # the study's folder is gone, not the whole spool
        return [], 0
    except OSError as exc:
        raise storage_error("spool folder", exc) from exc
    sops = sorted(name for name in names if valid_uid(name))
    return sops, len(names) - len(sops)


def _report_foreign_files(rt: Runtime, study_uid: str) -> None:
    """Once per finalisation, a warning that pending/<study>/ holds `.dcm` files no worker will take;
    their count only: a name that is not a UID may be anything, a patient's name too. Best effort."""
    try:
        _, foreign = _pending_listing(rt, study_uid)
    except Exception:  # the study is final already; this is advice only
        return
    if foreign:
        log.warning("study %s finalised with %d file(s) in its pending folder not named <SOP Instance UID>.dcm; "
                    "they are not the gateway's and were left out (move them out of the spool)", study_uid, foreign)
