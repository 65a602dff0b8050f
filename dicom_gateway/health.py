"""Health check from the outside: listener (C-ECHO), spool depth, broker, free disk.

Why from the outside: a process that is "up" but whose listener thread died, or whose
spool is full, is exactly the failure a hospital notices only when studies go missing.
The check talks DICOM to the port like a modality would.
"""

from __future__ import annotations

import ipaddress
import shutil
import time
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_gateway.config import GatewaySettings
from dicom_gateway.queue import TaskPublisher
from dicom_gateway.spool import Spool
from dicom_gateway.tls import client_context

HEALTH_CALLING_AE = "TRIAGE-HEALTH"


def listener_host(bind: str) -> str:
    """Where the health check reaches the listener by default: the bind address itself when it is a
    specific one (a gateway bound to 10.1.2.3 does not answer on 127.0.0.1, so the check always read
    unhealthy), loopback when it listens on every address (`0.0.0.0`, `::`)."""
    try:
        unspecified = ipaddress.ip_address(bind.strip()).is_unspecified
    except ValueError:  # a host name
        unspecified = not bind.strip()
    return "127.0.0.1" if unspecified else bind.strip()


def rejection_text(assoc: Any) -> str:
    """The A-ASSOCIATE-RJ as DICOM words ("Rejected Transient, Service Provider (Presentation), Local limit
    exceeded"): a bare "rejected" read like an allow-list problem when the gateway was only full."""
    primitive = getattr(assoc.acceptor, "primitive", None)
    try:
        return f"{primitive.result_str}, {primitive.source_str}, {primitive.reason_str}"
    except (AttributeError, KeyError, ValueError):
        return "no reason received"


def echo(settings: GatewaySettings, host: str, *, calling_ae: str = HEALTH_CALLING_AE, timeout: float = 5.0) -> dict[str, Any]:
    """C-ECHO the listener; returns {"ok", "status"|"error", "latency_ms"}."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    tls_args = None
    if settings.tls_enabled:
        ca = settings.gateway_tls_ca or settings.gateway_tls_cert
        assert ca is not None
        tls_args = (client_context(ca, settings.gateway_tls_cert, settings.gateway_tls_key), None)
    started = time.monotonic()
    assoc = ae.associate(host, settings.gateway_port, ae_title=settings.gateway_ae_title, tls_args=tls_args)
    try:
        if not assoc.is_established:
            why = f"rejected ({rejection_text(assoc)})" if assoc.is_rejected else (
                "no association (connection refused, timed out or TLS handshake failed: see the gateway's log)"
                if tls_args else "no association (connection refused or timed out)")
            return {"ok": False, "error": why}
        status = assoc.send_c_echo()
        code = int(status.Status) if status is not None and "Status" in status else None
        return {"ok": code == 0, "status": code, "latency_ms": round((time.monotonic() - started) * 1000, 1)}
    finally:
        if assoc.is_established:
            assoc.release()


def broker_state(publisher: TaskPublisher) -> dict[str, Any]:
    """One connection attempt to the broker: {"ok"} plus the error when it fails."""
    ok = publisher.probe()
    return {"ok": ok, **({} if ok else {"error": publisher.last_error})}


def disk_state(settings: GatewaySettings, spool: Spool) -> dict[str, Any]:
    """Free space on the spool's file system against the admission threshold, and whether it can be written."""
    try:
        free = shutil.disk_usage(spool.root).free
    except OSError:
        free = 0
    writable = spool.writable()
    return {"ok": writable and free >= settings.gateway_min_free_bytes, "free_bytes": free,
            "min_free_bytes": settings.gateway_min_free_bytes, "writable": writable}


def check(settings: GatewaySettings, host: str | None = None, *, calling_ae: str = HEALTH_CALLING_AE) -> dict[str, Any]:
    """Full report; `healthy` is the AND of listener, broker and disk. `host` defaults to `listener_host`."""
    spool = Spool(settings.spool_dir)
    listener = echo(settings, listener_host(settings.gateway_bind) if host is None else host, calling_ae=calling_ae)
    publisher = TaskPublisher(settings)
    try:
        broker = broker_state(publisher)
    finally:
        publisher.close()
    disk = disk_state(settings, spool)
    try:
        depth: dict[str, Any] = spool.depth()
    except OSError as exc:
        depth = {"error": type(exc).__name__}
    return {
        "healthy": bool(listener["ok"] and broker["ok"] and disk["ok"]),
        "listener": listener,
        "broker": broker,
        "disk": disk,
        "spool": {"path": str(spool.root), **depth},
    }
