"""Checkpoints replaced whole or not at all (`models.atomic`, the one writer for every such file).

`torch.save` straight onto last.pt truncates it first: a kill (SIGKILL, power loss, an out-of-memory kill)
while it was being written left a 0-byte last.pt, and the run's only resume point was gone. This module only
adds what needs torch; run files (history, config, run info) use `models.atomic.write_text` directly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.atomic import write_whole


def save_torch(state: object, path: Path) -> None:
    """`torch.save`, replaced whole."""
    write_whole(path, lambda handle: torch.save(state, handle), binary=True)
