"""Ends a worker whose consumer lost an acknowledgement or stopped taking messages while they wait in the queue.

Why: a Redis master lost while a finished task's acknowledgement is in flight fails that ack ("Couldn't ack
..., reason:network:ConnectionError") and kombu's consumer then polls the broker no more: the worker stays
up, idle, logging nothing (reproduced by stopping the master while a task ran; an upstream class of bugs,
celery/celery #8030, #9054, #10302). Nothing is lost, the gateway's sweep re-sends the files, but that worker
scores nothing until someone restarts it. The cause is in kombu's Redis QoS: its `ack` forgets a delivery
only once the ack reached the broker, so the failed one holds the channel's prefetch (1 per pool process) for
good, and the consumer never asks the broker for another message.

This watchdog, in the worker's main process, stops the worker on either of two signs, each lasting `stall_s`
(longer than the hard time limit, so a worker whose pool is busy with slow images is never taken for a stalled
one): a delivery its channel holds unacknowledged that no task of this worker owns (the lost ack itself: with
one pool process the worker takes nothing more, with several it runs a slot short, and another lost ack takes
the next), or messages waiting in the queue while the worker has received none (whatever else stopped it).
The first finds a stalled worker beside healthy ones, which keep the queue empty. It logs an ERROR and stops
the worker, which `pneumonia-worker run` then reports with exit status `EXIT_STALLED` for the supervisor to
restart it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Callable

from celery import Celery
from celery.signals import task_received, worker_ready, worker_shutting_down
from celery.worker import state as worker_state

log = logging.getLogger(__name__)

EXIT_STALLED = 75
"""`pneumonia-worker run`'s exit status after the watchdog stopped a stalled worker (EX_TEMPFAIL)."""
SHUTDOWN_GRACE_S = 60.0
"""How long the watchdog waits for Celery's warm shutdown before it ends the process itself."""


class StallWatchdog:
    """The rule, kept apart from the thread and the broker so that it can be tested on its own clock."""

    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s = stall_s
        self.clock = clock
        self.last_received = clock()
        self.waiting_since: float | None = None
        self.leaked_since: dict[Any, float] = {}  # delivery tag -> first look that found it owned by no task
        self.fired = False  # set when it stopped the worker

    def received(self, **_: Any) -> None:
        self.last_received = self.clock()

    def leaked(self, tags: frozenset[Any] | None) -> bool:
        """True once one delivery tag has been among `tags` (held, owned by no task) at every look for `stall_s`.
        Unknown (None: the consumer between connections, its structures changing as they were read) skips the
        look; a tag missing from a look starts over."""
        if tags is None:
            return False
        now = self.clock()
        self.leaked_since = {tag: self.leaked_since.get(tag, now) for tag in tags}
        return any(now - since >= self.stall_s for since in self.leaked_since.values())

    def stalled(self, waiting: int | None) -> bool:
        """True once messages have waited (`waiting` > 0 at every look) and none was received for `stall_s`.
        An unknown count (the broker unreachable: Celery's own reconnection is at work) starts over."""
        now = self.clock()
        if not waiting:
            self.waiting_since = None
            return False
        if self.waiting_since is None:
            self.waiting_since = now
        return now - self.waiting_since >= self.stall_s and now - self.last_received >= self.stall_s


def waiting_messages(app: Celery, queue: str) -> int | None:
    """Messages in `queue` that no worker has taken (reserved ones are not counted), None if unknown."""
    try:
        with app.connection_for_read() as connection:
            return int(connection.default_channel.queue_declare(queue=queue, passive=True).message_count)
    except Exception as exc:  # the broker down or failing over: Celery's consumer reconnects on its own
        log.debug("watchdog: queue length unknown (%s)", type(exc).__name__)
        return None


def leaked_deliveries(consumer: Any) -> frozenset[Any] | None:
    """Delivery tags the consumer's channel holds unacknowledged (kombu's virtual QoS) that no task of this worker
    owns, received, scheduled or running: acks lost with the connection. None when unknown (a transport
    without a virtual QoS, a consumer between connections, a set changing while it was read)."""
    try:
        qos = consumer.task_consumer.channel.qos
        held = set(qos._delivered) - set(qos._dirty)
        if not held:
            return frozenset()
        owned = {getattr(getattr(request, "message", None), "delivery_tag", None)
                 for tasks in (worker_state.active_requests, worker_state.reserved_requests,
                               worker_state.scheduled_requests)
                 for request in list(tasks)}
    except Exception:  # read from this thread while the worker's loop changes them: no sign either way
        return None
    return frozenset(held - owned)


def install(app: Celery, queue: str, stall_s: float) -> StallWatchdog | None:
    """Start the watchdog in the worker's main process once it is ready; None when `stall_s` is 0. Its
    `fired` says afterwards whether it stopped the worker, for `pneumonia-worker run`'s exit status."""
    if stall_s <= 0:
        return None
    watchdog = StallWatchdog(stall_s)
    stop = threading.Event()
    interval = max(1.0, min(30.0, stall_s / 4))

    consumer: list[Any] = []

    def watch() -> None:
        while not stop.wait(interval):
            leaked = watchdog.leaked(leaked_deliveries(consumer[0]) if consumer else None)
            if leaked or watchdog.stalled(waiting_messages(app, queue)):
                watchdog.fired = True
                stop_stalled_worker(stall_s)
                return

    def start(sender: Any = None, **_: Any) -> None:
        consumer.append(sender)  # celery.apps.worker sends worker_ready from the consumer
        watchdog.received()  # count from readiness, not from the app's creation
        threading.Thread(target=watch, name="triage-stall-watchdog", daemon=True).start()
        log.info("stall watchdog on: a worker holding a delivery no task owns, or receiving nothing while messages "
                 "wait, for %.0f s stops", stall_s)

    task_received.connect(watchdog.received, weak=False)
    worker_ready.connect(start, weak=False)
    worker_shutting_down.connect(lambda **_: stop.set(), weak=False)
    return watchdog


def stop_stalled_worker(stall_s: float) -> None:
    log.error("worker stalled: for %.0f s this worker has held a delivery that no task of it owns (an ack lost with "
              "the connection, which kombu never retries) or received no message while messages waited in the "
              "queue; stopping it for a restart (exit status %d)", stall_s, EXIT_STALLED)
    os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown: its pool processes end with it
    time.sleep(SHUTDOWN_GRACE_S)
    log.error("worker stalled: warm shutdown did not end the process in %.0f s; exiting", SHUTDOWN_GRACE_S)
    os._exit(EXIT_STALLED)
