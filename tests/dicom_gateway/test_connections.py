"""The listening sockets themselves: accept-time allow-list and per-peer limit, connections that never
send a request, listen backlog, and start-up errors that name the setting at fault."""

from __future__ import annotations

import json
import logging
import socket
import struct
from pathlib import Path

import pytest

from dicom_gateway.scp import pynetdicom_thread_cap
from tests.dicom_gateway.conftest import gateway_subprocess, small_dataset
from tests.dicom_gateway.helpers import free_port, store_with_pynetdicom, wait_for

pytestmark = pytest.mark.redis


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this host outside 127/8, to connect from as a host outside the allow-list
    (a UDP "connect" sends nothing; it only picks the source address of the default route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def closed_by_gateway(sock: socket.socket, timeout: float = 10.0) -> bool:
    """The gateway closed this connection (EOF or reset) before `timeout`; False if it kept it open."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_silent_connections_from_outside_the_allow_list_are_closed_at_accept(start_gateway, broker, caplog):
    """About a hundred silent connections from a host outside TRIAGE_GATEWAY_ALLOWED_IPS filled pynetdicom's
    cap until the ACSE timeout: every modality and the health probe were refused, and nothing was logged."""
    from dicom_gateway.health import echo

    source = non_loopback_ipv4()
    if source is None:
        pytest.skip("this host has no non-loopback IPv4 address to connect from")
    elsewhere = "10.98.0.0/16" if source.startswith("10.99.") else "10.99.0.0/16"  # a network this host is not in
    gateway = start_gateway(gateway_bind="0.0.0.0", gateway_allowed_ips=[elsewhere],
                            gateway_max_associations=1, gateway_acse_timeout=60)
    count = pynetdicom_thread_cap(1) + 1
    silent = []
    with caplog.at_level(logging.INFO, logger="dicom_gateway"):
        try:
            for _ in range(count):
                sock = socket.socket()
                silent.append(sock)
                sock.bind((source, 0))
                sock.connect((source, gateway.port))
            assert all(closed_by_gateway(sock) for sock in silent), "closed at once, not at the ACSE timeout"
            probe = echo(gateway.settings.model_copy(update={"gateway_port": gateway.port}), "127.0.0.1")
            assert probe["ok"], probe  # loopback still passes, as the health check
        finally:
            for sock in silent:
                sock.close()
    assert gateway.status()["connections_refused"] == {"ip_not_allowed": count}
    refusals = [r for r in caplog.records if r.getMessage() == "connection refused"]
    assert 1 <= len(refusals) <= 3 and refusals[0].peer == source  # throttled: a scanner cannot flood the log
    assert "TRIAGE_GATEWAY_ALLOWED_IPS" in refusals[0].reason


def test_one_peer_cannot_hold_more_than_its_share_of_connections(start_gateway, broker, images):
    """One allowed but misbehaving host (a sender opening associations in a loop and never releasing them)
    could hold every place under pynetdicom's cap and starve the other modalities."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    gateway = start_gateway(gateway_max_connections_per_peer=2)
    ae = AE(ae_title="GREEDY")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", gateway.port, ae_title="TRIAGE") for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        extra = socket.create_connection(("127.0.0.1", gateway.port))
        try:
            assert closed_by_gateway(extra), "a third connection from the same peer is closed at once"
        finally:
            extra.close()
    finally:
        for assoc in held:
            assoc.release()
    wait_for(lambda: not gateway._ae.active_associations, 20, what="the held associations to end")
    assert store_with_pynetdicom(gateway.port, [small_dataset(images, 0)]) == [0], "its share is free again"
    assert gateway.status()["connections_refused"] == {"peer_limit": 1}


def test_the_default_per_peer_limit_leaves_one_sender_every_association():
    from dicom_gateway.connections import per_peer_default

    for limit in (1, 16, 32, 100):
        assert limit < per_peer_default(pynetdicom_thread_cap(limit)) < pynetdicom_thread_cap(limit)


def test_connections_that_never_send_a_request_are_counted_and_logged(start_gateway, broker, caplog):
    """A port scan or a load balancer's TCP check held a thread (up to the ACSE timeout) and left no trace."""
    gateway = start_gateway(gateway_acse_timeout=1)
    with caplog.at_level(logging.INFO, logger="dicom_gateway"):
        socket.create_connection(("127.0.0.1", gateway.port)).close()  # connect, close
        silent = socket.create_connection(("127.0.0.1", gateway.port))  # connect, say nothing
        try:
            assert closed_by_gateway(silent, 20)
        finally:
            silent.close()
        wait_for(lambda: gateway.status()["connections_without_request"] == 2, 20, what="both counted")
    lines = [r for r in caplog.records if r.getMessage() == "connection closed without an association request"]
    assert lines and lines[0].peer == "127.0.0.1"


def test_connections_closed_without_a_request_do_not_count_against_their_peer(start_gateway, broker, images):
    """Their acceptor threads wait out the ACSE timeout and pynetdicom lists them as live: a load balancer's
    TCP check twice a second from the modality's address filled its share, and its stores were refused."""
    gateway = start_gateway(gateway_max_connections_per_peer=3, gateway_acse_timeout=60)
    for checks in range(1, 7):  # one after another, as a checker's interval spaces them
        socket.create_connection(("127.0.0.1", gateway.port)).close()
        wait_for(lambda: gateway.status()["connections_without_request"] == checks, 20, what="the check counted")
    assert store_with_pynetdicom(gateway.port, [small_dataset(images, 0)]) == [0]
    assert gateway.status()["connections_refused"] == {}


def test_log_throttle_lets_one_line_through_per_interval_and_counts_the_rest():
    from dicom_gateway.connections import LogThrottle

    now = [0.0]
    throttle = LogThrottle(10.0, clock=lambda: now[0])
    assert throttle.allow("a") == 0
    assert [throttle.allow("a") for _ in range(5)] == [None] * 5
    assert throttle.allow("b") == 0  # kinds are throttled apart
    now[0] = 10.0
    assert throttle.allow("a") == 5
    assert throttle.allow("a") is None


def _listen_backlog(sock: socket.socket) -> int:
    """The backlog a listening socket got (Linux TCP_INFO: tcpi_sacked is the listener's max backlog)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("<8B6I", info)[13]


def test_both_listeners_take_a_burst_into_their_backlog(start_gateway, broker):
    """socketserver's backlog of 5: a burst of 30 echoscu at once saw 1 s SYN retransmits."""
    gateway = start_gateway(gateway_http_port=0)
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    wanted = max(128, 2 * pynetdicom_thread_cap(gateway.settings.gateway_max_associations))
    assert _listen_backlog(gateway._server.socket) == min(wanted, somaxconn)
    assert _listen_backlog(gateway.http._httpd.socket) == min(128, somaxconn)


def _start_failure(env: dict[str, str], tmp_path: Path) -> tuple[int, dict]:
    proc = gateway_subprocess(env, tmp_path / "gateway.log")
    code = proc.wait(60)
    lines = [json.loads(line) for line in (tmp_path / "gateway.log").read_text().splitlines() if line.startswith("{")]
    [line] = [entry for entry in lines if entry["msg"] == "cannot start"]
    return code, line


@pytest.mark.parametrize("case", ["tls_key_missing", "dicom_port_taken", "http_port_taken"])
def test_a_start_up_error_names_the_setting_and_value_at_fault(redis_server, tmp_path, case):
    """"FileNotFoundError: [Errno 2] No such file or directory" and "Address already in use" said neither
    which file nor which port."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    taken_port = str(taken.getsockname()[1])
    env = {"TRIAGE_BROKER_URL": redis_server.url, "TRIAGE_SPOOL_DIR": str(tmp_path / "spool"),
           "TRIAGE_GATEWAY_BIND": "127.0.0.1", "TRIAGE_GATEWAY_PORT": str(free_port()), "TRIAGE_GATEWAY_MIN_FREE_BYTES": "0"}
    missing = tmp_path / "no-such.key"
    if case == "tls_key_missing":
        (tmp_path / "server.pem").write_text("not read: the key is missing\n")
        env.update(TRIAGE_GATEWAY_TLS_CERT=str(tmp_path / "server.pem"), TRIAGE_GATEWAY_TLS_KEY=str(missing))
        expected = [f"TRIAGE_GATEWAY_TLS_KEY={missing}", "No such file or directory"]
    elif case == "dicom_port_taken":
        env["TRIAGE_GATEWAY_PORT"] = taken_port
        expected = [f"127.0.0.1:{taken_port}", "TRIAGE_GATEWAY_PORT", "Address already in use"]
    else:
        env["TRIAGE_GATEWAY_HTTP_PORT"] = taken_port
        expected = [f"127.0.0.1:{taken_port}", "TRIAGE_GATEWAY_HTTP_PORT", "Address already in use"]
    try:
        code, line = _start_failure(env, tmp_path)
    finally:
        taken.close()
    assert code == 2
    assert all(text in line["error"] for text in expected), line
