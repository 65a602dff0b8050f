"""The running gateway: listener + background maintenance (sweep, stable-study finalize).

Start-up order matters for durability: the spool layout is created and stale partial
writes removed before the listener accepts anything; the first sweep (which re-publishes
everything left in `pending/` by a previous, possibly killed, process) runs right after.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import Any

from dicom_gateway.broker_watch import BrokerWatch
from dicom_gateway.config import GatewaySettings, StartupError, endpoint
from dicom_gateway.connections import ConnectionGate, per_peer_default
from dicom_gateway.http_status import StatusServer
from dicom_gateway.queue import Outbox, TaskPublisher
from dicom_gateway.scp import StoreSCP, build_ae, pynetdicom_thread_cap
from dicom_gateway.spool import Spool
from dicom_gateway.studies import StudyTracker
from dicom_gateway.tls import HandshakeInThreadServer, server_context

log = logging.getLogger("dicom_gateway.service")

TICK_SECONDS = 0.5
STALE_PARTIAL_SECONDS = 3600.0


class Gateway:
    """Owns the AE server and the maintenance thread; `start()` returns the bound port."""

    def __init__(self, settings: GatewaySettings, publisher: TaskPublisher | None = None) -> None:
        self.settings = settings
        self.spool = Spool(settings.spool_dir)
        self.publisher = publisher or TaskPublisher(settings)
        self.outbox = Outbox(
            self.spool, self.publisher, settings.gateway_sweep_grace_seconds, settings.gateway_requeue_after_seconds
        )
        self.tracker = StudyTracker(
            settings.gateway_stable_study_seconds,
            self.publisher.finalize_study,
            on_open=self.spool.mark_study_open,
            on_closed=self.spool.mark_study_closed,
        )
        self.watch = BrokerWatch(self.publisher)
        self.scp = StoreSCP(settings, self.spool, self.outbox, self.tracker)
        self.gate = ConnectionGate(settings.networks(), settings.gateway_max_connections_per_peer
                                   or per_peer_default(pynetdicom_thread_cap(settings.gateway_max_associations)),
                                   bind=settings.gateway_bind)
        self._server: Any = None
        self._ae: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.http: StatusServer | None = None
        self.last_sweep: dict[str, Any] = {}

    def start(self) -> int:
        """Prepare the spool, recover open studies, start listening and maintenance."""
        self.spool.ensure_layout()
        removed = self._remove_partials()
        self._recover_studies()
        if self.settings.gateway_http_port is not None:  # bind first: a taken port fails before any DICOM is accepted
            self.http = StatusServer(self, self.settings.gateway_http_bind, self.settings.gateway_http_port)
        ae = self._ae = build_ae(self.settings)
        self._server = self._listen(ae)
        self._server.gate = self.gate
        self._server.handshake_timeout = self.settings.gateway_acse_timeout
        self._server.read_timeout = self.settings.gateway_network_timeout
        ae._servers.append(self._server)  # as ae.start_server does; the server's shutdown() removes it
        threading.Thread(target=self._server.serve_forever, name="dicom-acceptor", daemon=True).start()
        self.port = int(self._server.server_address[1])
        log.info(
            "listening",
            extra={"port": self.port, "called_ae": self.settings.gateway_ae_title, "counts": {"partials_removed": removed}},
        )
        if not self.settings.gateway_allowed_calling_aes:
            log.warning("no calling-AE allow-list configured: any calling AE title is accepted")
        self._thread = threading.Thread(target=self._maintenance, name="gateway-maintenance", daemon=True)
        self._thread.start()
        if self.http is not None:
            self.http.start()
        return self.port

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.settings.tls_enabled:
            return None
        assert self.settings.gateway_tls_cert and self.settings.gateway_tls_key
        return server_context(self.settings.gateway_tls_cert, self.settings.gateway_tls_key, self.settings.gateway_tls_ca)

    def _listen(self, ae: Any) -> HandshakeInThreadServer:
        """The bound DICOM server; a failed bind names the address and port ("Address already in use" alone
        did not say which of the gateway's ports was taken)."""
        address = (self.settings.gateway_bind, self.settings.gateway_port)
        ssl_context = self._ssl_context()
        try:
            return ae.make_server(address, ssl_context=ssl_context, evt_handlers=self.scp.handlers() + self.gate.handlers(),
                                  server_class=HandshakeInThreadServer)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot listen on {endpoint(*address)} (TRIAGE_GATEWAY_BIND, TRIAGE_GATEWAY_PORT)", exc) from exc

    def _remove_partials(self) -> int:
        """Drop partial writes of a previous run (we are the only writer; a partial was never
        acknowledged). On a spool that cannot be written (read-only after I/O errors, full) the
        gateway starts anyway: it refuses senders as a transient condition and `/readyz` says why,
        where a failed start would be restarted without end, with no listener and no probes."""
        try:
            return self.spool.clean_incoming(older_than_s=0.0)
        except OSError as exc:
            log.warning("partial writes not removed at start", extra={"error": type(exc).__name__})
            return 0

    def _recover_studies(self) -> None:
        """Re-track studies left open by a previous run so their finalize is not lost."""
        latest: dict[str, float] = dict(self.spool.open_studies())
        for item in self.spool.iter_pending():
            latest[item.study_uid] = max(latest.get(item.study_uid, 0.0), item.mtime)
        unmarked = 0
        for uid, wall in latest.items():
            try:
                self.tracker.touch(uid, wall)  # quiet period restarts now: finalize late rather than early
            except OSError:  # the marker is restart bookkeeping; the study is tracked in memory already
                unmarked += 1
        if unmarked:
            log.warning("open-study markers not written at start (spool not writable?)",
                        extra={"counts": {"studies": unmarked}})

    def _track_again(self, study_uid: str, mtime: float) -> None:
        """A re-sent instance's study gets its finalize again after a quiet period: the first one may have
        been lost with the instance's message (Redis restarted without persistence), and the study then
        stayed not final for good. Finalize is idempotent and waits for the study's images."""
        try:
            self.tracker.touch(study_uid, mtime)
        except OSError:  # the open-study marker; the study is tracked in memory already
            pass

    def _look_at_broker(self) -> bool:
        """True when the broker has lost its queued messages (`BrokerWatch`): every pending instance and
        every finalize not known to have been taken is then due again at once, not 30 minutes later
        (instances) or never (a finalize whose study's images were all scored)."""
        look = self.watch.look()
        if look is None:
            return False
        if look.idle:
            self.tracker.taken_before(look.started)
        if not look.lost:
            return False
        self.outbox.forget_published()
        studies = self.tracker.finalize_again()
        log.warning("the broker lost its queued messages (restarted without persistence, failed over or flushed): "
                    "every pending instance is sent again now (the sweep's count follows), and the finalize of "
                    "studies not known to have been taken", extra={"counts": {"finalizes": studies}})
        return True

    def _maintenance(self) -> None:
        """Sweep immediately (start-up recovery), then every interval; finalize quiet studies."""
        next_sweep, next_clean = 0.0, time.monotonic() + STALE_PARTIAL_SECONDS
        first = True
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                restored = self.spool.restore_layout()
                if restored:
                    log.warning("spool folders were missing and have been recreated: %s", ", ".join(restored))
                if now >= next_sweep:
                    lost = self._look_at_broker()
                    # At start-up nothing is in flight, so everything pending is due (grace 0); so it is
                    # once the broker has lost its queue.
                    self.last_sweep = {**self.outbox.sweep(min_age_s=0.0 if first or lost else None,
                                                           on_published=self._track_again), "at": time.time()}
                    if self.last_sweep["queued"] or self.last_sweep["failed"]:
                        log.info("sweep", extra={"counts": self.last_sweep})
                    first = False
                    next_sweep = now + self.settings.gateway_sweep_interval_seconds
                self.tracker.finalize_due()
                if now >= next_clean:
                    # due again in an hour even if it fails: a spool remounted read-only made it fail, and be
                    # retried and logged, at every tick
                    next_clean = now + STALE_PARTIAL_SECONDS
                    self.spool.clean_incoming(STALE_PARTIAL_SECONDS)
            except Exception:  # never let maintenance die silently; log and keep going
                log.exception("maintenance iteration failed")
            self._stop.wait(TICK_SECONDS)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let running associations finish (bounded), stop maintenance."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        deadline = time.monotonic() + timeout
        while self._ae is not None and self._ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._ae is not None:
            for assoc in self._ae.active_associations:
                assoc.abort()  # what they already got Success for is on disk; the rest is re-sent
        if self._thread is not None:
            self._thread.join(timeout)
        self.watch.remove()
        self.publisher.close()
        if self.http is not None:  # last, so probes see "not live" while the listener drains
            self.http.stop()
            self.http = None
        log.info("stopped")

    @property
    def listening(self) -> bool:
        return self._server is not None and not self._stop.is_set()

    @property
    def maintenance_alive(self) -> bool:
        """The sweep/finalize thread runs; without it nothing pending is ever re-queued."""
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict[str, Any]:
        """In-process view for tests/benchmarks (the CLI health check probes from outside)."""
        return {
            "listening": self.listening,
            "port": self.port,
            "stored": self.scp.stored,
            "associations_rejected": dict(self.scp.rejected),
            "cstore_failures": dict(self.scp.store_failures),
            **self.gate.status(),
            "open_studies": len(self.tracker.open_studies()),
            "last_sweep": self.last_sweep,
            "broker_queue_losses": self.watch.losses,
            **self.spool.depth(),
        }
