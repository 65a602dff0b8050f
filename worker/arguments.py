"""Number types for the command lines (`pneumonia-worker`, `pneumonia-admin`, `dicom-gateway`).

Why one module: each command had its own parsers, and each missed a different bad value: `nan` and
`inf` compare false with everything (a sweep queued nothing and said success), a time beyond the
calendar was a traceback after work was done (`requeue --older-than 1e300`), `--every-hours inf`
pruned once and then crashed in `time.sleep`, and `--limit 0` meant "no limit". A range with both
ends given refuses all of them before anything runs, with argparse's exit 2 and the flag's name.
"""

from __future__ import annotations

import argparse
from typing import Callable

CENTURY_HOURS = 100 * 366 * 24
"""The longest time span a command takes: `datetime` and `time.sleep` end not far beyond it."""
CENTURY_SECONDS = CENTURY_HOURS * 3600
CENTURY_DAYS = 100 * 366
SQL_BIGINT_MAX = 2**63 - 1
"""A row limit above this overflows SQLite's integer and PostgreSQL's bigint."""


def number_in(low: float, high: float, unit: str, *, above_low: bool = False) -> Callable[[str], float]:
    """An argparse type for a finite number from `low` (or above it, with `above_low`) to `high`."""
    lower = f"above {low:g}" if above_low else f"{low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {text!r}") from None
        in_range = (value > low if above_low else value >= low) and value <= high  # nan fails both
        if not in_range:
            raise argparse.ArgumentTypeError(f"must be {lower} to {high:g} {unit}, got {text!r}")
        return value

    return parse


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type for a whole number from `low` to `high` (no upper end when None)."""
    wanted = f"{low} or more" if high is None else f"{low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    return parse
