"""The spool directory shared with the gateway: pending/ is outstanding work, archive/ is done.

The worker moves a file out of pending/ only after its terminal row is committed, so a
crash at any point leaves the file where the gateway's recovery sweep will re-queue it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from pathlib import Path

from worker.contract import SPOOL_ARCHIVE, SPOOL_PENDING

log = logging.getLogger(__name__)
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SpoolPathError(ValueError):
    """A task named a path outside the spool's pending area."""


def valid_uid(uid: str) -> bool:
    """DICOM UID syntax: digits and dots, at most 64 characters."""
    return bool(uid) and len(uid) <= 64 and UID_RE.match(uid) is not None


def resolve_pending(spool_dir: Path, relpath: str) -> Path:
    """Absolute path of a pending file; refuses anything escaping `<spool>/pending`."""
    pending = (Path(spool_dir) / SPOOL_PENDING).resolve()
    path = (Path(spool_dir) / relpath).resolve()
    if pending not in path.parents:
        raise SpoolPathError("spool path is outside the pending area")
    return path


def study_uid_from_relpath(relpath: str) -> str | None:
    """pending/<StudyUID>/<SOPUID>.dcm -> StudyUID, used when the file itself is unreadable."""
    parts = Path(relpath).parts
    if len(parts) == 3 and parts[0] == SPOOL_PENDING and valid_uid(parts[1]):
        return parts[1]
    return None


def retire(spool_dir: Path, pending_path: Path, study_uid: str, sop_uid: str, retention: str,
           received_at: dt.datetime | None = None) -> None:
    """Archive (or delete) a pending file once its row is terminal; keeps earlier archives.

    The archived copy is dated `received_at` (naive UTC) when given: `prune_archive` counts a copy's age
    from its date, which the gateway sets when it stores the file, but `pneumonia-admin reprocess` dates a
    restored copy anew (for the gateway's sweep), and its patient data then outlived the retention period.

    A failure here is logged, not raised: the row is already final and the sweep's
    re-delivery will retry the move as a no-op task.
    """
    try:
        if not pending_path.exists():
            return
        if retention == "delete":
            pending_path.unlink()
            return
        target = archive_path(spool_dir, study_uid, sop_uid)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a duplicate of a finished instance: keep both, change nothing
            target = target.with_name(f"{sop_uid}.dup-{os.getpid()}-{pending_path.stat().st_mtime_ns}.dcm")
        try:
            os.replace(pending_path, target)
        except FileNotFoundError:  # `prune_archive` removed the study folder, empty, just now
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(pending_path, target)
        if received_at is not None:
            stamp = received_at.replace(tzinfo=dt.timezone.utc).timestamp()
            os.utime(target, (stamp, stamp))
    except OSError as exc:
        log.warning("could not retire spool file for SOP %s: %s", sop_uid, type(exc).__name__)


def waiting_in_pending(spool_dir: Path) -> dict[str, list[float]] | None:
    """Per study folder of pending/, the modification times of its images (what the gateway accepted and no
    worker has finished; the gateway writes a file once, when it stores it). None when there is no pending/
    this user can read (an admin host without the spool, or without the spool's group). Files and folders whose names are not UIDs are not the
    gateway's and are left out, as the sweep leaves them out; a file retired while listed is skipped."""
    root = Path(spool_dir) / SPOOL_PENDING
    waiting: dict[str, list[float]] = {}
    try:
        for folder in sorted(root.iterdir()):
            if valid_uid(folder.name) and folder.is_dir() and (mtimes := _image_times(folder)):
                waiting[folder.name] = mtimes
    except OSError:  # no pending/ here, or one this user may not read: unknown, not "nothing waits"
        return None
    return waiting


def waiting_in_study(spool_dir: Path, study_uid: str) -> int | None:
    """`waiting_in_pending` for one study: its folder alone is read (`show`), not the whole spool. None when
    this user cannot read it or there is no spool here; 0 when the study has no folder."""
    root = Path(spool_dir) / SPOOL_PENDING
    if not valid_uid(study_uid):
        return 0
    try:
        with os.scandir(root / study_uid) as entries:
            return sum(1 for entry in entries if entry.name.endswith(".dcm") and valid_uid(entry.name[:-4]))
    except FileNotFoundError:
        return 0 if root.is_dir() else None
    except OSError:
        return None


def _image_times(folder: Path) -> list[float]:
    """Modification times of the `<SOP UID>.dcm` files in `folder` (a file retired while listed is skipped).
    A folder that cannot be listed raises (glob said nothing, so an unreadable study read as none waiting)."""
    times = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(".dcm") and valid_uid(entry.name[:-4]):
                try:
                    times.append(entry.stat().st_mtime)
                except FileNotFoundError:
                    continue
    return times


def archive_path(spool_dir: Path, study_uid: str, sop_uid: str) -> Path:
    """Empty pending/<StudyUID>/ folders are left alone: removing one could race a gateway rename."""
    return Path(spool_dir) / SPOOL_ARCHIVE / study_uid / f"{sop_uid}.dcm"


def newest_archived_copy(spool_dir: Path, study_uid: str, sop_uid: str) -> Path | None:
    """The copy archived last: a re-send after the result (a PACS adding the missing BodyPartExamined,
    say) is archived beside the first as `<SOP>.dup-*.dcm` and not re-evaluated (`tasks._retire_quietly`);
    it is the copy the sender means: `reprocess` analyses it again, and `pneumonia-admin sr` copies its
    patient module. Ranked by the inode's change time,
    which each move into the archive sets, not by the modification time: the worker dates every archived
    copy by its instance's receive time (for `prune-archive`), so that could not tell them apart. An OSError
    other than absence (permissions, I/O) is raised: "no copy" would be read as gone for good."""
    first = archive_path(spool_dir, study_uid, sop_uid)
    copies = [first, *first.parent.glob(f"{sop_uid}.dup-*.dcm")]
    dated = []
    for path in copies:
        try:
            dated.append((path.stat().st_ctime_ns, path.name != first.name, path))
        except (FileNotFoundError, NotADirectoryError):  # absent (pruned, deleted); other errors are the caller's
            continue
    return max(dated)[2] if dated else None


def prune_archive(spool_dir: Path, max_age_s: float, *, now: float, dry_run: bool = False) -> tuple[int, int]:
    """Delete archived instances written more than `max_age_s` before `now`; return (files, bytes).

    Why: with retention `archive` every study ever received stays on the spool's disk, full
    DICOM with patient data, until free space falls under the gateway's floor and it starts
    refusing studies. The age is the file's mtime, the time the gateway received it (a rename
    into archive/ keeps it). Study folders left empty are removed; `retire` recreates one if a
    late instance of that study is archived at the same moment. Only pending/ is outstanding
    work, and it is never touched.
    """
    archive = Path(spool_dir) / SPOOL_ARCHIVE
    cutoff = now - max_age_s
    files = bytes_ = 0
    for path in sorted(archive.glob("*/*.dcm")):
        try:
            stat = path.stat()
            if stat.st_mtime > cutoff:
                continue
            if not dry_run:
                path.unlink()
        except FileNotFoundError:  # another pruner got there first
            continue
        files, bytes_ = files + 1, bytes_ + stat.st_size
    if not dry_run:
        for folder in archive.glob("*/"):
            try:
                folder.rmdir()  # only succeeds when empty
            except OSError:
                pass
    return files, bytes_
