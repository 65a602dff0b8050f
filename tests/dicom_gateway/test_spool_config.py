"""Spool naming/atomicity and settings parsing (pure-Python parts, real file system)."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from dicom_gateway.config import GatewaySettings
from dicom_gateway.spool import InvalidUIDError, Spool, validate_uid


@pytest.mark.parametrize(
    "bad",
    ["", "  ", "../../etc/passwd", "1.2/../../x", "1.2.3.", ".1.2", "1..2", "1.2.a", "1.2\x003", "1" * 65, None],
)
def test_invalid_uids_never_become_paths(bad):
    with pytest.raises(InvalidUIDError):
        validate_uid(bad)


def test_valid_uid_is_normalised():
    assert validate_uid("1.2.840.10008.5.1.4.1.1.1\x00") == "1.2.840.10008.5.1.4.1.1.1"
    assert validate_uid("1" * 64) == "1" * 64


def test_store_is_atomic_and_replaces_duplicates(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    rel = spool.store([b"first"], "1.2.3", "1.2.3.4")
    assert rel == "pending/1.2.3/1.2.3.4.dcm"
    assert spool.store([b"second", memoryview(b"-part")], "1.2.3", "1.2.3.4") == rel
    assert (spool.root / rel).read_bytes() == b"second-part"
    assert list(spool.incoming.iterdir()) == []
    assert [p.relpath for p in spool.iter_pending()] == [rel]


def test_failed_store_leaves_nothing(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    (spool.pending / "1.2.3").write_text("a file where the study directory should be")
    with pytest.raises(OSError):
        spool.store([b"data"], "1.2.3", "1.2.3.4")
    assert list(spool.incoming.iterdir()) == []


def test_iter_pending_ignores_foreign_entries(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    spool.store([b"x"], "1.2", "1.2.5")
    (spool.pending / "1.2" / "notes.txt").write_text("x")
    (spool.pending / "junk").mkdir()
    (spool.pending / "junk" / "1.2.dcm").write_text("x")
    assert [p.sop_uid for p in spool.iter_pending()] == ["1.2.5"]
    assert spool.depth() == {"pending_instances": 1, "pending_studies": 1, "incoming_partials": 0}


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("TRIAGE_GATEWAY_ALLOWED_CALLING_AES", "MODALITY1, PACS")
    monkeypatch.setenv("TRIAGE_GATEWAY_ALLOWED_IPS", '["10.0.0.0/8", "127.0.0.1"]')
    monkeypatch.setenv("TRIAGE_GATEWAY_PORT", "104")
    settings = GatewaySettings()
    assert settings.gateway_allowed_calling_aes == ["MODALITY1", "PACS"]
    assert [str(n) for n in settings.networks()] == ["10.0.0.0/8", "127.0.0.1/32"]
    assert settings.gateway_port == 104
    with pytest.raises(ValidationError):
        settings.gateway_port = 1  # frozen


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TRIAGE_GATEWAY_AE_TITLE", "THIS-TITLE-IS-TOO-LONG"),
        ("TRIAGE_GATEWAY_ALLOWED_IPS", "not-an-ip"),
        ("TRIAGE_GATEWAY_TLS_CERT", "/tmp/cert.pem"),  # without a key
        ("TRIAGE_GATEWAY_PORT", "70000"),
        ("TRIAGE_GATEWAY_MAX_PDU", "1"),  # senders could not send P-DATA into it: every C-STORE failed
        ("TRIAGE_GATEWAY_LOG_LEVEL", "verbose"),  # crashed at start-up with a traceback
        ("TRIAGE_GATEWAY_SWEEP_INTERVAL_SECONDS", "inf"),  # silently turned recovery off
        ("TRIAGE_GATEWAY_ACSE_TIMEOUT", "inf"),
        ("TRIAGE_GATEWAY_BROKER_TIMEOUT_SECONDS", "Infinity"),
        ("TRIAGE_GATEWAY_STABLE_STUDY_SECONDS", "nan"),
        ("TRIAGE_GATEWAY_SWEEP_GRACE_SECONDS", "nan"),
        ("TRIAGE_GATEWAY_MAX_PDU", str(2**32)),  # the 4-byte field: every association's answer failed
        ("TRIAGE_GATEWAY_ACSE_TIMEOUT", "1e10"),  # beyond threading's limit: OverflowError per association
        ("TRIAGE_GATEWAY_NETWORK_TIMEOUT", "1e10"),  # ... or at start, with a traceback
        ("TRIAGE_GATEWAY_BROKER_TIMEOUT_SECONDS", "1e10"),
        ("TRIAGE_GATEWAY_MAX_ASSOCIATIONS", "1001"),  # 1e9 failed listen() with OverflowError, naming no setting
        ("TRIAGE_BROKER_URL", "127.0.0.1:6379/0"),  # no scheme: Success to senders, nothing ever queued
    ],
)
def test_bad_settings_fail_with_the_variable_named(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        GatewaySettings()


def test_an_association_limit_beyond_its_bound_is_refused_naming_the_variable(tmp_path):
    """TRIAGE_GATEWAY_MAX_ASSOCIATIONS=1000000000 passed the settings check and failed in listen() (a backlog
    beyond a C int): "cannot start ... OverflowError: signed integer is greater than maximum", with neither
    the variable nor its value. It is refused as a setting, the variable named, and the bound itself starts."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update(TRIAGE_GATEWAY_MAX_ASSOCIATIONS="1000000000", TRIAGE_GATEWAY_PORT="0", TRIAGE_GATEWAY_BIND="127.0.0.1",
               TRIAGE_SPOOL_DIR=str(tmp_path / "spool"), TRIAGE_BROKER_URL="redis://127.0.0.1:1/0")
    out = subprocess.run([sys.executable, "-m", "dicom_gateway.cli", "run"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 2 and "TRIAGE_GATEWAY_MAX_ASSOCIATIONS" in out.stdout + out.stderr, out.stdout + out.stderr
    assert "OverflowError" not in out.stdout + out.stderr
    from dicom_gateway.config import MAX_ASSOCIATIONS

    assert GatewaySettings(gateway_max_associations=MAX_ASSOCIATIONS).gateway_max_associations == MAX_ASSOCIATIONS


def test_log_level_and_unlimited_pdu_are_accepted(monkeypatch):
    monkeypatch.setenv("TRIAGE_GATEWAY_LOG_LEVEL", "warning")
    monkeypatch.setenv("TRIAGE_GATEWAY_MAX_PDU", "0")
    settings = GatewaySettings()
    assert settings.gateway_log_level == "WARNING" and settings.gateway_max_pdu == 0


@pytest.fixture
def tmpfs_spool(tmp_path):
    """A spool on its own tmpfs and a function that remounts it read-only, as a disk is after I/O
    errors (needs root to mount; CI runs as root)."""
    import subprocess

    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        spool = Spool(mount / "spool")
        spool.ensure_layout()
        assert spool.writable()
        yield spool, lambda: subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def read_only_spool(tmpfs_spool):
    spool, make_read_only = tmpfs_spool
    make_read_only()
    return spool


def test_a_gateway_starts_on_a_read_only_spool_and_refuses_senders_as_transient(tmpfs_spool, start_gateway, broker):
    """Start-up wrote a study marker for every pending study and removed partial writes; on a
    read-only spool that raised, so the gateway exited and compose restarted it without end, with
    no listener and no probes. It must come up, refuse associations, and keep what is pending."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    spool, make_read_only = tmpfs_spool
    relpath = spool.store([b"\x00" * 128 + b"DICM", b"not parsed here"], "1.2.3", "1.2.3.4")
    (spool.incoming / "partial.tmp").write_bytes(b"half")
    make_read_only()

    gateway = start_gateway(spool_dir=spool.root)

    assert gateway.listening and gateway.tracker.open_studies() == ["1.2.3"]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title="TRIAGE")
    assert assoc.is_rejected and assoc.acceptor.primitive.result == 0x02  # rejected-transient
    assert (spool.root / relpath).is_file() and (spool.incoming / "partial.tmp").is_file()


def test_a_read_only_spool_is_unhealthy_and_refuses_associations(read_only_spool):
    """Free space alone kept /readyz and `dicom-gateway health` green while every C-STORE failed."""
    from dicom_gateway.health import disk_state
    from dicom_gateway.scp import RJ_LOCAL_LIMIT, StoreSCP

    settings = GatewaySettings(spool_dir=read_only_spool.root, gateway_min_free_bytes=0)
    assert not read_only_spool.writable()
    state = disk_state(settings, read_only_spool)
    assert state["free_bytes"] > 0 and not state["writable"] and not state["ok"]
    scp = StoreSCP(settings, read_only_spool, outbox=None, tracker=None)  # type: ignore[arg-type]
    reason, rejection = scp._policy("MODALITY", settings.gateway_ae_title, "127.0.0.1")
    assert reason is not None and "not writable" in reason and rejection == RJ_LOCAL_LIMIT


def test_an_empty_value_means_unset(monkeypatch, tmp_path):
    """`KEY=` (as deploy/triage.env writes ALLOWED_IPS) is "unset": an empty HTTP port failed to parse
    (exit 2, although the env file says "unset to turn off"), and empty TLS paths became "." (TLS on,
    then IsADirectoryError at start-up)."""
    for name in ("TRIAGE_GATEWAY_HTTP_PORT", "TRIAGE_GATEWAY_TLS_CERT", "TRIAGE_GATEWAY_TLS_KEY", "TRIAGE_GATEWAY_PORT"):
        monkeypatch.setenv(name, "")
    settings = GatewaySettings()
    assert settings.gateway_http_port is None and not settings.tls_enabled and settings.gateway_port == 11112
    for name in [n for n in os.environ if n.startswith("TRIAGE_")]:
        monkeypatch.delenv(name)
    env_file = tmp_path / "site.env"
    env_file.write_text("TRIAGE_GATEWAY_HTTP_PORT=\nTRIAGE_GATEWAY_TLS_CERT=\nTRIAGE_GATEWAY_TLS_KEY=\nTRIAGE_GATEWAY_ALLOWED_IPS=\n")
    settings = GatewaySettings(_env_file=env_file)
    assert settings.gateway_http_port is None and not settings.tls_enabled and settings.networks() == []



def test_one_long_association_cannot_take_the_spool_below_its_free_space_floor(tmpfs_spool, start_gateway, broker, images):
    """MIN_FREE_BYTES was checked only when an association started: a PACS pushing a backlog over one
    association filled the disk to its last block (the database beside the spool too), and only the
    instance that met ENOSPC was refused. Each C-STORE that would cross the floor is refused with
    0xA700 (Out of Resources, PS3.4 B.2.3) and the reason; what was acknowledged is on disk."""
    import shutil

    from tests.dicom_gateway.conftest import small_dataset
    from tests.dicom_gateway.helpers import pending_files, store_one, store_with_pynetdicom

    spool, _ = tmpfs_spool
    floor = 4 << 20  # of the tmpfs's 8 MiB
    gateway = start_gateway(spool_dir=spool.root, gateway_min_free_bytes=floor)
    datasets = [small_dataset(images, i, size=(512, 512)) for i in range(16)]  # about 512 KiB each
    outcome: dict[str, int] = {}
    codes = store_with_pynetdicom(gateway.port, datasets, on_status=lambda ds, code: outcome.update({ds.SOPInstanceUID: code}))

    assert 0 in codes and codes[-1] == 0xA700 and set(codes) == {0, 0xA700}, codes
    assert shutil.disk_usage(spool.root).free >= floor
    assert {p.stem for p in pending_files(spool.root)} == {uid for uid, code in outcome.items() if code == 0}
    assert gateway.status()["cstore_failures"] == {"0xA700": codes.count(0xA700)}
    rsp = store_one(gateway.port, small_dataset(images, 20, size=(512, 512)))  # the floor is not reached yet: let in
    assert rsp.Status == 0xA700 and "MIN_FREE_BYTES" in rsp.ErrorComment  # the sender is told why


def test_a_partial_that_cannot_be_removed_is_tried_again_an_hour_later_not_at_every_tick(
        tmpfs_spool, start_gateway, broker, monkeypatch, caplog):
    """On a spool remounted read-only (the gateway runs on, refusing senders) the hourly removal of stale
    partial writes failed, and was tried again, with a "maintenance iteration failed" error, at every
    0.5 s tick until the file system came back: 7200 lines an hour. It is tried once per interval."""
    import logging
    import time

    from dicom_gateway import service

    spool, make_read_only = tmpfs_spool
    partial = spool.incoming / "left-by-a-crash.part"
    partial.write_bytes(b"half")
    os.utime(partial, (time.time() - 7200, time.time() - 7200))
    make_read_only()
    monkeypatch.setattr(service, "STALE_PARTIAL_SECONDS", 2.0)  # the hour, shortened

    with caplog.at_level(logging.WARNING, logger="dicom_gateway"):
        gateway = start_gateway(spool_dir=spool.root)
        time.sleep(5.0)  # two shortened hours and more
    failures = [r for r in caplog.records if r.getMessage() == "maintenance iteration failed"]
    skipped = [r for r in caplog.records if r.getMessage() == "partial writes that could not be removed were skipped"]
    assert gateway.maintenance_alive and partial.exists()
    assert failures == [] and len(skipped) == 1, [r.getMessage() for r in caplog.records]  # said once, not every try
    assert skipped[0].error == "OSError" and skipped[0].counts == {"skipped": 1}


def test_a_partial_write_clean_up_skips_an_entry_it_cannot_remove_and_removes_the_rest(tmp_path, start_gateway,
                                                                                       broker, caplog):
    """A folder in incoming/ (made by hand, or by a clean-up job) ended the removal of stale partial writes
    at the first attempt to unlink it: every partial listed after it stayed for good, at start-up and at
    every hourly clean-up. It is skipped (logged once, without its name) and the rest are removed."""
    import logging
    import time

    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    stray = spool.incoming / "DOE^JOHN 1961"  # a name that must not reach the log
    stray.mkdir()
    old = time.time() - 7200
    partials = [spool.incoming / f"1.2.3.{i}.{i:032x}.part" for i in range(20)]
    for path in partials:
        path.write_bytes(b"half")
        os.utime(path, (old, old))
    os.utime(stray, (old, old))

    with caplog.at_level(logging.WARNING, logger="dicom_gateway"):
        gateway = start_gateway(spool_dir=spool.root)
        assert sorted(os.listdir(spool.incoming)) == [stray.name], "partials left behind the folder"
        (spool.incoming / "1.2.3.99.0.part").write_bytes(b"half")  # another crash's partial, an hour on
        assert gateway.spool.clean_incoming(older_than_s=0.0) == 1
    assert sorted(os.listdir(spool.incoming)) == [stray.name]
    skipped = [r for r in caplog.records if r.getMessage() == "partial writes that could not be removed were skipped"]
    assert len(skipped) == 1 and skipped[0].counts == {"skipped": 1}, [r.getMessage() for r in caplog.records]
    assert skipped[0].error in ("IsADirectoryError", "PermissionError")  # EISDIR on Linux
    assert not any("DOE" in str(r.__dict__) for r in caplog.records)
