"""Stable-study tracker: a study is final once no instance arrived for a configured time.

Why a quiet period (as MONAI Deploy and Orthanc do): DICOM has no "end of study"
message; senders split a study over several associations, so the study-level flag can
only become final after the study has been quiet for a while. Instances are processed
as they arrive; only `triage.finalize_study` waits for the quiet period.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from dicom_gateway.queue import utc_iso

log = logging.getLogger("dicom_gateway.studies")

FinalizeFn = Callable[[str, str], bool]
"""(study_uid, last_received_at ISO) -> published?"""


class StudyTracker:
    """Last-arrival time per open study; `due()` finalizes the quiet ones."""

    def __init__(
        self,
        stable_seconds: float,
        finalize: FinalizeFn,
        on_open: Callable[[str], None] = lambda uid: None,
        on_closed: Callable[[str], None] = lambda uid: None,
    ) -> None:
        """`on_open`/`on_closed` persist the open-study set (called under the tracker lock)."""
        self._stable = stable_seconds
        self._finalize = finalize
        self._on_open = on_open
        self._on_closed = on_closed
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, float]] = {}  # uid -> (monotonic, wall time)

    def touch(self, study_uid: str, wall_time: float | None = None, *, age_s: float = 0.0) -> None:
        """Record an arrival now (or `age_s` seconds ago, for studies recovered at start-up)."""
        wall = time.time() - age_s if wall_time is None else wall_time
        mono = time.monotonic() - age_s
        with self._lock:
            previous = self._last.get(study_uid)
            if previous is None or previous[0] < mono:  # tracked first: finalize must not hang on the marker
                self._last[study_uid] = (mono, wall if previous is None else max(wall, previous[1]))
            if previous is None:
                self._on_open(study_uid)  # may raise (marker not written); the study stays tracked in memory

    def open_studies(self) -> list[str]:
        with self._lock:
            return sorted(self._last)

    def finalize_due(self) -> int:
        """Send finalize for every study quiet for `stable_seconds`; return how many were sent.

        A study that receives a new instance after finalize is simply tracked again and
        finalized again later (the worker recomputes the study flag idempotently).
        """
        now = time.monotonic()
        with self._lock:
            due = [(uid, wall) for uid, (mono, wall) in self._last.items() if now - mono >= self._stable]
        sent = 0
        for uid, wall in due:
            if not self._finalize(uid, utc_iso(wall)):
                break  # broker down; keep them all and retry on the next tick
            with self._lock:
                current = self._last.get(uid)
                if current is not None and current[1] == wall:
                    del self._last[uid]
                    self._on_closed(uid)
            log.info("finalize sent", extra={"study_uid": uid, "last_received_at": utc_iso(wall)})
            sent += 1
        return sent
