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
from typing import Any, Callable

from pynetdicom.transport import ThreadedAssociationServer

from dicom_gateway.config import StartupError
from dicom_gateway.connections import ConnectionGate

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 128
"""Least listen backlog of the DICOM and HTTP listeners: socketserver's default of 5 made a burst of
senders (30 echoscu at once) wait out 1 s SYN retransmits, although the gateway had room for them."""


def server_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """TLS >= 1.2 server context; raises StartupError naming the setting and file at fault."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    files = {"TRIAGE_GATEWAY_TLS_CERT": cert, "TRIAGE_GATEWAY_TLS_KEY": key, "TRIAGE_GATEWAY_TLS_CA": ca}
    for setting, path in files.items():
        if path is not None:
            _check_readable(setting, path)
    _load(f"TRIAGE_GATEWAY_TLS_CERT={cert}, TRIAGE_GATEWAY_TLS_KEY={key}",
          lambda: context.load_cert_chain(certfile=str(cert), keyfile=str(key)))
    if ca is not None:
        _load(f"TRIAGE_GATEWAY_TLS_CA={ca}", lambda: context.load_verify_locations(cafile=str(ca)))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _check_readable(setting: str, path: Path) -> None:
    """OpenSSL's own error for a missing file names neither the file nor which of the three it is."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise StartupError(f"{setting}={path}", exc) from exc


def _load(what: str, load: Callable[[], Any]) -> None:
    try:
        load()
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: a bad PEM, a key not matching its cert
        raise StartupError(what, exc) from exc


def handshake_error(exc: BaseException) -> str:
    """Why a TLS handshake failed, in OpenSSL's words: the exception's class alone ("SSLError") did not
    tell a sender without TLS (WRONG_VERSION_NUMBER) from one without a client certificate
    (PEER_DID_NOT_RETURN_A_CERTIFICATE) or with an expired or foreign one (CERTIFICATE_VERIFY_FAILED:
    certificate has expired / unable to get local issuer certificate)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"{exc.reason}: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, TimeoutError):
        return "no handshake within the ACSE timeout (TRIAGE_GATEWAY_ACSE_TIMEOUT)"
    if isinstance(exc, OSError) and exc.strerror:  # a reset or refused connection
        return exc.strerror
    return str(exc) or type(exc).__name__


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
    gate: ConnectionGate | None = None
    """Accept-time allow-list and per-peer limit (`verify_request`); set before `serve_forever`."""

    def server_activate(self) -> None:
        """Listen with room for a burst as large as the connections the gateway may hold at once
        (pynetdicom's cap, `ae.maximum_associations`), and at least `LISTEN_BACKLOG`."""
        self.request_queue_size = max(LISTEN_BACKLOG, 2 * self.ae.maximum_associations)
        super().server_activate()

    def verify_request(self, request, client_address) -> bool:  # type: ignore[no-untyped-def]
        """socketserver's hook between accept and thread: a refused connection is closed here, before any
        thread or Association exists, so it holds no place under pynetdicom's cap."""
        if self.gate is None:
            return True
        return self.gate.admit(_connection(client_address), self._live_connections)

    def _live_connections(self) -> list[tuple[str, int]]:
        return [(str(assoc.requestor.address), int(assoc.requestor.port)) for assoc in self.active_associations]

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread (RuntimeError: can't start new thread): the gate must not keep it
            self._started(client_address)
            raise

    def _started(self, client_address) -> None:  # type: ignore[no-untyped-def]
        if self.gate is not None:
            self.gate.started(_connection(client_address))

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client_socket, address = self.socket.accept()  # type: ignore[union-attr]
        client_socket.settimeout(self.read_timeout)
        client_socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a peer that vanished is found too
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(client_socket, server_side=True,
                                                         do_handshake_on_connect=False)
        return client_socket, address

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        """The handshake, then pynetdicom's Association (which runs in a thread of its own)."""
        try:
            if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
                return
            super().process_request_thread(request, client_address)
        finally:  # the Association thread, if any, is alive now and counted as such
            self._started(client_address)

    def _handshake(self, request: ssl.SSLSocket, client_address) -> bool:  # type: ignore[no-untyped-def]
        try:
            request.settimeout(self.handshake_timeout)
            request.do_handshake()
            request.settimeout(self.read_timeout)
            return True
        except OSError as exc:  # ssl.SSLError and socket timeouts included
            log.warning("TLS handshake failed",
                        extra={"peer": client_address[0], "error": type(exc).__name__, "reason": handshake_error(exc)})
            self.shutdown_request(request)
            return False


def _connection(client_address) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    return str(client_address[0]), int(client_address[1])
