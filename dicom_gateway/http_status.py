"""HTTP liveness, readiness, status and Prometheus metrics of a running gateway (no PHI).

Why HTTP beside `dicom-gateway health`: orchestrators (Kubernetes probes, load balancers)
and monitoring (Prometheus) speak HTTP, not DICOM, and must be able to tell "process up"
from "able to take studies". Everything served here is counts and states: no UIDs,
no patient data, nothing from a DICOM header.

    GET /healthz   200 while the listener and the maintenance thread run, else 503 (HEAD too)
    GET /readyz    200 when also the broker answers and the spool disk has room, else 503
    GET /status    the gateway's counters (JSON)
    GET /metrics   the same as Prometheus text
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from dicom_gateway.config import StartupError, endpoint
from dicom_gateway.connections import REFUSAL_KINDS
from dicom_gateway.health import broker_state, disk_state
from dicom_gateway.queue import TaskPublisher
from dicom_gateway.scp import CSTORE_FAILURES, REJECTION_KINDS, status_label
from dicom_gateway.tls import LISTEN_BACKLOG

if TYPE_CHECKING:
    from dicom_gateway.service import Gateway

log = logging.getLogger("dicom_gateway.http")


def liveness(gateway: Gateway) -> dict[str, Any]:
    alive = gateway.listening and gateway.maintenance_alive
    return {"ok": alive, "listening": gateway.listening, "maintenance": gateway.maintenance_alive}


def readiness(gateway: Gateway, probe: TaskPublisher) -> dict[str, Any]:
    """Liveness plus the same broker and disk checks as `dicom-gateway health`."""
    live = liveness(gateway)
    broker, disk = broker_state(probe), disk_state(gateway.settings, gateway.spool)
    report: dict[str, Any] = {**live, "ok": bool(live["ok"] and broker["ok"] and disk["ok"]),
                              "broker": broker["ok"], "disk_free_bytes": disk["free_bytes"], "disk_ok": disk["ok"],
                              "spool_writable": disk["writable"]}
    if not broker["ok"]:
        report["broker_error"] = broker["error"]
    return report


def prometheus_text(status: dict[str, Any], ready: dict[str, Any]) -> str:
    """Gauges and counters in the Prometheus exposition format (text 0.0.4)."""
    sweep = status.get("last_sweep") or {}
    samples = [
        ("triage_gateway_up", "gauge", "1 while the DICOM listener and maintenance run", int(bool(ready["listening"] and ready["maintenance"]))),
        ("triage_gateway_ready", "gauge", "1 when the broker answers and the spool disk has room", int(bool(ready["ok"]))),
        ("triage_gateway_broker_up", "gauge", "1 when the broker answered the last probe", int(bool(ready["broker"]))),
        ("triage_gateway_instances_stored_total", "counter", "instances stored and acknowledged since start", status["stored"]),
        ("triage_gateway_spool_pending_instances", "gauge", "instances in the spool's pending/ folder (queued or not) that the worker has not finished", status["pending_instances"]),
        ("triage_gateway_spool_pending_studies", "gauge", "studies with pending instances", status["pending_studies"]),
        ("triage_gateway_spool_incoming_partials", "gauge", "partial writes in progress or left by a crash", status["incoming_partials"]),
        ("triage_gateway_open_studies", "gauge", "studies waiting for their quiet period", status["open_studies"]),
        ("triage_gateway_last_sweep_failed", "gauge", "instances due for a publish that the last sweep left unqueued (broker down)", sweep.get("failed", 0)),
        ("triage_gateway_broker_queue_losses_total", "counter", "times the broker was found to have lost its queued messages (restart without persistence, failover, flush) since start; each time the gateway re-sent what was pending", status.get("broker_queue_losses", 0)),
        ("triage_gateway_spool_disk_free_bytes", "gauge", "free bytes on the spool's file system", ready["disk_free_bytes"]),
    ]
    lines = []
    for name, kind, text, value in samples:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += labelled("triage_gateway_associations_rejected_total", "associations refused since start, by reason",
                      "reason", status.get("associations_rejected", {}), {*REJECTION_KINDS.values(), "thread_cap", "other"})
    lines += labelled("triage_gateway_cstore_failures_total", "C-STOREs answered with a failure status since start, by status",
                      "status", status.get("cstore_failures", {}), [status_label(code) for code in CSTORE_FAILURES])
    lines += labelled("triage_gateway_connections_refused_total", "connections closed at accept time since start "
                      "(source outside the allow-list, or a peer holding its share of connections), by reason",
                      "reason", status.get("connections_refused", {}), REFUSAL_KINDS)
    name = "triage_gateway_connections_without_request_total"
    lines += [f"# HELP {name} connections that closed without sending an association request (scans, TCP checks, timeouts)",
              f"# TYPE {name} counter", f"{name} {status.get('connections_without_request', 0)}"]
    return "\n".join(lines) + "\n"


def labelled(name: str, text: str, label: str, counts: dict[str, int], known: Any) -> list[str]:
    """A counter with one series per label value: the known ones at 0 until they happen (so rate() works
    from the start), then any other value seen."""
    values = sorted({*known, *counts})
    return [f"# HELP {name} {text}", f"# TYPE {name} counter",
            *(f'{name}{{{label}="{value}"}} {counts.get(value, 0)}' for value in values)]


REQUEST_TIMEOUT_S = 10.0
"""Seconds a probe connection may stay silent: probes answer in milliseconds."""


def address_family(host: str) -> socket.AddressFamily:
    """The family of the bind address: http.server listens on IPv4 only, so TRIAGE_GATEWAY_HTTP_BIND=::
    could not start while the DICOM listener took `::`."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # "" (every IPv4 address, as before) or a name: what it resolves to first
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0] if host else socket.AF_INET


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG  # socketserver's 5 made a burst of scrapes wait out SYN retransmits

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = address_family(address[0])
        super().__init__(address, handler)


