"""HTTP liveness/readiness/status/metrics of a real gateway, with a real broker and real stores."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from tests.dicom_gateway.conftest import gateway_subprocess, small_dataset
from tests.dicom_gateway.helpers import free_port, store_with_pynetdicom, wait_for

pytestmark = pytest.mark.redis


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_probes_status_and_metrics_follow_real_stores_without_phi(start_gateway, broker, images):
    gateway = start_gateway(gateway_http_port=0)
    port = gateway.http.port
    assert get(port, "/healthz")[0] == 200
    code, body = get(port, "/readyz")
    assert code == 200 and json.loads(body)["broker"] is True
    datasets = [small_dataset(images, i) for i in range(3)]
    for ds in datasets:
        ds.PatientID, ds.PatientName = "PHI-4711", "Doe^Jane"
    assert store_with_pynetdicom(gateway.port, datasets) == [0, 0, 0]
    status = json.loads(get(port, "/status")[1])
    assert status["stored"] == 3 and status["listening"] is True
    code, metrics = get(port, "/metrics")
    assert code == 200
    assert "triage_gateway_instances_stored_total 3" in metrics.splitlines()
    assert "triage_gateway_ready 1" in metrics.splitlines()
    assert 'triage_gateway_associations_rejected_total{reason="too_many_associations"} 0' in metrics.splitlines()
    bodies = [get(port, p)[1] for p in ("/healthz", "/readyz", "/status", "/metrics")]
    for ds in datasets:
        for text in bodies:
            assert ds.SOPInstanceUID not in text and ds.StudyInstanceUID not in text
    assert not any("PHI-4711" in text or "Doe" in text for text in bodies)
    assert get(port, "/nope")[0] == 404


def test_head_answers_like_get_without_a_body(start_gateway, broker):
    """Some load-balancer health checks use HEAD; it was answered 501 Unsupported method."""
    gateway = start_gateway(gateway_http_port=0)
    port = gateway.http.port
    for path in ("/healthz", "/readyz", "/status", "/metrics", "/nope"):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                code, headers, body = response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            code, headers, body = error.code, error.headers, error.read()
        assert code == get(port, path)[0] and body == b"", (path, code)
        assert int(headers["Content-Length"]) > 0 and headers["Content-Type"]


def test_pending_instances_help_says_what_the_gauge_counts(start_gateway, broker, images):
    """The gauge counts every file in pending/, queued ones too; its HELP said "not yet confirmed queued"."""
    gateway = start_gateway(gateway_http_port=0)
    assert store_with_pynetdicom(gateway.port, [small_dataset(images, 0)]) == [0]
    lines = get(gateway.http.port, "/metrics")[1].splitlines()
    assert "triage_gateway_spool_pending_instances 1" in lines
    [help_line] = [line for line in lines if line.startswith("# HELP triage_gateway_spool_pending_instances ")]
    assert "queued or not" in help_line and "not yet confirmed queued" not in help_line


def test_not_ready_when_the_broker_is_down_but_still_live(start_gateway):
    gateway = start_gateway(gateway_http_port=0, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    port = gateway.http.port
    assert get(port, "/healthz")[0] == 200
    code, body = get(port, "/readyz")
    report = json.loads(body)
    assert code == 503 and report["broker"] is False and report["broker_error"]
    assert "triage_gateway_broker_up 0" in get(port, "/metrics")[1].splitlines()


def test_not_ready_when_the_spool_disk_is_short(start_gateway, broker):
    gateway = start_gateway(gateway_http_port=0, gateway_min_free_bytes=2**62)
    code, body = get(gateway.http.port, "/readyz")
    assert code == 503 and json.loads(body)["disk_ok"] is False


def test_http_is_off_by_default_and_gone_after_stop(start_gateway, broker):
    assert start_gateway().http is None
    gateway = start_gateway(gateway_http_port=0)
    port = gateway.http.port
    gateway.stop(timeout=2)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)


@contextlib.contextmanager
def gateway_process(redis_url: str, tmp_path: Path, log: Path, dicom_port: int | None = None) -> Iterator[subprocess.Popen]:
    """`dicom-gateway run` configured from its environment, yielded once it answers /readyz; killed after."""
    http_port = free_port()
    env = {"TRIAGE_BROKER_URL": redis_url, "TRIAGE_SPOOL_DIR": str(tmp_path / "spool"),
           "TRIAGE_GATEWAY_PORT": str(dicom_port or free_port()), "TRIAGE_GATEWAY_BIND": "127.0.0.1",
           "TRIAGE_GATEWAY_MIN_FREE_BYTES": "0", "TRIAGE_GATEWAY_HTTP_PORT": str(http_port)}
    proc = gateway_subprocess(env, log)

    def ready() -> bool:
        try:
            return get(http_port, "/readyz")[0] == 200
        except OSError:
            return False

    try:
        wait_for(ready, 30, what="gateway process ready over HTTP")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_gateway_process_serves_probes_from_its_environment(redis_server, broker, tmp_path):
    with gateway_process(redis_server.url, tmp_path, tmp_path / "gateway.log") as proc:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def _signal_burst(pid: int, signum: int, seconds: float, gap: float) -> None:
    """Signals spaced in time: sent back to back, they merge into one pending signal."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        pause = time.perf_counter() + gap
        while time.perf_counter() < pause:  # busy: a sleep this short lasts far longer
            pass


