"""Admission of TCP connections to the DICOM port, before any thread or Association exists.

Why at accept time: pynetdicom gives every accepted connection an acceptor thread, and its cap on those
threads (`scp.pynetdicom_thread_cap`) counts connections that have not sent their A-ASSOCIATE-RQ yet. The
IP allow-list used to run only once a request arrived, so about a hundred silent connections, even from a
host outside TRIAGE_GATEWAY_ALLOWED_IPS, filled the cap until the ACSE timeout and shut the gateway to
every modality and to its own health probe, unlogged. Here such a connection is closed as soon as it is
accepted: its source is outside the allow-list, or it already holds its share of connections
(TRIAGE_GATEWAY_MAX_CONNECTIONS_PER_PEER), so one allowed but misbehaving host cannot starve the others.
Refusals and connections that close without ever sending a request are counted and logged, the log
throttled so that a scanner cannot flood it.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import Counter
from typing import Callable, Iterable

from pynetdicom import evt

log = logging.getLogger("dicom_gateway.connections")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Connection = tuple[str, int]
"""(host, port) of a peer's end of one connection."""
LOG_INTERVAL_S = 10.0
"""Shortest time between two log lines of one kind (a refusal, a connection without a request)."""
REFUSAL_KINDS = ("ip_not_allowed", "peer_limit")
"""Metric labels of connections closed at accept time."""


def peer_address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's address, an IPv4-mapped IPv6 one as IPv4 (a dual-stack listener reports those)."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(peer: str) -> bool:
    address = peer_address(peer)
    return address is not None and address.is_loopback


def is_this_host(peer: str, bind: str) -> bool:
    """Whether `peer` is this host: loopback, or the listener's own address when it is bound to one. A gateway
    bound to 10.1.2.3 does not answer on loopback, so `dicom-gateway health` calls in from 10.1.2.3 itself,
    and the probe's exceptions (past the IP allow-list, C-ECHO only; a probe slot at the association limit)
    never applied to it: at the limit, or with an allow-list, the healthcheck read a working gateway dead."""
    if is_loopback(peer):
        return True
    own = peer_address(bind.strip())
    return own is not None and not own.is_unspecified and peer_address(peer) == own


def ip_allowed(peer: str, networks: Iterable[Network]) -> bool:
    address = peer_address(peer)
    return address is not None and any(address in net for net in networks)


def peer_key(peer: str) -> str:
    """One key per host, whatever form the listener reports it in (`::ffff:10.0.0.1` is 10.0.0.1)."""
    address = peer_address(peer)
    return str(address) if address is not None else peer


class LogThrottle:
    """At most one log line per `interval_s` for each kind of event; the line that is let through says
    how many were left out before it, so nothing goes uncounted and a flood costs a few lines a minute."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._next: dict[str, float] = {}
        self._left_out: Counter[str] = Counter()
        self._lock = threading.Lock()

    def allow(self, kind: str) -> int | None:
        """None: leave this one out; else log it, and the number left out since the last line."""
        with self._lock:
            now = self._clock()
            if now < self._next.get(kind, float("-inf")):
                self._left_out[kind] += 1
                return None
            self._next[kind] = now + self.interval_s
            return self._left_out.pop(kind, 0)


class ConnectionGate:
    """The accept-time checks and counters of one listener (`tls.HandshakeInThreadServer.verify_request`).

    A peer's connections are its live acceptor threads plus those accepted whose thread has not started
    its Association yet (a TLS handshake runs first), by (address, port), so one starting its Association
    just now is not counted twice; the live ones are read from what runs now, so a count cannot leak and
    lock a modality out."""

    def __init__(self, networks: list[Network], per_peer_limit: int, throttle: LogThrottle | None = None,
                 bind: str = "0.0.0.0") -> None:
        self.networks = networks
        self.bind = bind
        self.per_peer_limit = per_peer_limit
        self.refused: Counter[str] = Counter()
        self.without_request = 0  # connections closed before their A-ASSOCIATE-RQ (a scan, a TCP check)
        self._opening: set[Connection] = set()
        self._closed: set[Connection] = set()
        """Connections gone without a request whose acceptor thread waits out the ACSE timeout: pynetdicom
        still lists them as live for up to 30 s, and a TCP check twice a second filled the peer's share
        and refused the modality behind the same address."""
        self._lock = threading.Lock()
        self._throttle = throttle or LogThrottle()

    def admit(self, peer: Connection, live: Callable[[], Iterable[Connection]]) -> bool:
        """Whether to keep a connection just accepted from `peer`; False closes it unlogged by pynetdicom.

        This host (loopback, or the bound address) passes the allow-list here: `dicom-gateway health` calls in
        from it, and the association policy (`scp.StoreSCP._policy`) still lets it in only as the health check,
        for C-ECHO only."""
        host, key = peer[0], peer_key(peer[0])
        if self.networks and not ip_allowed(host, self.networks) and not is_this_host(host, self.bind):
            return self._refuse("ip_not_allowed", key, "source IP not in allow-list (TRIAGE_GATEWAY_ALLOWED_IPS)")
        with self._lock:
            running = set(map(_keyed, live()))
            self._closed &= running  # a thread that has ended needs no more exclusion
            held = len({c for c in self._opening | running - self._closed if c[0] == key})
            if held < self.per_peer_limit:
                self._opening.add((key, peer[1]))
                return True
        return self._refuse("peer_limit", key, f"peer already holds {held} connections "
                                               f"(TRIAGE_GATEWAY_MAX_CONNECTIONS_PER_PEER={self.per_peer_limit})")

    def started(self, peer: Connection) -> None:
        """The connection admitted from `peer` now runs as an Association, or is gone (a failed handshake)."""
        with self._lock:
            self._opening.discard(_keyed(peer))

    def _refuse(self, kind: str, peer: str, reason: str) -> bool:
        with self._lock:
            self.refused[kind] += 1
        left_out = self._throttle.allow(kind)
        if left_out is not None:
            log.warning("connection refused", extra={"peer": peer, "reason": reason, "counts": {"not_logged_since_last": left_out}})
        return False

    def handlers(self) -> list[tuple]:
        return [(evt.EVT_CONN_CLOSE, self.on_conn_close)]

    def on_conn_close(self, event: evt.Event) -> None:
        """Count and log (throttled) a connection that ends without having sent an A-ASSOCIATE-RQ: a port
        scanner, a load balancer's TCP check, or a sender stuck before its request until the ACSE timeout.
        Those held a thread and a place under pynetdicom's cap, and left no trace."""
        assoc = event.assoc
        if not assoc.is_acceptor or assoc.requestor.primitive is not None:
            return
        with self._lock:
            self.without_request += 1
            self._closed.add(_keyed((str(assoc.requestor.address), int(assoc.requestor.port))))
        left_out = self._throttle.allow("without_request")
        if left_out is not None:
            log.info("connection closed without an association request",
                     extra={"peer": peer_key(str(assoc.requestor.address)), "counts": {"not_logged_since_last": left_out}})

    def status(self) -> dict[str, object]:
        with self._lock:
            return {"connections_refused": dict(self.refused), "connections_without_request": self.without_request}


def _keyed(connection: Connection) -> Connection:
    return peer_key(connection[0]), connection[1]


def per_peer_default(thread_cap: int) -> int:
    """Half of pynetdicom's cap on connections: always above TRIAGE_GATEWAY_MAX_ASSOCIATIONS (the cap is
    at least three times it), so one sender may still use every association, but it cannot hold the cap."""
    return max(1, thread_cap // 2)