class StatusServer:
    """A small threaded HTTP server bound beside the DICOM listener (a connection that sends no request
    within `REQUEST_TIMEOUT_S` is closed)."""

    def __init__(self, gateway: Gateway, bind: str, port: int) -> None:
        self.gateway = gateway
        self.probe = TaskPublisher(gateway.settings)  # its own broker connection, not the SCP's
        try:
            self._httpd = _HTTPServer((bind, port), self._handler_class())
        except OSError as exc:  # a taken port, an address not on this host: say which
            self.probe.close()
            raise StartupError(f"cannot listen on {endpoint(bind, port)} (TRIAGE_GATEWAY_HTTP_BIND, TRIAGE_GATEWAY_HTTP_PORT)",
                               exc) from exc
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> int:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="gateway-http", daemon=True)
        self._thread.start()
        log.info("http status listening", extra={"port": self.port})
        return self.port

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self.probe.close()

    def respond(self, path: str) -> tuple[int, str, str]:
        """(HTTP status, content type, body) for a GET of `path`."""
        if path == "/healthz":
            live = liveness(self.gateway)
            return (200 if live["ok"] else 503), "application/json", json.dumps(live)
        if path == "/readyz":
            ready = readiness(self.gateway, self.probe)
            return (200 if ready["ok"] else 503), "application/json", json.dumps(ready)
        if path == "/status":
            return 200, "application/json", json.dumps(self.gateway.status(), default=str)
        if path == "/metrics":
            body = prometheus_text(self.gateway.status(), readiness(self.gateway, self.probe))
            return 200, "text/plain; version=0.0.4; charset=utf-8", body
        return 404, "application/json", json.dumps({"error": "not found", "paths": ["/healthz", "/readyz", "/status", "/metrics"]})

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT_S  # an idle or vanished client held a thread and a descriptor for ever

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self._answer(with_body=True)

            def do_HEAD(self) -> None:  # noqa: N802 (load-balancer health checks that use HEAD)
                self._answer(with_body=False)

            def _answer(self, *, with_body: bool) -> None:
                try:
                    code, content_type, body = server.respond(self.path.split("?", 1)[0])
                except Exception:  # a status page must answer, not hang the probe
                    log.exception("http status request failed")
                    code, content_type, body = 500, "application/json", json.dumps({"error": "internal"})
                payload = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if with_body:
                    self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: keep logs quiet
                return

        return Handler
