"""The spool's archive: retire moves finished files there, prune-archive enforces a retention period."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from worker import admin, spool

DAY = 86400.0
STUDY_OLD, STUDY_MIXED, STUDY_NEW = "1.2.3", "1.2.4", "1.2.5"


def write(path: Path, age_days: float, now: float, size: int = 1000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    os.utime(path, (now - age_days * DAY, now - age_days * DAY))
    return path


@pytest.fixture
def spool_dir(tmp_path) -> Path:
    now = time.time()
    archive, pending = tmp_path / "archive", tmp_path / "pending"
    write(archive / STUDY_OLD / "1.2.3.1.dcm", 40, now)
    write(archive / STUDY_OLD / "1.2.3.1.dup-1-2.dcm", 35, now)
    write(archive / STUDY_MIXED / "1.2.4.1.dcm", 31, now)
    write(archive / STUDY_MIXED / "1.2.4.2.dcm", 29, now)
    write(archive / STUDY_NEW / "1.2.5.1.dcm", 1, now)
    write(pending / STUDY_OLD / "1.2.3.9.dcm", 90, now)  # outstanding work, however old
    return tmp_path


def remaining(spool_dir: Path) -> set[str]:
    return {p.relative_to(spool_dir).as_posix() for p in spool_dir.rglob("*.dcm")}


def test_prune_deletes_only_archived_files_past_the_retention(spool_dir):
    before = remaining(spool_dir)
    assert spool.prune_archive(spool_dir, 30 * DAY, now=time.time(), dry_run=True) == (3, 3000)
    assert remaining(spool_dir) == before
    assert spool.prune_archive(spool_dir, 30 * DAY, now=time.time()) == (3, 3000)
    assert remaining(spool_dir) == {"archive/1.2.4/1.2.4.2.dcm", "archive/1.2.5/1.2.5.1.dcm",
                                    "pending/1.2.3/1.2.3.9.dcm"}
    assert not (spool_dir / "archive" / STUDY_OLD).exists(), "an emptied study folder is removed"
    assert spool.prune_archive(spool_dir, 30 * DAY, now=time.time()) == (0, 0)


def test_retire_recreates_a_study_folder_pruned_under_it(tmp_path, monkeypatch):
    """prune-archive may remove an empty study folder between retire's mkdir and its rename."""
    pending = write(tmp_path / "pending" / STUDY_NEW / "1.2.5.7.dcm", 0, time.time())
    real_replace, pruned = os.replace, []

    def prune_then_replace(source, target):
        if not pruned:
            pruned.append(Path(target).parent)
            Path(target).parent.rmdir()
        return real_replace(source, target)

    monkeypatch.setattr(spool.os, "replace", prune_then_replace)
    spool.retire(tmp_path, pending, STUDY_NEW, "1.2.5.7", "archive")
    assert pruned and remaining(tmp_path) == {"archive/1.2.5/1.2.5.7.dcm"}


def test_admin_prune_archive_reports_counts_without_identifiers(spool_dir, monkeypatch, capsys):
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(spool_dir))
    assert admin.main(["prune-archive", "--older-than-days", "30", "--dry-run"]) == 0
    assert admin.main(["prune-archive", "--older-than-days", "30"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["would delete 3 archived instance(s), 0.0 MiB, received more than 30 days ago",
                   "deleted 3 archived instance(s), 0.0 MiB, received more than 30 days ago"]
    with pytest.raises(SystemExit):
        admin.main(["prune-archive", "--older-than-days", "0"])


def test_a_study_s_waiting_images_are_counted_from_its_folder_alone(tmp_path):
    """`show` read the whole of pending/ to count one study's images (0.2 s at 40k files)."""
    from worker import contract

    assert spool.waiting_in_study(tmp_path, "1.2.3") is None  # no spool on this host: unknown
    for sop in ("1.2.3.1", "1.2.3.2", "not-a-uid"):
        path = tmp_path / contract.SPOOL_PENDING / "1.2.3" / f"{sop}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert spool.waiting_in_study(tmp_path, "1.2.3") == 2
    assert spool.waiting_in_study(tmp_path, "1.2.4") == 0 and spool.waiting_in_study(tmp_path, "../x") == 0
    assert spool.waiting_in_pending(tmp_path) is not None
    (tmp_path / contract.SPOOL_PENDING / "1.2.5").write_bytes(b"")  # a file where a folder should be
    assert spool.waiting_in_study(tmp_path, "1.2.5") is None


@pytest.mark.skipif(os.geteuid() != 0 or not __import__("shutil").which("setpriv"),
                    reason="needs root and setpriv to drop the capability that reads any folder")
def test_an_unreadable_study_folder_makes_the_waiting_count_unknown_not_zero(tmp_path):
    """glob listed nothing in a study folder it could not read, so `stats` said 0 images waiting."""
    import subprocess
    import sys

    from worker import contract

    folder = tmp_path / contract.SPOOL_PENDING / "1.2.5"
    folder.mkdir(parents=True)
    (folder / "1.2.5.1.dcm").write_bytes(b"x")
    folder.chmod(0)
    try:
        caps = "-dac_override,-dac_read_search"
        done = subprocess.run(["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", sys.executable, "-c",
                               f"from worker import spool; print(spool.waiting_in_pending({str(tmp_path)!r}))"],
                              capture_output=True, text=True, timeout=60)
    finally:
        folder.chmod(0o755)
    assert done.stdout.strip() == "None", done.stderr
    assert spool.waiting_in_pending(tmp_path) == {"1.2.5": [(folder / "1.2.5.1.dcm").stat().st_mtime]}
