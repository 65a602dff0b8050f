"""models.atomic: a file replaced whole keeps what the old one had, and falls back to a plain write only where it must."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from models.atomic import copy_file, write_text, write_whole


def test_a_write_that_fails_part_way_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"the only resume point")

    def full_disk_half_way(handle) -> None:
        handle.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_whole(path, full_disk_half_way, binary=True)
    assert path.read_bytes() == b"the only resume point" and os.listdir(tmp_path) == ["last.pt"]


def test_text_is_utf8_whatever_the_locale_and_keeps_its_line_ends(tmp_path):
    path = tmp_path / "export.csv"
    write_text(path, "MÜLLER-Ø\r\nnext\n")
    assert path.read_bytes() == "MÜLLER-Ø\r\nnext\n".encode("utf-8")


def test_a_new_file_gets_the_given_mode_less_the_umask_and_an_old_one_keeps_its_own(tmp_path):
    previous = os.umask(0o027)
    try:
        write_text(tmp_path / "new.json", "{}", new_file_mode=0o666)
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640
        write_text(tmp_path / "private.csv", "x", new_file_mode=0o600)
        assert (tmp_path / "private.csv").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)
    (tmp_path / "new.json").chmod(0o604)
    write_text(tmp_path / "new.json", "{}\n")
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o604


def test_a_symbolic_link_is_written_through_and_kept(tmp_path):
    (tmp_path / "real").mkdir()
    target, link = tmp_path / "real" / "site.json", tmp_path / "site.json"
    target.write_text("old")
    link.symlink_to(target)
    copy_file(Path(__file__), link)
    assert link.is_symlink() and target.read_bytes() == Path(__file__).read_bytes()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another owner needs root")
def test_the_owner_and_group_of_the_replaced_file_are_kept(tmp_path):
    path = tmp_path / "site.json"
    path.write_text("old")
    os.chown(path, 65534, 65534)
    write_text(path, "new")
    assert (path.stat().st_uid, path.stat().st_gid, path.read_text()) == (65534, 65534, "new")


def refused(*args: object) -> None:
    raise PermissionError(1, "Operation not permitted")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another owner needs root")
def test_an_owner_that_cannot_be_given_back_is_kept_by_writing_in_place(tmp_path, monkeypatch):
    """A user who may write another's file (group-writable) but not give a new file that owner: a rename
    would have taken the file from its owner, so it is written in place."""
    path = tmp_path / "export.csv"
    path.write_text("old")
    os.chown(path, 65534, 65534)
    before = path.stat().st_ino
    monkeypatch.setattr(os, "fchown", refused)
    write_text(path, "new")
    assert path.read_text() == "new" and path.stat().st_ino == before and os.listdir(tmp_path) == ["export.csv"]
    assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another owner needs root")
def test_a_file_neither_chownable_nor_writable_in_place_is_replaced_as_before(tmp_path, monkeypatch):
    """Another user's 0644 file in a folder the writer may write (a shared run folder): a rename replaced it
    before models.atomic; it is replaced still, rather than refused."""
    path = tmp_path / "last.pt"
    path.write_bytes(b"old")
    os.chown(path, 65534, 65534)
    monkeypatch.setattr(os, "fchown", refused)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == path else real_access(p, mode, **kw))
    copy_file(Path(__file__), path)
    assert path.read_bytes() == Path(__file__).read_bytes() and os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another owner needs root")
def test_an_error_of_the_writer_leaves_another_owners_file_untouched(tmp_path):
    """A PermissionError from `write` itself (an unreadable source of copy_file) was taken for a refused
    chown: the target was truncated and written in place, and its 15,000-byte checkpoint became 0 bytes."""
    path = tmp_path / "best.pt"
    path.write_bytes(b"x" * 15_000)
    os.chown(path, 65534, 65534)
    calls = []

    def unreadable_source(handle) -> None:
        calls.append(1)
        handle.write(b"partial,")
        raise PermissionError(13, "Permission denied")

    with pytest.raises(PermissionError):
        write_whole(path, unreadable_source, binary=True)
    assert path.read_bytes() == b"x" * 15_000 and calls == [1] and os.listdir(tmp_path) == ["best.pt"]


def test_dev_stdout_into_a_pipe_is_written_to(tmp_path):
    """`--out /dev/stdout` into a pipe: its real path is /proc/<pid>/fd/pipe:[N], which names no file, and
    the export failed with FileNotFoundError."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "from models.atomic import write_text; write_text('/dev/stdout', 'rows\\n')"],
                         capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stdout == b"rows\n", out.stderr


def test_a_folder_it_cannot_write_gets_the_file_written_in_place(tmp_path, monkeypatch):
    path = tmp_path / "export.csv"
    path.write_text("old")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path else real_access(p, mode, **kw))
    write_text(path, "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["export.csv"]


def test_a_pipe_is_written_to_not_replaced(tmp_path):
    """A RIS reading a named pipe: renaming a regular file over it would have cut the reader off."""
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    write_text(fifo, "rows\n")
    reader.join(timeout=10)
    assert received == [b"rows\n"] and fifo.is_fifo()


def test_a_library_that_writes_only_to_paths_replaces_the_file_whole_or_not_at_all(tmp_path):
    """The ONNX exporter and onnxruntime's quantizer write to a path, in place: a worker loading the model
    meanwhile read half of one. What they write to the staged path replaces the target once they succeed."""
    from models.atomic import written_whole

    model = tmp_path / "model.onnx"
    model.write_bytes(b"the served model")
    with pytest.raises(RuntimeError):
        with written_whole(model) as staged:
            staged.write_bytes(b"half an exp")
            raise RuntimeError("the exporter failed")
    assert model.read_bytes() == b"the served model" and os.listdir(tmp_path) == ["model.onnx"]
    with written_whole(model) as staged:
        staged.write_bytes(b"the new model")
        (staged.parent / "scratch.prep.onnx").write_bytes(b"a step's own file")
        assert model.read_bytes() == b"the served model"
    assert model.read_bytes() == b"the new model" and os.listdir(tmp_path) == ["model.onnx"]
