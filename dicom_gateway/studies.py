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

MAX_UNCONFIRMED_FINALIZES = 100_000
"""Finalizes remembered until the broker is seen holding nothing after them (about 200 bytes each). A broker
never seen idle keeps the newest this many: a study older than that whose finalize a broker loses waits
for `pneumonia-admin requeue`, as `stats` (`overdue_studies`) shows."""

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
        self._sent: dict[str, tuple[float, float]] = {}  # finalized uid -> (monotonic sent, wall of its last arrival)

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
            due = [(uid, mono, wall) for uid, (mono, wall) in self._last.items() if now - mono >= self._stable]
        sent = 0
        for uid, mono, wall in due:
            if not self._finalize(uid, utc_iso(wall)):
                break  # broker down; keep them all and retry on the next tick
            with self._lock:
                self._remember_sent(uid, wall)
                current = self._last.get(uid)
                # untouched since the snapshot: by the monotonic time, as an arrival after the wall clock was
                # stepped back keeps the later wall time and would look like no arrival at all
                if current is not None and current[0] == mono:
                    del self._last[uid]
                    self._on_closed(uid)
            log.info("finalize sent", extra={"study_uid": uid, "last_received_at": utc_iso(wall)})
            sent += 1
        return sent

    def _remember_sent(self, uid: str, wall: float) -> None:
        """Keep a sent finalize until the broker has been seen idle after it (under the lock)."""
        self._sent.pop(uid, None)
        self._sent[uid] = (time.monotonic(), wall)
        while len(self._sent) > MAX_UNCONFIRMED_FINALIZES:
            del self._sent[next(iter(self._sent))]  # the oldest: the bound on a broker never idle

    def taken_before(self, moment: float) -> None:
        """The broker held nothing, queued or unacknowledged, at `moment` (monotonic): finalizes sent before
        it are done with."""
        with self._lock:
            for uid in [uid for uid, (sent, _) in self._sent.items() if sent < moment]:
                del self._sent[uid]

    def finalize_again(self) -> int:
        """The broker lost its queue: every finalize not known to have been taken is due again at once
        (the worker waits for the study's images, and a study already final is recomputed to the same flag)."""
        with self._lock:
            lost = list(self._sent.items())
            self._sent.clear()
        for uid, (_, wall) in lost:
            try:
                self.touch(uid, wall, age_s=self._stable)
            except OSError:  # the open-study marker; the study is tracked in memory already
                pass
        return len(lost)
