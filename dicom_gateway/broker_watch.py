"""Noticing that the broker lost the messages it held, so that the gateway re-sends them at once.

Why: a Redis without persistence (the development default) that restarts, a Sentinel failover to a
replica that had not caught up, or a `FLUSHALL` drops every queued message together. The spool keeps
every instance, but the sweep re-sent a pending file only `TRIAGE_GATEWAY_REQUEUE_AFTER_SECONDS`
(30 min) after its last publish, and a finalize queued behind a backlog whose study's images were
all scored had nothing pending to bring it back: the study stayed not final until someone ran
`pneumonia-admin requeue`.

How: the gateway keeps a key of its own in the broker's database and looks at every sweep whether
it is still there. A restart with persistence (compose runs Redis with `appendonly yes`) or a
replica that had it keeps the key, so a broker that lost nothing causes no re-send; a key that is
gone means whatever was queued is gone too. The same round trip reads the queue's length: once
the queue has been seen empty, every message published before that look had been taken by a
worker; and once no delivered message is unacknowledged either, it had been done with. A finalize
that waits for its study is retried with a countdown: the worker holds the retry as a timer, off the
queue but unacknowledged, and drops it when the broker connection breaks, expecting the broker's
unacknowledged store back, which a broker without persistence has lost too. So only finalizes sent
since the queue and the unacknowledged store were last seen empty together need remembering.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from worker.contract import QUEUE

from dicom_gateway.queue import TaskPublisher

log = logging.getLogger("dicom_gateway.broker_watch")

MARKER_PREFIX = "triage:gateway-alive:"
MARKER_TTL_SECONDS = 30 * 86400
"""Renewed at every sweep; the expiry only clears the key of a gateway that was killed (a stopped
gateway deletes its own). A broker evicting keys under memory pressure (a `maxmemory-policy` other than
Celery's recommended `noeviction`) may drop it early: the gateway then re-sends what is pending, which
the workers process once."""


@dataclass(frozen=True)
class BrokerLook:
    """What one look at the broker found."""

    lost: bool
    """The key placed by an earlier look is gone: the broker's queued messages are gone with it."""
    idle: bool
    """Nothing queued and nothing delivered but unacknowledged: what was published before the look is done with."""
    started: float
    """`time.monotonic()` before the look was sent."""


class BrokerWatch:
    """One key per gateway process (several gateways may share a broker), looked at once per sweep."""

    def __init__(self, publisher: TaskPublisher, token: str | None = None) -> None:
        self._publisher = publisher
        self.key = MARKER_PREFIX + (token or uuid.uuid4().hex)
        self._placed = False
        self._warned = False
        self.losses = 0

    def look(self) -> BrokerLook | None:
        """Renew the key and read the queue's and the unacknowledged store's lengths; None while the broker
        cannot be reached."""
        started = time.monotonic()
        try:
            existed, in_flight = self._publisher.with_broker_channel(self._exchange)
        except Exception as exc:  # broker down: the sweep's publishes fail and say so; look again next sweep
            self._refused(exc)
            return None
        lost = self._placed and not existed
        self._placed = True
        if lost:
            self.losses += 1
        return BrokerLook(lost=lost, idle=in_flight == 0 and not lost, started=started)

    def _refused(self, exc: Exception) -> None:
        """A broker that answers but refuses the key (a Redis ACL that allows Celery's keys only: NOPERM) turns
        the watch off for good, which is worth one warning; a broker that is down is the sweep's to report."""
        if isinstance(exc, ResponseError) and not self._warned:
            self._warned = True
            log.warning("the broker refuses the gateway's key %s (%s: a Redis ACL?): a broker that loses its queue "
                        "is noticed only by the sweep, after TRIAGE_GATEWAY_REQUEUE_AFTER_SECONDS", self.key,
                        type(exc).__name__)
        else:
            log.debug("broker not looked at", extra={"error": type(exc).__name__})

    def _exchange(self, channel: Any) -> tuple[bool, int]:
        """(the key was there, messages queued or delivered but not acknowledged)."""
        pipe = channel.client.pipeline(transaction=False)
        pipe.exists(self.key)
        pipe.set(self.key, "1", ex=MARKER_TTL_SECONDS)
        pipe.llen(QUEUE)
        pipe.hlen(channel.unacked_key)
        existed, _, queued, unacked = pipe.execute()
        return bool(existed), int(queued) + int(unacked)

    def remove(self) -> None:
        """Delete the key at a clean stop (best effort: a key left behind expires)."""
        if not self._placed:
            return
        try:
            self._publisher.with_broker_channel(lambda channel: channel.client.delete(self.key))
        except Exception as exc:
            log.debug("broker key not removed", extra={"error": type(exc).__name__})
