"""The on-disk spool: the only place where an acknowledged instance lives until the worker is done.

Layout (shared contract with the worker, see worker/contract.py)::

    <spool>/incoming/<tmp>                         partial writes; never read by anyone
    <spool>/pending/<StudyUID>/<SOPUID>.dcm        durable, awaiting the worker (the outbox)
    <spool>/archive/...                            moved there by the worker when done
    <spool>/studies/<StudyUID>                     gateway-only marker: study not yet finalized

A file appears in `pending/` only by `os.replace` of a fully written, fsynced file, and
the directory entry is fsynced too, so after a crash `pending/` holds exactly the
instances that may have been acknowledged: nothing half-written, nothing lost.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from worker.contract import SPOOL_ARCHIVE, SPOOL_INCOMING, SPOOL_PENDING, pending_relpath

from dicom_gateway.config import UID_MAX_LEN

log = logging.getLogger("dicom_gateway.spool")

STUDIES = "studies"
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class InvalidUIDError(ValueError):
    """A UID that must not become part of a path (empty, too long, not digits-and-dots)."""


def validate_uid(value: object, what: str = "UID") -> str:
    """Return `value` as a UID string if it is a syntactically valid DICOM UID.

    Why so strict: UIDs become directory and file names; the regex admits no `/`, `..`
    or NUL, so a hostile dataset cannot escape the spool.
    """
    uid = str(value if value is not None else "").strip().rstrip("\x00")
    if not uid:
        raise InvalidUIDError(f"{what} is missing")
    if len(uid) > UID_MAX_LEN:
        raise InvalidUIDError(f"{what} is longer than {UID_MAX_LEN} characters")
    if not _UID_RE.match(uid):
        raise InvalidUIDError(f"{what} is not a valid UID (digits and dots only)")
    return uid


@dataclass(frozen=True)
class PendingFile:
    """One instance in the outbox."""

    relpath: str
    study_uid: str
    sop_uid: str
    mtime: float


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename/create inside it survives power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable writes into, and listing of, the spool directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.incoming = self.root / SPOOL_INCOMING
        self.pending = self.root / SPOOL_PENDING
        self.archive = self.root / SPOOL_ARCHIVE
        self.studies = self.root / STUDIES
        self._root_device: int | None = None  # the spool's file system, recorded by ensure_layout
        self._unremovable: set[str] = set()  # entries of incoming/ clean_incoming could not remove (logged once)

    def ensure_layout(self) -> None:
        """Create the spool directories (raises OSError if the spool is unusable), durably: the first
        instance acknowledged into a fresh spool must not depend on a `pending/` entry still in cache."""
        made_root = not self.root.is_dir()
        made = [path for path in (self.incoming, self.pending, self.archive, self.studies) if not path.is_dir()]
        for path in made:
            path.mkdir(parents=True, exist_ok=True)
        if made:
            fsync_dir(self.root)
        if made_root:
            fsync_dir(self.root.parent)
        self._root_device = self.root.stat().st_dev

    def restore_layout(self) -> list[str]:
        """Recreate spool folders that went missing while running (a clean-up job emptying `incoming/`,
        an operator's `rm -r`); returns the names recreated, [] when none was missing or the spool
        cannot be written. Without it every association was refused until a restart, while the
        liveness probe stayed green."""
        missing = [path.name for path in (self.incoming, self.pending, self.archive, self.studies) if not path.is_dir()]
        if not missing or not self._root_still_mounted():
            return []
        try:
            self.ensure_layout()
        except OSError:
            return []
        return missing

    def _root_still_mounted(self) -> bool:
        """The spool root is there, on the file system it was on at start. A volume that went away
        (unmounted, a lost network mount) leaves the mount point's empty folder behind: folders made
        there would take instances that the worker, on the real volume, never sees."""
        try:
            return self._root_device is not None and self.root.stat().st_dev == self._root_device
        except OSError:
            return False

    def store(self, chunks: list[bytes | memoryview], study_uid: str, sop_uid: str) -> str:
        """Durably write one instance and return its spool-relative path.

        Steps: write to `incoming/` (O_EXCL, unique name), fsync the file, make the study
        directory and fsync `pending/` (every time: another association may have made the study
        directory a moment ago and not fsynced `pending/` yet), `os.replace` into place, fsync
        the study directory. Any OSError propagates after the partial file is removed, so the
        caller can answer a failure status instead of Success. A failure after the rename leaves
        the instance in `pending/`: it may be processed although the sender was told it failed,
        which is harmless (the sender's retry replaces it and the worker is idempotent), whereas
        deleting it could delete an earlier, acknowledged copy of the same instance.
        """
        study_uid = validate_uid(study_uid, "StudyInstanceUID")
        sop_uid = validate_uid(sop_uid, "SOPInstanceUID")
        relpath = pending_relpath(study_uid, sop_uid)
        tmp = self.incoming / f"{sop_uid}.{uuid.uuid4().hex}.part"
        try:
            _write_fsync(tmp, chunks)
            study_dir = self.pending / study_uid
            study_dir.mkdir(exist_ok=True)
            fsync_dir(self.pending)
            os.replace(tmp, self.root / relpath)
            fsync_dir(study_dir)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return relpath

    def pending_size(self, study_uid: str, sop_uid: str) -> int | None:
        """Size of an earlier copy of this instance still waiting in pending/, if any."""
        try:
            return (self.root / pending_relpath(study_uid, sop_uid)).stat().st_size
        except (OSError, ValueError):
            return None

    def mark_study_open(self, study_uid: str) -> None:
        """Record durably that a study awaits finalize, to survive restarts (and power loss): the gateway
        writes it before publishing the instance, as the worker may archive the instance at once, and then
        the marker is all a restarted gateway has to send the study's finalize."""
        marker = self.studies / validate_uid(study_uid, "StudyInstanceUID")
        if not marker.exists():
            made = not self.studies.is_dir()
            self.studies.mkdir(exist_ok=True)  # an operator may have removed it; it is only restart bookkeeping
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640))
            fsync_dir(self.studies)
            if made:
                fsync_dir(self.root)

    def mark_study_closed(self, study_uid: str) -> None:
        (self.studies / validate_uid(study_uid, "StudyInstanceUID")).unlink(missing_ok=True)

    def open_studies(self) -> Iterator[tuple[str, float]]:
        """(StudyInstanceUID, marker mtime) of studies not yet finalized."""
        if not self.studies.is_dir():
            return
        for entry in os.scandir(self.studies):
            if _UID_RE.match(entry.name):
                try:
                    yield entry.name, entry.stat().st_mtime
                except FileNotFoundError:
                    continue

    def iter_pending(self) -> Iterator[PendingFile]:
        """Every instance in `pending/`; entries that are not ours are skipped, not trusted."""
        if not self.pending.is_dir():
            return
        for study in os.scandir(self.pending):
            if not (study.is_dir() and _UID_RE.match(study.name)):
                continue
            for entry in os.scandir(study.path):
                sop, dot, ext = entry.name.rpartition(".")
                if ext != "dcm" or not dot or not _UID_RE.match(sop):
                    continue
                try:
                    mtime = entry.stat().st_mtime
                except FileNotFoundError:  # the worker archived it meanwhile
                    continue
                yield PendingFile(pending_relpath(study.name, sop), study.name, sop, mtime)

    def depth(self) -> dict[str, int]:
        """Counts for the health check: pending instances/studies, partial writes."""
        pending = list(self.iter_pending())
        partial = sum(1 for _ in os.scandir(self.incoming)) if self.incoming.is_dir() else 0
        return {
            "pending_instances": len(pending),
            "pending_studies": len({p.study_uid for p in pending}),
            "incoming_partials": partial,
        }

    def clean_incoming(self, older_than_s: float = 3600.0) -> int:
        """Remove stale partial writes left by a crash (never acknowledged, safe to drop).

        An entry that cannot be removed (a folder someone made in `incoming/`, a file system remounted
        read-only) is skipped and the rest removed: the first such entry used to end the clean-up, so
        every partial listed after it stayed for good. Skipped entries are logged once, by count and
        error, never by name (only the gateway's own partials are named by UID)."""
        removed = 0
        if not self.incoming.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        skipped: dict[str, str] = {}
        for entry in os.scandir(self.incoming):
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                skipped[entry.name] = type(exc).__name__
        new = {name: error for name, error in skipped.items() if name not in self._unremovable}
        self._unremovable = set(skipped)  # one that was removed meanwhile and comes back is new again
        if new:
            log.warning("partial writes that could not be removed were skipped",
                        extra={"error": ", ".join(sorted(set(new.values()))), "counts": {"skipped": len(new)}})
        return removed

    def writable(self) -> bool:
        """Whether new instances can be written: a file system remounted read-only after I/O errors
        still shows its free space, and every C-STORE would fail with 0xA700 (access(2) says EROFS)."""
        return all(os.access(folder, os.W_OK) for folder in (self.incoming, self.pending))

    def free_bytes(self) -> int:
        """Free bytes for unprivileged writers on the spool's file system."""
        target = self.root if self.root.exists() else self.root.parent
        return shutil.disk_usage(target).free


def _write_fsync(path: Path, chunks: list[bytes | memoryview]) -> None:
    """Write all chunks to a new file and fsync it; a short write raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError("short write to spool")
                view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
