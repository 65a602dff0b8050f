"""End to end: storescu -> gateway -> Redis -> real worker process -> database row.

The worker is started exactly as production does (`python -m worker.cli run`, via the
worker team's test support), results are read from its database.
"""

from __future__ import annotations

import subprocess
import sys

import pydicom
import pytest

from dicom_gateway.service import Gateway
from tests.dicom_gateway.conftest import RedisServer, small_dataset
from tests.dicom_gateway.helpers import run_storescu, store_with_pynetdicom, wait_for
from tests.worker.support import TriageEnv, temporary_pg_database

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.dcmtk]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'triage.db'}"
        return
    with temporary_pg_database("triage_gw") as url:
        yield url


@pytest.fixture
def triage(database_url, redis_server, broker, tmp_path):
    workdir = tmp_path / "triage"
    workdir.mkdir()
    env = TriageEnv(redis_server.url, database_url, workdir / "spool", workdir)
    yield env
    env.close()


def _study_row(env: TriageEnv, study_uid: str) -> dict | None:
    from sqlalchemy import select

    from worker import db

    engine = db.make_engine(env.database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(select(db.studies).where(db.studies.c.study_instance_uid == study_uid)).mappings().first()
            return dict(row) if row else None
    except Exception:
        return None
    finally:
        engine.dispose()


def test_storescu_to_database_row(triage, start_gateway, dcmtk, make_study):
    worker = triage.start_worker()
    gateway = start_gateway(spool_dir=triage.spool, broker_url=triage.broker_url, gateway_stable_study_seconds=2)
    paths = make_study(3, size=(512, 512))
    out = run_storescu(dcmtk("storescu"), gateway.port, paths)
    assert out.returncode == 0, out.stderr
    sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    rows = triage.wait_terminal(sops, timeout=180)
    for sop in sops:
        assert rows[sop]["status"] == "done", rows[sop]
        assert rows[sop]["stratum"] and rows[sop]["flag"], rows[sop]
    study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    final = wait_for(lambda: (_study_row(triage, study) or {}).get("final"), 60, what="study finalized")
    assert final is True
    wait_for(lambda: not list((triage.spool / "pending").glob("*/*.dcm")), 30, what="worker to move files out of pending")
    assert "SYNTHETIC" not in worker.log()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'db' / 'triage.db'}"


def test_redis_down_during_push_50_results_exactly_once(sqlite_url, tmp_path, settings_factory, images):
    """Own redis-server stopped while 50 instances are pushed, restarted: 50 rows, each processed once."""
    database_url = sqlite_url
    own = RedisServer(tmp_path / "redis-outage")
    own.start()
    workdir = tmp_path / "outage"
    workdir.mkdir()
    env = TriageEnv(own.url, database_url, workdir / "spool", workdir)
    gateway = Gateway(settings_factory(spool_dir=env.spool, broker_url=own.url))
    gateway.start()
    try:
        env.start_worker()
        own.stop()
        datasets = [small_dataset(images, i, size=(256, 256)) for i in range(50)]
        assert store_with_pynetdicom(gateway.port, datasets) == [0] * 50
        own.start()
        sops = [str(d.SOPInstanceUID) for d in datasets]
        rows = env.wait_terminal(sops, timeout=240)
        assert len(rows) == 50
        assert all(rows[s]["status"] == "done" for s in sops), {s: rows[s]["status"] for s in sops}
        assert all(rows[s]["attempts"] == 1 for s in sops), sorted(rows[s]["attempts"] for s in sops)
    finally:
        gateway.stop(timeout=2)
        env.close()
        own.stop()


