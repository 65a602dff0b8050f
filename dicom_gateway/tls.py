"""DICOM TLS (PS3.15 Annex B) server context for the listener.

Why a CA setting: with `TRIAGE_GATEWAY_TLS_CA` the gateway demands a client certificate
signed by that CA (mutual TLS, the usual hospital set-up); without it, TLS only
encrypts and authenticates the gateway to the sender.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """TLS >= 1.2 server context; raises OSError/ssl.SSLError with the file at fault."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Client context trusting `ca` (used by the health check's C-ECHO and by tests)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.check_hostname = False  # DICOM peers are addressed by IP; the CA pins identity
    if cert is not None and key is not None:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return context
