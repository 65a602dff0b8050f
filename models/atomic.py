"""Files replaced whole or not at all: the one writer behind checkpoints, run files, site calibrations and exports.

A file written straight over its old self is truncated first: a kill, a power loss or a full disk while it
was written left a 0-byte checkpoint (the run's only resume point), half a site calibration (the file a
worker serves) or half an export (which a RIS polling the file reads as complete). `write_whole` writes a
temporary file beside the target, fsyncs it and renames it over the target (`os.replace`, atomic on one file
system), so a reader sees the old file or the new one, never a part.

A rename makes a new file, so what the old one had is given to it: its permission bits and, where they
differ from the writer's, its owner and group (an admin running a command as root over a file the service
user reads must not leave one only root can read). Where that cannot be done without losing something (the
folder is not writable, the owner could only be given back by root and the file may be written in place,
the target is a pipe or a device such as /dev/stdout) the file is written in place, as a plain write would.
A file that can be neither given its owner nor written in place is replaced, and becomes the writer's, as
any rename would make it. A rename does not keep POSIX ACLs, extended attributes or other hard links to
the old file: a file served through those must be reached through a symbolic link instead.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator


def write_whole(path: str | Path, write: Callable[[IO[Any]], None], *, binary: bool = False,
                new_file_mode: int = 0o666) -> None:
    """Call `write` once, on a handle whose content replaces `path` whole (see the module's docstring).

    A symbolic link is written through (its target is replaced, the link kept): a deployment may point at
    the link. Text handles are UTF-8 with newline="" (csv writes its own line ends). A new file gets
    `new_file_mode` less the umask, as `os.open` would give it; an existing one keeps its mode. An error of
    `write` leaves the old file as it was."""
    if not _regular_or_absent(path):  # a pipe or a device (/dev/stdout names /proc/<pid>/fd/pipe:[N], no file)
        _write_in_place(Path(path), write, binary, new_file_mode)
        return
    target = Path(os.path.realpath(path))
    if not _replace(target, write, binary, new_file_mode):
        _write_in_place(target, write, binary, new_file_mode)


def write_text(path: str | Path, text: str, *, new_file_mode: int = 0o666) -> None:
    """`Path.write_text` (UTF-8), replaced whole."""
    write_whole(path, lambda handle: handle.write(text), new_file_mode=new_file_mode)


def copy_file(source: str | Path, target: str | Path) -> None:
    """`shutil.copyfile`, replaced whole."""
    def write(handle: IO[bytes]) -> None:
        with open(source, "rb") as original:
            shutil.copyfileobj(original, handle)
    write_whole(target, write, binary=True)


@contextmanager
def written_whole(path: str | Path) -> Iterator[Path]:
    """A path for a library that writes only to paths (the ONNX exporter, onnxruntime's quantizer): what the
    block writes there replaces `path` whole once the block ends without an error (`copy_file`), so a
    worker loading the model meanwhile reads the old one or the new one."""
    target = Path(path)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as folder:
        staged = Path(folder) / target.name
        yield staged
        copy_file(staged, target)


def _replace(target: Path, write: Callable[[IO[Any]], None], binary: bool, new_file_mode: int) -> bool:
    """The temporary-file-and-rename write; False, having written nothing, where it would lose something."""
    old = target.stat() if target.exists() else None
    if not os.access(target.parent, os.W_OK | os.X_OK):
        return False
    name = target.with_name(f".{target.name}.{secrets.token_hex(6)}.partial")
    descriptor = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, new_file_mode)  # the umask applies, as to a new file
    try:
        with _handle(descriptor, binary) as handle:
            if old is not None and not _take_over(descriptor, old, target):
                name.unlink()
                return False
            write(handle)
            handle.flush()
            os.fsync(descriptor)
        os.replace(name, target)
    except BaseException:  # a failed or interrupted write leaves the old file and no stray temporary
        name.unlink(missing_ok=True)
        raise
    _sync_folder(target.parent)
    return True


def _take_over(descriptor: int, old: os.stat_result, target: Path) -> bool:
    """Give the new file the old one's owner, group and mode; False where the owner or group cannot be given
    (not root) and the old file can be written in place instead. Compared with the new file's own, not the
    writer's: in a setgid folder both already have the folder's group."""
    new = os.fstat(descriptor)
    if (new.st_uid, new.st_gid) != (old.st_uid, old.st_gid):
        try:
            os.fchown(descriptor, old.st_uid, old.st_gid)
        except PermissionError:
            if os.access(target, os.W_OK):
                return False
            # neither: replaced as any rename replaces, the file becoming the writer's (a run folder shared
            # through a sticky or world-writable folder, say)
    os.fchmod(descriptor, stat.S_IMODE(old.st_mode))  # after fchown, which may clear set-id bits
    return True


def _write_in_place(target: Path, write: Callable[[IO[Any]], None], binary: bool, new_file_mode: int) -> None:
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, new_file_mode)
    with _handle(descriptor, binary) as handle:
        write(handle)


def _regular_or_absent(path: str | Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True


def _handle(descriptor: int, binary: bool) -> IO[Any]:
    return open(descriptor, "wb") if binary else open(descriptor, "w", newline="", encoding="utf-8")


def _sync_folder(folder: Path) -> None:
    """fsync the folder so the rename itself survives a crash (POSIX; skipped where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