def test_admin_cli_shows_the_result(sqlite_url, redis_server, broker, start_gateway, images, tmp_path):
    workdir = tmp_path / "admin"
    workdir.mkdir()
    triage = TriageEnv(redis_server.url, sqlite_url, workdir / "spool", workdir)
    try:
        triage.start_worker()
        gateway = start_gateway(spool_dir=triage.spool, broker_url=triage.broker_url)
        ds = small_dataset(images, 0, size=(256, 256))
        assert store_with_pynetdicom(gateway.port, [ds]) == [0]
        triage.wait_terminal([str(ds.SOPInstanceUID)], timeout=180)
        out = subprocess.run(
            [sys.executable, "-m", "worker.admin", "show", str(ds.StudyInstanceUID)],
            capture_output=True, text=True, timeout=60, env=triage.env(),
        )
    finally:
        triage.close()
    assert out.returncode == 0, out.stderr
    assert str(ds.SOPInstanceUID) in out.stdout


def test_16_concurrent_storescu_associations_all_processed(sqlite_url, redis_server, broker, start_gateway, dcmtk, make_study, tmp_path):
    """16 simultaneous storescu associations x 20 instances: all stored, all processed once."""
    from concurrent.futures import ThreadPoolExecutor

    storescu = dcmtk("storescu")
    workdir = tmp_path / "conc"
    workdir.mkdir()
    env = TriageEnv(redis_server.url, sqlite_url, workdir / "spool", workdir)
    try:
        env.start_worker()
        gateway = start_gateway(spool_dir=env.spool, broker_url=env.broker_url, gateway_max_associations=16)
        folders = [tmp_path / f"sender{i}" for i in range(16)]
        sops = []
        for folder in folders:
            sops += [p.stem for p in make_study(20, out=folder)]
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda f: run_storescu(storescu, gateway.port, [f], "+sd"), folders))
        for out in results:
            assert out.returncode == 0 and out.stderr.count("(Success)") == 20, out.stderr[-1500:]
        rows = env.wait_terminal(sops, timeout=300)
        assert len(rows) == 320
        assert {rows[s]["status"] for s in sops} == {"done"}
        assert {rows[s]["attempts"] for s in sops} == {1}
    finally:
        env.close()


def test_gateway_sigkill_every_success_is_processed_after_restart(sqlite_url, redis_server, broker, images, tmp_path):
    """SIGKILL the gateway process mid-push (broker flushed too); after restart every acked instance gets a row."""
    import os
    import signal

    from pydicom.uid import generate_uid

    from tests.dicom_gateway.conftest import gateway_subprocess
    from tests.dicom_gateway.helpers import free_port
    from tests.dicom_gateway.test_durability import _echo_ok

    workdir = tmp_path / "kill"
    workdir.mkdir()
    env = TriageEnv(redis_server.url, sqlite_url, workdir / "spool", workdir)
    port = free_port()
    gw_env = {"TRIAGE_BROKER_URL": redis_server.url, "TRIAGE_SPOOL_DIR": str(env.spool), "TRIAGE_GATEWAY_PORT": str(port),
              "TRIAGE_GATEWAY_BIND": "127.0.0.1", "TRIAGE_GATEWAY_MIN_FREE_BYTES": "0"}
    proc = gateway_subprocess(gw_env, tmp_path / "gw.log")
    acked: list[str] = []
    try:
        wait_for(lambda: _echo_ok(port), 20, what="gateway")
        datasets = [small_dataset(images, i, size=(256, 256), study_uid=generate_uid()) for i in range(80)]

        def record(ds, code):
            if code == 0:
                acked.append(str(ds.SOPInstanceUID))
            if len(acked) == 20:
                os.kill(proc.pid, signal.SIGKILL)

        try:
            store_with_pynetdicom(port, datasets, on_status=record)
        except (RuntimeError, ConnectionError):
            pass
        proc.wait(10)
        assert 20 <= len(acked) < 80
        broker.flushall()
        proc = gateway_subprocess(gw_env, tmp_path / "gw.log")
        wait_for(lambda: _echo_ok(port), 20, what="gateway restart")
        env.start_worker()
        rows = env.wait_terminal(acked, timeout=240)
        assert {rows[s]["status"] for s in acked} == {"done"}
    finally:
        proc.kill()
        proc.wait(10)
        env.close()
