"""Task publishing and the outbox sweep.

Why an outbox: a C-STORE is acknowledged once the file is durable in `pending/`; the
Celery message is a notification that may be lost (broker down, broker restarted
without persistence, gateway killed between rename and publish). The sweep re-publishes
whatever is still in `pending/`, and the worker's per-SOP-Instance upsert turns those
at-least-once messages into exactly-once results.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import celery

from worker.contract import FINALIZE_STUDY, PROCESS_INSTANCE, QUEUE, broker_celery_options

from dicom_gateway.config import GatewaySettings
from dicom_gateway.spool import Spool

log = logging.getLogger("dicom_gateway.queue")

T = TypeVar("T")


def utc_iso(timestamp: float | None = None) -> str:
    """ISO-8601 UTC with offset, as the contract's `received_at` expects."""
    moment = dt.datetime.now(dt.timezone.utc) if timestamp is None else dt.datetime.fromtimestamp(
        timestamp, dt.timezone.utc
    )
    return moment.isoformat(timespec="milliseconds")


def make_celery_client(settings: GatewaySettings) -> celery.Celery:
    """A bare Celery client (no worker code imported) that fails fast when the broker is down. Its
    transport options and TLS come from the helper the worker uses (a sentinel master, a verified rediss://)."""
    timeout = settings.gateway_broker_timeout_seconds
    app = celery.Celery("dicom_gateway", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        broker_celery_options(settings, {"socket_connect_timeout": timeout, "socket_timeout": timeout,
                                         "max_retries": 0}),
        broker_connection_timeout=timeout,
        broker_connection_retry=False,
        broker_connection_retry_on_startup=False,
        broker_connection_max_retries=0,
        task_publish_retry=False,
        task_default_queue=QUEUE,
        task_serializer="json",
    )
    return app


LOCK_POLL_SECONDS = 0.05
"""How often a sender waiting for its turn looks whether the publish in hand is stuck."""


class TaskPublisher:
    """Publishes contract tasks by name; never raises, never blocks longer than the timeout.

    A failure opens a short circuit (`broker_backoff_seconds`) during which sends are
    skipped immediately, so a burst of C-STOREs against a dead broker does not pay one
    connection timeout each. The sweep closes the circuit when the broker answers again.
    """

    def __init__(self, settings: GatewaySettings, app: celery.Celery | None = None) -> None:
        self._app = app or make_celery_client(settings)
        self._backoff = settings.gateway_broker_backoff_seconds
        self._wait = settings.gateway_broker_timeout_seconds
        self._turn = threading.Condition()
        self._busy_since: float | None = None  # when the publish in hand started; None: the publisher is free
        self._waiting = 0  # unforced sends waiting for their turn
        self._down_until = 0.0
        self.last_error: str | None = None

    def process_instance(self, relpath: str, sop_uid: str, received_at: str, *, force: bool = False) -> bool:
        return self._send(PROCESS_INSTANCE, (relpath, sop_uid), {"received_at": received_at}, force=force)

    def finalize_study(self, study_uid: str, last_received_at: str, *, force: bool = False) -> bool:
        return self._send(FINALIZE_STUDY, (study_uid,), {"last_received_at": last_received_at}, force=force)

    def broker_blocked(self) -> bool:
        """True while the circuit is open after a recent failure."""
        return time.monotonic() < self._down_until

    def _send(self, name: str, args: tuple, kwargs: dict, *, force: bool = False) -> bool:
        """Publish once. Publishes are serialised (kombu producers are not shared safely between
        threads). An unforced send (C-STORE, finalize) waits its turn while the publish in hand is
        making progress, but gives up once that publish has been in the broker's hands longer than
        the broker timeout: behind a hung broker each queued sender used to pay its own full
        timeout in turn, so a C-STORE's answer grew with the number of associations. It re-checks
        the circuit once it has its turn. A send given up here is not lost: the caller leaves it
        to the sweep."""
        if not force and self.broker_blocked():
            return False
        if not self._take_turn(force):
            log.info("publish left to the sweep: the broker has not answered the publish in hand",
                     extra={"task": name})
            return False
        try:
            if not force and self.broker_blocked():  # the publish we waited for failed meanwhile
                return False
            try:
                self._app.send_task(name, args=args, kwargs=kwargs, queue=QUEUE, retry=False)
            except Exception as exc:  # kombu/redis raise many types; all mean "not queued"
                self._down_until = time.monotonic() + self._backoff
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("publish failed", extra={"task": name, "error": self.last_error})
                return False
            self._down_until = 0.0
            self.last_error = None
            return True
        finally:
            self._end_turn()

    def _take_turn(self, force: bool) -> bool:
        """Wait for the publisher. The sweep's (forced) publishes give way to waiting C-STORE and
        finalize sends: with a plain lock, which is not fair, a sweep re-sending a backlog could
        take the turn back between its publishes and keep a C-STORE waiting for all of it (12 s
        for 60 files in a review's run with a 0.2 s broker stub). An unforced send gives up when
        the publish in hand is stuck past the broker timeout."""
        with self._turn:
            if force:
                while self._busy_since is not None or self._waiting:
                    self._turn.wait()
            else:
                self._waiting += 1
                try:
                    while self._busy_since is not None:
                        if time.monotonic() - self._busy_since > self._wait:
                            return False
                        self._turn.wait(timeout=LOCK_POLL_SECONDS)
                finally:
                    self._waiting -= 1
                    self._turn.notify_all()  # a sweep waits for no sender to be waiting
            self._busy_since = time.monotonic()
            return True

    def _end_turn(self) -> None:
        with self._turn:
            self._busy_since = None
            self._turn.notify_all()

    def probe(self) -> bool:
        """Check broker reachability with one connection attempt (health check, sweep)."""
        try:
            with self._app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=self._app.conf.broker_connection_timeout)
            self._down_until = 0.0
            return True
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False

    def with_broker_channel(self, use: Callable[[Any], T]) -> T:
        """Run `use` with kombu's Redis channel of the broker (its `client`, its key names; one connection
        attempt; raises when unreachable). For the broker watch: a look at the broker's own state."""
        with self._app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=self._app.conf.broker_connection_timeout)
            return use(conn.default_channel)

    def close(self) -> None:
        self._app.close()


