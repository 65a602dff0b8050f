"""Files a run rewrites (checkpoints, history, config, run info) replaced whole or not at all.

`torch.save` or `write_text` straight onto last.pt truncates it first: a kill (SIGKILL, power loss, an
out-of-memory kill) while it was being written left a 0-byte last.pt, and the run's only resume point
was gone. Each write here goes to a temporary file in the same folder, is flushed and fsynced, and is
then renamed over the target (`os.replace`, atomic on one file system): a reader sees the old file or
the new one, never a part.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

import torch


def replace_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a temporary file beside `path`, make it durable, then rename it over `path`."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:  # a failed or interrupted write leaves the old file and no stray temporary
        temporary.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
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


def save_torch(state: object, path: Path) -> None:
    """`torch.save`, atomically."""
    replace_atomically(path, lambda handle: torch.save(state, handle))


def write_text(path: Path, text: str) -> None:
    """`Path.write_text` (UTF-8), atomically."""
    replace_atomically(path, lambda handle: handle.write(text.encode("utf-8")))


def copy_file(source: Path, target: Path) -> None:
    """`shutil.copyfile`, atomically."""
    def write(handle: BinaryIO) -> None:
        with open(source, "rb") as original:
            shutil.copyfileobj(original, handle)
    replace_atomically(target, write)
