"""DICOM TLS (PS3.15 Annex B) server context for the listener.

Why a CA setting: with `TRIAGE_GATEWAY_TLS_CA` the gateway demands a client certificate
signed by that CA (mutual TLS, the usual hospital set-up); without it, TLS only
encrypts and authenticates the gateway to the sender.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path

from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)


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
    """Client context trusting `ca` (used by the health check's C-ECHO and by tests).

    `ca` may be the server's own certificate rather than a CA (the health check without
    `TRIAGE_GATEWAY_TLS_CA`): partial chains are accepted, so that certificate is itself the trust
    anchor even when a hospital CA issued it, whose root the check does not have; without that
    flag OpenSSL looked for the issuer and every check of such a gateway failed."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False  # DICOM peers are addressed by IP; the CA pins identity
    if cert is not None and key is not None:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return context


class HandshakeInThreadServer(ThreadedAssociationServer):
    """pynetdicom's server, with the TLS handshake moved out of its single accept loop and a read
    timeout on every connection (`read_timeout`).

    pynetdicom wraps each accepted socket (handshake included) in the loop that accepts
    connections, with no timeout: one peer that connects and sends nothing (a half-open
    connection after a network drop, a port scan) stopped every other sender and made SIGTERM
    hang. Here the loop only wraps the socket; the handshake runs in the connection's own
    thread, bounded by `handshake_timeout` (the ACSE timeout), as storescp and Orthanc do.
    """

    handshake_timeout: float = 30.0
    read_timeout: float = 60.0
    """Longest silence inside a PDU (the network timeout): pynetdicom reads a PDU it has begun with blocking
    calls, so a sender that stopped part-way (a DR unit losing its Wi-Fi, a VPN drop) held its thread and
    an association slot for ever, and SIGTERM could not end the process. With a socket timeout the read
    fails, and pynetdicom aborts that association."""
    daemon_threads = True  # stop() must not wait out a stalled handshake; it bounds associations itself

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client_socket, address = self.socket.accept()  # type: ignore[union-attr]
        client_socket.settimeout(self.read_timeout)
        client_socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a peer that vanished is found too
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(client_socket, server_side=True,
                                                         do_handshake_on_connect=False)
        return client_socket, address

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.handshake_timeout)
                request.do_handshake()
                request.settimeout(self.read_timeout)
            except OSError as exc:  # ssl.SSLError and socket timeouts included
                log.warning("TLS handshake failed", extra={"peer": client_address[0], "error": type(exc).__name__})
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)