@dataclass
class Outbox:
    """Which pending instances still need a (re-)publish.

    `unsent` holds instances whose publish failed: they are retried at every sweep.
    `sent_at` remembers our own publishes, so a backlog the worker is still chewing
    through is not re-published every sweep, only after `requeue_after_seconds`.
    """

    spool: Spool
    publisher: TaskPublisher
    grace_s: float
    requeue_after_s: float
    unsent: dict[str, tuple[str, str]] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, relpath: str, sop_uid: str, received_at: str, *, force: bool = False) -> bool:
        """Publish one instance (right after a store, or from the sweep); on failure leave it to the sweep."""
        ok = self.publisher.process_instance(relpath, sop_uid, received_at, force=force)
        with self.lock:
            if ok:
                self.sent_at[relpath] = time.monotonic()
                self.unsent.pop(relpath, None)
            else:
                self.unsent[relpath] = (sop_uid, received_at)
        return ok

    def sweep(self, *, min_age_s: float | None = None,
              on_published: Callable[[str, float], None] = lambda study_uid, mtime: None) -> dict[str, int]:
        """Publish every pending instance that has no live task; return counts.

        Due: failed before, never published by this process and older than the grace
        period (a previous run may have died before publishing), or published more than
        `requeue_after_s` ago and still pending (the message may be lost).

        `failed` counts the due instances left unqueued: after the first failed publish the
        sweep stops publishing (broker down: the next sweep retries) but still lists every
        pending file, so `pending` is the whole spool and the bookkeeping of files after the
        failure is kept (forgetting it made them "never published" and re-sent after the grace
        period: duplicates).

        `on_published(study_uid, mtime)` is told of each instance re-sent: its study's finalize may
        have been lost with it (a Redis restart), so the gateway tracks the study again.
        """
        grace = self.grace_s if min_age_s is None else min_age_s
        now_wall, now_mono = time.time(), time.monotonic()
        present: set[str] = set()
        queued = failed = 0
        for item in self.spool.iter_pending():
            present.add(item.relpath)
            if not self._due(item.relpath, now_wall - item.mtime, now_mono, grace):
                continue
            if not failed and self.publish(item.relpath, item.sop_uid, utc_iso(item.mtime), force=True):
                queued += 1
                on_published(item.study_uid, item.mtime)
            else:
                failed += 1
        self._forget_done(present, now_mono)
        return {"queued": queued, "failed": failed, "pending": len(present)}

    def forget_published(self) -> None:
        """Make every pending instance due at the next sweep: the broker lost the messages (`BrokerWatch`)."""
        with self.lock:
            self.sent_at.clear()

    def _due(self, relpath: str, age_s: float, now_mono: float, grace: float) -> bool:
        with self.lock:
            if relpath in self.unsent:
                return True
            sent = self.sent_at.get(relpath)
        if sent is None:
            return age_s >= grace
        return now_mono - sent >= self.requeue_after_s

    def _forget_done(self, present: set[str], sweep_started: float) -> None:
        """Drop bookkeeping for files the worker has archived.

        Only entries older than this sweep's start: a file stored while we were listing
        may be missing from `present` although it is very much pending.
        """
        with self.lock:
            for key in [k for k, t in self.sent_at.items() if k not in present and t < sweep_started]:
                del self.sent_at[key]
            for key in [k for k in self.unsent if k not in present and not (self.spool.root / k).exists()]:
                del self.unsent[key]