def test_gateway_process_stops_when_sigterm_comes_twice(redis_server, broker, tmp_path):
    """`deploy/run_local.sh` (and a supervisor that repeats its stop) sends SIGTERM twice in a row. The
    handler set a threading.Event, whose lock the main thread briefly holds on waking from the first
    signal: the second handler then waited on that lock in the same thread for ever (2 starts in 40 hung
    with two `kill -TERM` from bash, "stopped" never logged). Ten starts, each given 20 ms of signals
    50 µs apart so that some land in that window (4 of 10 hung), must all exit."""
    for attempt in range(10):
        log = tmp_path / f"gateway{attempt}.log"
        with gateway_process(redis_server.url, tmp_path, log) as proc:
            _signal_burst(proc.pid, signal.SIGTERM, seconds=0.02, gap=0.00005)
            assert proc.wait(30) == 0, (attempt, log.read_text()[-2000:])
            assert '"stopped"' in log.read_text()


def test_an_idle_probe_connection_is_closed(start_gateway, broker, monkeypatch):
    """A connection that never sends its request (or whose client vanished mid-scrape) held a thread and a
    file descriptor for ever: 200 of them, 200 threads."""
    import socket

    import dicom_gateway.http_status as http_status

    monkeypatch.setattr(http_status, "REQUEST_TIMEOUT_S", 0.5)
    gateway = start_gateway(gateway_http_port=0)
    idle = socket.create_connection(("127.0.0.1", gateway.http.port))
    idle.settimeout(10)
    started = time.monotonic()
    try:
        assert idle.recv(1024) == b"" and time.monotonic() - started < 5
    finally:
        idle.close()


def test_the_http_listener_takes_an_ipv6_bind_address(start_gateway, broker):
    """http.server listens on IPv4 only: TRIAGE_GATEWAY_HTTP_BIND=:: could not start (the DICOM bind could)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    gateway = start_gateway(gateway_http_port=0, gateway_http_bind="::1")
    with urllib.request.urlopen(f"http://[::1]:{gateway.http.port}/healthz", timeout=10) as response:
        assert response.status == 200


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_refused_c_stores_are_counted_by_status(start_gateway, broker, images):
    """A modality told 0xC000 (or 0xA700: the spool could not be written) at every instance showed in no
    counter: /metrics looked like a quiet gateway."""
    import re

    from tests.dicom_gateway.helpers import store_one

    gateway = start_gateway(gateway_http_port=0)
    bad = small_dataset(images, 0)
    bad.StudyInstanceUID = "not a uid"
    assert store_one(gateway.port, bad).Status == 0xC000
    assert store_with_pynetdicom(gateway.port, [small_dataset(images, 1)]) == [0]
    status = json.loads(get(gateway.http.port, "/status")[1])
    assert status["cstore_failures"] == {"0xC000": 1} and status["stored"] == 1
    lines = get(gateway.http.port, "/metrics")[1].splitlines()
    assert 'triage_gateway_cstore_failures_total{status="0xC000"} 1' in lines
    assert 'triage_gateway_cstore_failures_total{status="0xA700"} 0' in lines
    assert 'triage_gateway_connections_refused_total{reason="ip_not_allowed"} 0' in lines
    typed = {line.split()[2]: line.split()[3] for line in lines if line.startswith("# TYPE ")}
    helped = {line.split()[2] for line in lines if line.startswith("# HELP ")}
    assert len(typed) == len([line for line in lines if line.startswith("# TYPE ")]), "one TYPE per metric"
    samples = [line for line in lines if not line.startswith("#")]
    assert len(samples) == len(set(line.rsplit(" ", 1)[0] for line in samples)), "no series twice"
    for line in samples:
        match = re.fullmatch(r'([a-z_]+)(\{[a-z_]+="[^"\\]*"\})? (\d+)', line)
        assert match and match[1] in typed and match[1] in helped, line
        assert typed[match[1]] == "gauge" or match[1].endswith("_total"), line


def test_pynetdicom_lines_do_not_repeat_a_uid_field_holding_identifiers(redis_server, broker, images, tmp_path):
    """A sender that writes a record number or a name into the SOP Instance UID: the gateway's own refusal
    leaves the value out, but pynetdicom's warnings ("Non-conformant 'Affected SOP Instance UID' value
    '...'"), which the JSON log passes on, quoted it. A real gateway process, its log as written."""
    ds = small_dataset(images, 0)
    ds.SOPInstanceUID = "PHI-4711 Doe^Jane"
    log, port = tmp_path / "gateway.log", free_port()
    with gateway_process(redis_server.url, tmp_path, log, dicom_port=port):
        assert store_with_pynetdicom(port, [ds]) != [0]
    written = log.read_text()
    assert "pynetdicom" in written and "value (not shown)" in written  # pynetdicom did warn
    assert "PHI-4711" not in written and "Doe" not in written


@pytest.mark.parametrize("message, shown", [
    ("Non-conformant 'Affected SOP Instance UID' value 'Doe^Jane'", "Non-conformant 'Affected SOP Instance UID' value (not shown)"),
    ("Invalid 'Affected SOP Instance UID' value 'Doe^Jane' - must not exceed 64 characters",
     "Invalid 'Affected SOP Instance UID' value (not shown) - must not exceed 64 characters"),
    ("Invalid value for VR UI: 'Doe^Jane'. Please see <...>", "Invalid value for VR UI: (not shown). Please see <...>"),
    ("Invalid value: b'Doe^Jane'", "Invalid value: (not shown)"),
    ("Non-conformant 'Affected SOP Instance UID' value '1.2.O'Brien^Sean'",
     "Non-conformant 'Affected SOP Instance UID' value (not shown)"),
    ("Association Aborted", "Association Aborted"),
])
def test_values_quoted_by_dicom_libraries_are_not_shown(message, shown):
    from dicom_gateway.logs import redact_values

    assert redact_values(message) == shown
