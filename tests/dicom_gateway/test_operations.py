"""Concurrency, stable-study finalize, bad datasets, health check, DICOM TLS."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.dicom_gateway.conftest import small_dataset
from tests.dicom_gateway.helpers import (
    free_port,
    pending_files,
    queued_tasks,
    run_storescu,
    store_one,
    store_with_pynetdicom,
    wait_for,
)
from worker.contract import FINALIZE_STUDY, PROCESS_INSTANCE

pytestmark = pytest.mark.redis


@pytest.mark.dcmtk
def test_16_concurrent_storescu_associations_of_20(start_gateway, broker, dcmtk, make_study, tmp_path):
    storescu = dcmtk("storescu")
    gateway = start_gateway(gateway_max_associations=16)
    folders = []
    for i in range(16):
        folder = tmp_path / f"sender{i}"
        make_study(20, out=folder)
        folders.append(folder)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda f: run_storescu(storescu, gateway.port, [f], "+sd", calling=f"MOD{folders.index(f)}"), folders))
    for out in results:
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stderr.count("Received Store Response (Success)") == 20, out.stderr[-2000:]
    assert len(pending_files(gateway.spool.root)) == 320
    wait_for(lambda: len({t["args"][1] for t in queued_tasks(broker) if t["task"] == PROCESS_INSTANCE}) == 320, 20, what="320 messages")


def test_study_is_finalized_once_after_it_goes_quiet(start_gateway, broker, images):
    """Two stores 0.8 s apart under a 5 s quiet period: one finalize (with 1.5 s, a stall of half a second
    on a loaded machine split the study in two; the rule itself is tested on a fake clock in test_studies)."""
    gateway = start_gateway(gateway_stable_study_seconds=5)
    study = generate_uid()
    assert store_with_pynetdicom(gateway.port, [small_dataset(images, 0, study_uid=study)]) == [0]
    time.sleep(0.8)
    assert store_with_pynetdicom(gateway.port, [small_dataset(images, 1, study_uid=study)]) == [0]
    assert (gateway.spool.studies / study).exists(), "open study is persisted for restarts"
    finals = wait_for(lambda: [t for t in queued_tasks(broker) if t["task"] == FINALIZE_STUDY], 20, what="finalize")
    time.sleep(1.0)
    finals = [t for t in queued_tasks(broker) if t["task"] == FINALIZE_STUDY]
    assert [f["args"] for f in finals] == [[study]]
    assert finals[0]["kwargs"]["last_received_at"].endswith("+00:00")
    assert not (gateway.spool.studies / study).exists()


def test_open_study_survives_restart(start_gateway, broker, images, tmp_path):
    first = start_gateway(gateway_stable_study_seconds=60)
    study = generate_uid()
    assert store_with_pynetdicom(first.port, [small_dataset(images, 0, study_uid=study)]) == [0]
    first.stop(timeout=2)
    second = start_gateway(gateway_stable_study_seconds=1)
    assert second.spool.root == first.spool.root
    finals = wait_for(lambda: [t for t in queued_tasks(broker) if t["task"] == FINALIZE_STUDY], 5, what="finalize after restart")
    assert [f["args"] for f in finals] == [[study]]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_invalid_study_uid_is_refused_with_reason(gateway, broker, images):
    ds = small_dataset(images, 0)
    ds.StudyInstanceUID = "1.2.3/../../../etc"
    rsp = store_one(gateway.port, ds, calling_ae="BADSCU")
    assert rsp.Status == 0xC000
    assert "StudyInstanceUID" in rsp.ErrorComment
    assert pending_files(gateway.spool.root) == []
    assert not list(gateway.spool.root.rglob("etc*"))
    assert queued_tasks(broker) == []


def test_a_push_cut_inside_the_pixel_data_header_is_refused(gateway, broker, images, tmp_path, monkeypatch):
    """A pynetdicom SCU sends a file cut 4 bytes into its Pixel Data element's header: it was
    acknowledged with Success (pydicom stops silently short of 8 bytes) and spooled without an image."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes, not a re-encoding

    from worker.samples import save

    ds = small_dataset(images, 0)
    raw = save(ds, tmp_path / "whole.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[: raw.rindex(b"\xe0\x7f\x10\x00") + 4])
    rsp = store_one(gateway.port, ds, cut, calling_ae="CUTSCU")
    assert rsp.Status == 0xC000 and "truncated" in rsp.ErrorComment
    assert pending_files(gateway.spool.root) == [] and queued_tasks(broker) == []


def _health(settings, *extra: str, env_over: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update(
        TRIAGE_BROKER_URL=settings.broker_url,
        TRIAGE_SPOOL_DIR=str(settings.spool_dir),
        TRIAGE_GATEWAY_MIN_FREE_BYTES="0",
    )
    env.update(env_over or {})
    return subprocess.run(
        [sys.executable, "-m", "dicom_gateway.cli", "--port", str(settings.gateway_port), "health", *extra],
        capture_output=True, text=True, env=env, timeout=60,
    )


def test_health_command_reports_listener_spool_broker_disk(start_gateway, broker, images):
    gateway = start_gateway()
    store_with_pynetdicom(gateway.port, [small_dataset(images, 0)])
    settings = gateway.settings.model_copy(update={"gateway_port": gateway.port})
    out = _health(settings)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["healthy"] is True
    assert report["listener"]["ok"] and report["broker"]["ok"] and report["disk"]["ok"]
    assert report["spool"]["pending_instances"] == 1
    dead = _health(settings, env_over={"TRIAGE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert dead.returncode == 1
    assert json.loads(dead.stdout)["broker"]["ok"] is False
    gateway.stop(timeout=2)
    down = _health(settings)
    assert down.returncode == 1
    assert json.loads(down.stdout)["listener"]["ok"] is False


def _non_loopback_address() -> str | None:
    """This host's address on its default route (a UDP connect sends nothing), if it has one."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("198.51.100.1", 9))  # TEST-NET-2: only the route is looked up
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.parametrize("bind", ["host address", "127.0.0.2", "0.0.0.0"])
def test_health_command_checks_the_listener_at_its_bind_address(start_gateway, broker, bind):
    """With TRIAGE_GATEWAY_BIND set to one address (the hospital-facing interface), `dicom-gateway health`
    still echoed 127.0.0.1, where nothing listens: the listener read "connection refused" and the check
    unhealthy (the compose healthcheck restarting a working gateway) unless --host was passed."""
    if bind == "host address":
        bind = _non_loopback_address() or pytest.skip("this host has no non-loopback IPv4 address")
    gateway = start_gateway(gateway_bind=bind)
    settings = gateway.settings.model_copy(update={"gateway_port": gateway.port})
    out = _health(settings, env_over={"TRIAGE_GATEWAY_BIND": bind})
    report = json.loads(out.stdout)
    assert report["listener"]["ok"] is True and out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("busy", ["allow-list", "association limit"])
def test_health_at_a_specific_bind_address_keeps_the_probe_s_exceptions(start_gateway, broker, images, busy):
    """Bound to one address, the gateway is probed from that address, not loopback, and the probe's exceptions
    (past the IP allow-list, echo only; a probe slot at the association limit) were for loopback alone: with
    an allow-list of the hospital's networks, or with every association in use, a working gateway read dead."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    bind = _non_loopback_address() or pytest.skip("this host has no non-loopback IPv4 address")
    if busy == "allow-list":
        elsewhere = "198.51.100.0/24" if bind.startswith("192.0.2.") else "192.0.2.0/24"  # a TEST-NET, not us
        gateway = start_gateway(gateway_bind=bind, gateway_allowed_ips=[elsewhere])
    else:
        gateway = start_gateway(gateway_bind=bind, gateway_max_associations=1)
    settings = gateway.settings.model_copy(update={"gateway_port": gateway.port})
    held = None
    if busy == "association limit":
        ae = AE(ae_title="CR01")
        ae.add_requested_context(Verification)
        held = ae.associate(bind, gateway.port, ae_title="TRIAGE")
        assert held.is_established
    try:
        out = _health(settings, env_over={"TRIAGE_GATEWAY_BIND": bind})
    finally:
        if held is not None:
            held.release()
    report = json.loads(out.stdout)
    assert report["listener"]["ok"] is True and out.returncode == 0, out.stdout + out.stderr


def test_health_check_passes_an_ip_allow_list_from_loopback_for_c_echo_only(start_gateway, broker, images):
    """With TRIAGE_GATEWAY_ALLOWED_IPS set to the hospital's networks, `dicom-gateway health` (the
    compose healthcheck: C-ECHO from 127.0.0.1 as TRIAGE-HEALTH) was rejected, so the container
    was always unhealthy. Loopback now passes the IP list for that AE title only, and only to echo."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    gateway = start_gateway(gateway_allowed_ips=["10.20.0.0/16"], gateway_allowed_calling_aes=["CR01", "TRIAGE-HEALTH"])
    settings = gateway.settings.model_copy(update={"gateway_port": gateway.port})
    out = _health(settings)
    report = json.loads(out.stdout)
    assert report["listener"]["ok"] is True and out.returncode == 0, out.stdout + out.stderr
    with pytest.raises(ConnectionError):  # an allowed modality AE from a source outside the list
        store_with_pynetdicom(gateway.port, [small_dataset(images, 0)], calling_ae="CR01")
    ds = small_dataset(images, 1)
    ae = AE(ae_title="TRIAGE-HEALTH")
    ae.add_requested_context(Verification)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title="TRIAGE")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        rsp = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert rsp.Status == 0x0124 and "C-ECHO only" in rsp.ErrorComment
    assert pending_files(gateway.spool.root) == [] and queued_tasks(broker) == []


# ---- TLS ----------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A throwaway CA with a server and a client certificate (openssl CLI)."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.fail("openssl CLI not installed (.ci/run installs it)")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Test CA", cwd=d)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


def test_tls_mutual_auth(start_gateway, broker, images, pki):
    from dicom_gateway.tls import client_context

    gateway = start_gateway(gateway_tls_cert=pki["server_pem"], gateway_tls_key=pki["server_key"], gateway_tls_ca=pki["ca_pem"])
    ctx = client_context(pki["ca_pem"], pki["client_pem"], pki["client_key"])
    ds = small_dataset(images, 0)
    assert store_with_pynetdicom(gateway.port, [ds], tls_args=(ctx, None)) == [0]
    assert len(pending_files(gateway.spool.root)) == 1
    with pytest.raises(ConnectionError):  # plain TCP to a TLS port: no association
        store_with_pynetdicom(gateway.port, [small_dataset(images, 1)])
    no_cert = client_context(pki["ca_pem"])
    with pytest.raises(ConnectionError):  # TLS without a client certificate: refused by the handshake
        store_with_pynetdicom(gateway.port, [small_dataset(images, 2)], tls_args=(no_cert, None))
    assert len(pending_files(gateway.spool.root)) == 1


def test_tls_health_check_trusts_a_ca_issued_certificate_without_the_ca(start_gateway, broker, pki):
    """TLS without client certificates (no TRIAGE_GATEWAY_TLS_CA): the check trusts the gateway's own
    certificate. Issued by a hospital CA, it failed every check (OpenSSL looked for its issuer), so the
    compose gateway stayed unhealthy while modalities that trust the CA got in."""
    from dicom_gateway.health import echo

    gateway = start_gateway(gateway_tls_cert=pki["server_pem"], gateway_tls_key=pki["server_key"])
    settings = gateway.settings.model_copy(update={"gateway_port": gateway.port})
    assert echo(settings, "127.0.0.1")["ok"] is True


@pytest.mark.dcmtk
def test_tls_with_dcmtk_echoscu(start_gateway, broker, dcmtk, pki):
    gateway = start_gateway(gateway_tls_cert=pki["server_pem"], gateway_tls_key=pki["server_key"], gateway_tls_ca=pki["ca_pem"])
    out = subprocess.run(
        [dcmtk("echoscu"), "-v", "-aec", "TRIAGE", "+tls", str(pki["client_key"]), str(pki["client_pem"]),
         "+cf", str(pki["ca_pem"]), "127.0.0.1", str(gateway.port)],
        capture_output=True, text=True, timeout=30,
    )
    if "unrecognized option" in out.stderr or "TLS support not compiled" in out.stderr:
        pytest.skip("this DCMTK build has no TLS support")
    assert out.returncode == 0, out.stderr
    assert "Received Echo Response (Success)" in out.stderr + out.stdout


def test_a_failed_tls_handshake_is_logged_with_openssl_s_reason(start_gateway, broker, pki, tmp_path, caplog):
    """The log said only "SSLError": a sender without TLS, one without a client certificate and one whose
    certificate the CA did not issue all read the same."""
    import logging
    import socket
    import ssl
    import struct

    from dicom_gateway.tls import client_context

    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "foreign.key", "-out", "foreign.pem",
             "-days", "2", "-subj", "/CN=foreign", cwd=tmp_path)
    gateway = start_gateway(gateway_tls_cert=pki["server_pem"], gateway_tls_key=pki["server_key"], gateway_tls_ca=pki["ca_pem"])

    def attempt(context: ssl.SSLContext | None) -> None:
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=20)
        try:
            if context is None:  # plain DICOM to the TLS port: an A-ASSOCIATE-RQ header
                sock.sendall(struct.pack(">BBL", 0x01, 0, 68) + b"\x00" * 68)
                sock.recv(1024)
            else:
                with context.wrap_socket(sock) as tls:
                    tls.sendall(struct.pack(">BBL", 0x01, 0, 68))
                    tls.recv(1024)  # TLS 1.3: the server judges the client's certificate after the client's handshake
        except OSError:
            pass
        finally:
            sock.close()

    def reasons() -> list[str]:
        return [r.reason for r in caplog.records if r.getMessage() == "TLS handshake failed"]

    with caplog.at_level(logging.WARNING, logger="dicom_gateway"):
        for n, context in enumerate([None, client_context(pki["ca_pem"]),
                                     client_context(pki["ca_pem"], tmp_path / "foreign.pem", tmp_path / "foreign.key")], 1):
            attempt(context)
            wait_for(lambda: len(reasons()) == n, 20, what=f"handshake failure {n} logged")
    plain, no_cert, foreign = reasons()
    assert plain in ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "HTTP_REQUEST", "RECORD_LAYER_FAILURE"), plain
    assert no_cert == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert foreign.startswith("CERTIFICATE_VERIFY_FAILED: ") and "certificate" in foreign, foreign


def test_a_store_on_another_sop_classes_context_is_refused(gateway, broker, images, monkeypatch):
    """PS3.7: a C-STORE's SOP class is its presentation context's abstract syntax. A sender that
    negotiated CR and then sends CT on that context gets 0x0122, and nothing is queued."""
    from pynetdicom import AE
    from pynetdicom.association import Association

    ds = small_dataset(images, 0)
    cr_class = ds.SOPClassUID
    ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.2", "CT"  # CT Image Storage
    ae = AE(ae_title="BADSCU")
    ae.add_requested_context(cr_class, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title="TRIAGE")
    monkeypatch.setattr(Association, "_get_valid_context", lambda self, *args, **kwargs: assoc.accepted_contexts[0])
    try:
        rsp = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert rsp.Status == 0x0122 and "not negotiated" in rsp.ErrorComment
    assert pending_files(gateway.spool.root) == [] and queued_tasks(broker) == []


@pytest.mark.parametrize("tls", [False, True])
def test_a_sender_that_stalls_inside_a_pdu_is_dropped_after_the_network_timeout(start_gateway, broker, images, pki, tls):
    """pynetdicom reads a PDU it has begun with blocking calls on a socket without a timeout: a sender that
    stopped part-way (Wi-Fi lost mid-transfer) held its thread and an association slot for ever, enough of
    them refused every sender while the probes stayed green, and the process could not exit."""
    import socket
    import struct
    import time

    from dicom_gateway.tls import client_context

    tls_settings = dict(gateway_tls_cert=pki["server_pem"], gateway_tls_key=pki["server_key"]) if tls else {}
    gateway = start_gateway(gateway_network_timeout=1, gateway_acse_timeout=2, gateway_max_associations=1, **tls_settings)
    raw = socket.create_connection(("127.0.0.1", gateway.port))
    stalled = raw
    if tls:
        stalled = client_context(pki["server_pem"]).wrap_socket(raw)
    try:
        stalled.sendall(struct.pack(">BBL", 0x01, 0, 256) + b"\x00" * 10)  # an A-ASSOCIATE-RQ cut short, then silence
        stalled.settimeout(10)
        started = time.monotonic()
        try:
            assert stalled.recv(1024) == b""  # the gateway closes it ...
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 8  # ... after the network timeout, not never
        while gateway._ae.active_associations and time.monotonic() - started < 15:  # its thread ends at the ACSE timeout
            time.sleep(0.1)
        ctx = client_context(pki["server_pem"]) if tls else None
        assert store_with_pynetdicom(gateway.port, [small_dataset(images, 0)],
                                     tls_args=(ctx, None) if tls else None) == [0], "its slot is free again"
    finally:
        stalled.close()


def test_tls_a_silent_connection_does_not_block_other_senders_or_the_stop(start_gateway, broker, images, pki):
    """A peer that connects and never starts its TLS handshake (a half-open connection, a port
    scan) used to hold pynetdicom's accept loop: nobody else got in, and stop() hung."""
    import socket

    from dicom_gateway.tls import client_context

    gateway = start_gateway(gateway_tls_cert=pki["server_pem"], gateway_tls_key=pki["server_key"],
                            gateway_tls_ca=pki["ca_pem"], gateway_acse_timeout=60)
    ctx = client_context(pki["ca_pem"], pki["client_pem"], pki["client_key"])
    silent = socket.create_connection(("127.0.0.1", gateway.port))
    try:
        with ThreadPoolExecutor(1) as pool:  # bounded here, so the old behaviour fails instead of hanging
            store = pool.submit(store_with_pynetdicom, gateway.port, [small_dataset(images, 0)], tls_args=(ctx, None))
            assert store.result(timeout=20) == [0]
            stopped = pool.submit(gateway.stop, 2)
            stopped.result(timeout=20)
    finally:
        silent.close()


def test_sweep_refuses_a_spool_that_is_not_there(tmp_path):
    """From another working directory (the default spool is relative) or with a typo, sweep said
    {"queued": 0, "failed": 0, "pending": 0} and exit 0: nothing re-queued, and told all was well."""
    out = subprocess.run([sys.executable, "-m", "dicom_gateway.cli", "--spool-dir", str(tmp_path / "typo"), "sweep"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2 and "no spool at" in out.stderr and str(tmp_path / "typo") in out.stderr


def test_the_association_limit_admits_its_number_in_a_burst_says_why_and_lets_the_health_probe_in(
        start_gateway, broker, images, caplog):
    """pynetdicom's own limit counted every acceptor thread alive, those being rejected at the same
    moment included: at limit 2, bursts of 3 senders got 0 or 1 in, unlogged ("association requested"
    only), and the health probe was refused too ("rejected"), as if the gateway were dead."""
    import logging
    import threading

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from dicom_gateway.health import echo

    gateway = start_gateway(gateway_max_associations=2)
    hold, results, lock = threading.Event(), [], threading.Lock()
    all_answered = threading.Barrier(4)

    def sender() -> None:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", gateway.port, ae_title="TRIAGE")
        with lock:
            results.append(assoc)
        all_answered.wait(timeout=60)
        hold.wait(timeout=60)
        if assoc.is_established:
            assoc.release()

    with caplog.at_level(logging.INFO, logger="dicom_gateway"):
        for _round in range(3):
            results.clear()
            threads = [threading.Thread(target=sender) for _ in range(3)]
            for thread in threads:
                thread.start()
            all_answered.wait(timeout=60)
            try:
                assert sorted(a.is_established for a in results) == [False, True, True]
                [refused] = [a for a in results if not a.is_established]
                assert refused.is_rejected and refused.acceptor.primitive.result == 0x02  # transient: retry later
                probe = echo(gateway.settings.model_copy(update={"gateway_port": gateway.port}), "127.0.0.1")
                assert probe["ok"], probe  # at the limit, the probe still gets in
            finally:
                hold.set()
                for thread in threads:
                    thread.join(timeout=60)
                hold.clear()
                all_answered.reset()
    assert gateway.status()["associations_rejected"] == {"too_many_associations": 3}
    refusals = [r for r in caplog.records if r.getMessage() == "association rejected"]
    assert len(refusals) == 3 and all(r.reason == "too many associations (TRIAGE_GATEWAY_MAX_ASSOCIATIONS)" for r in refusals)


def test_a_rejected_health_check_says_how_it_was_rejected(start_gateway, broker):
    """A bare "rejected" read like an allow-list problem whatever the cause (a full spool disk, say)."""
    from dicom_gateway.health import echo

    gateway = start_gateway(gateway_allowed_calling_aes=["PACS"])
    settings = gateway.settings.model_copy(update={"gateway_port": gateway.port})
    probe = echo(settings, "127.0.0.1", calling_ae="INTRUDER")
    assert probe == {"ok": False, "error": "rejected (Rejected Permanent, Service User, Calling AE title not recognised)"}


@pytest.mark.parametrize("folder", ["incoming", "pending"])
def test_a_spool_folder_removed_while_running_is_recreated(start_gateway, broker, images, folder):
    """A clean-up job emptying incoming/ (or an operator's rm -r): every association was refused
    ("spool not writable") until a restart, while /healthz stayed 200."""
    import shutil

    gateway = start_gateway()
    assert store_with_pynetdicom(gateway.port, [small_dataset(images, 0)]) == [0]
    shutil.rmtree(gateway.spool.root / folder)
    assert store_with_pynetdicom(gateway.port, [small_dataset(images, 1)]) == [0]
    assert len(pending_files(gateway.spool.root)) == (1 if folder == "pending" else 2)


def test_spool_folders_are_not_recreated_on_another_file_system(start_gateway, broker, images):
    """A spool volume that went away leaves its mount point's folder behind: folders recreated there took
    instances (Success) that the worker, on the real volume, never saw. Refused as before instead."""
    import shutil

    gateway = start_gateway(gateway_sweep_interval_seconds=0.5)
    gateway.spool._root_device = -1  # what an unmounted volume's root looks like: another device
    shutil.rmtree(gateway.spool.root / "incoming")
    with pytest.raises(ConnectionError):
        store_with_pynetdicom(gateway.port, [small_dataset(images, 0)])
    assert not (gateway.spool.root / "incoming").exists()
    assert gateway.status()["associations_rejected"] == {"spool_not_writable": 1}


def test_health_probes_beyond_the_limit_are_few_and_echo_only(start_gateway, broker, images):
    """The loopback TRIAGE-HEALTH exception to the limit let any number of associations in, and they could
    store: behind a local relay every sender looks like loopback."""
    gateway = start_gateway(gateway_max_associations=1)
    ds = small_dataset(images, 0)
    with health_probe_associations(gateway.port, ds, 4) as held:
        assert [a.is_established for a in held] == [True, True, True, False]  # 1 counted + 2 probe slots
        assert held[0].send_c_store(ds).Status == 0x0000  # within the limit: an ordinary association
        assert all(a.send_c_echo().Status == 0x0000 for a in held[1:3])
        assert held[1].send_c_store(ds).Status != 0x0000  # beyond the limit: echo only


@contextlib.contextmanager
def health_probe_associations(port: int, ds, count: int):
    """`count` associations as TRIAGE-HEALTH, each offering Verification and `ds`'s storage context, made
    one after another and held open (released at the end)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from dicom_gateway.health import HEALTH_CALLING_AE

    held = []
    try:
        for _ in range(count):
            ae = AE(ae_title=HEALTH_CALLING_AE)
            ae.add_requested_context(Verification)
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            held.append(ae.associate("127.0.0.1", port, ae_title="TRIAGE"))
        yield held
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()


def test_a_store_on_a_health_probe_let_in_beyond_the_limit_is_refused_with_that_reason(start_gateway, broker, images):
    """A C-STORE on the echo-only probe slot (no IP allow-list configured at all) was answered 0x0124 "source IP
    not in allow-list": an admin chasing that looked for an allow-list the gateway does not have."""
    gateway = start_gateway(gateway_max_associations=1)
    ds = small_dataset(images, 0)
    with health_probe_associations(gateway.port, ds, 2) as held:
        assert [a.is_established for a in held] == [True, True]  # the limit's one, then a probe slot
        rsp = held[1].send_c_store(ds)
    assert rsp.Status == 0x0124
    assert "allow-list" not in rsp.ErrorComment and "MAX_ASSOCIATIONS" in rsp.ErrorComment, rsp.ErrorComment
    assert pending_files(gateway.spool.root) == []


def test_a_rejection_by_pynetdicom_s_own_thread_cap_is_logged_and_counted(start_gateway, broker, images, caplog):
    """Connections that never send a request hold an acceptor thread up to the ACSE timeout (a port
    scanner, a load balancer's TCP check); beyond pynetdicom's cap senders were refused, unlogged."""
    import logging
    import socket

    from dicom_gateway.scp import pynetdicom_thread_cap

    # one peer here (loopback) stands for many: the per-peer limit would close these at accept time
    gateway = start_gateway(gateway_max_associations=1, gateway_acse_timeout=30, gateway_max_connections_per_peer=1000)
    silent = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(pynetdicom_thread_cap(1) + 1)]
    try:
        wait_for(lambda: len(gateway._ae.active_associations) > pynetdicom_thread_cap(1), 20, what="acceptor threads")
        with caplog.at_level(logging.WARNING, logger="dicom_gateway"), pytest.raises(ConnectionError):
            store_with_pynetdicom(gateway.port, [small_dataset(images, 0)])
    finally:
        for sock in silent:
            sock.close()
    assert gateway.status()["associations_rejected"] == {"thread_cap": 1}
    assert any(r.getMessage() == "association rejected" and "cap of" in r.reason for r in caplog.records)


@pytest.mark.parametrize("min_age", ["nan", "inf", "-60"])
def test_sweep_refuses_a_min_age_that_is_not_a_finite_age(tmp_path, broker, redis_server, min_age):
    """`sweep --min-age nan` (or inf) compared no file as old enough: after a broker outage it queued nothing
    and said {"queued": 0, "failed": 0, ...} with exit 0, the backlog left as it was. A negative age is no age."""
    from dicom_gateway.spool import Spool

    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    spool.store([b"\x00" * 128 + b"DICM", b"not parsed here"], "1.2.3", "1.2.3.4")
    out = subprocess.run([sys.executable, "-m", "dicom_gateway.cli", "--spool-dir", str(spool.root), "sweep", "--min-age", min_age],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "TRIAGE_BROKER_URL": redis_server.url})
    assert out.returncode == 2 and "--min-age" in out.stderr, out.stdout + out.stderr
    assert queued_tasks(broker) == []


def test_health_refuses_a_calling_ae_that_is_not_an_ae_title(tmp_path):
    """An invalid --calling-ae (17 characters, say) ended in a traceback and exit 1, read by a container
    healthcheck as "gateway unhealthy"; it is a usage error (exit 2) that says what is wrong."""
    out = subprocess.run([sys.executable, "-m", "dicom_gateway.cli", "health", "--calling-ae", "TRIAGE-HEALTH-CHECK"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2 and "--calling-ae" in out.stderr and "Traceback" not in out.stderr, out.stderr
