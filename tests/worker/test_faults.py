"""Fault injection against real processes: SIGKILL, database outage, broker restart.

Each test checks the product promise directly: every staged instance ends in exactly
one terminal row, and the spool's pending area drains.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, generate_uid

from tests.worker.support import RedisServer, wait_for
from worker.samples import make_cxr_dataset

pytestmark = [pytest.mark.redis]


def _stage_study(env, images, n: int, size: tuple[int, int], syntax: str) -> list[tuple[str, str]]:
    study = generate_uid()
    return [
        env.stage(make_cxr_dataset(images[i], study_uid=study, size=size, bits_stored=16, transfer_syntax=syntax,
                                   accession=f"ACC-F{i}"))
        for i in range(n)
    ]


def _pending_files(env) -> list:
    return [p for p in (env.spool / "pending").rglob("*.dcm")]


def _processing(env) -> list[dict]:
    return [r for r in env.rows().values() if r["status"] == "processing"]


@pytest.mark.parametrize("victim", ["pool_process", "whole_worker"])
def test_sigkill_mid_task_is_redelivered_and_finishes_once(make_triage_env, sqlite_url, test_split, victim):
    images, _ = test_split
    # Short limits so Redis' visibility timeout (which restores unacknowledged messages of a
    # dead worker) elapses within the test; tasks here take ~1.5 s.
    env = make_triage_env(sqlite_url, soft_time_limit_s="6", time_limit_s="8", visibility_timeout_s="10",
                           unacked_restore_interval_s="2", retry_backoff_max_s="1")  # a retry must fit in it too
    staged = _stage_study(env, images, 2, (4096, 4096), JPEG2000Lossless)
    worker = env.start_worker()
    for relpath, sop in staged:
        env.send(relpath, sop)
    in_flight = wait_for(lambda: _processing(env), 60, 0.03, "a task in progress")
    killed_sop = in_flight[0]["sop_instance_uid"]
    if victim == "pool_process":
        for child in worker.pool_children():
            child.kill()
    else:
        worker.kill_all()
    assert env.rows()[killed_sop]["status"] == "processing", "the kill must land mid-task"
    if victim == "whole_worker":
        env.start_worker()
    rows = env.wait_terminal([sop for _, sop in staged], timeout=120)
    assert sorted(rows) == sorted(sop for _, sop in staged)
    assert all(r["status"] == "done" for r in rows.values()), rows
    assert rows[killed_sop]["attempts"] == 2, "one delivery killed, one redelivery finished"
    assert not _pending_files(env)
    archived = list((env.spool / "archive").rglob("*.dcm"))
    assert len(archived) == len(staged), "each file archived exactly once"


def test_a_hard_time_limit_is_recorded_at_once_and_the_study_goes_final(make_triage_env, sqlite_url, test_split):
    """A pool process stuck past the hard time limit (stopped here with SIGSTOP, like one stuck in a
    decoder's native code, which the soft limit's signal cannot interrupt) is killed by Celery, which
    acknowledges its message. The main process re-sends it marked, and the instance is failed at once with
    the reason, its file archived and its study final. Before, its row stayed `processing` and its study
    not final until the gateway's sweep had re-sent the file TRIAGE_MAX_ATTEMPTS times (about 1.5 h)."""
    images, _ = test_split
    env = make_triage_env(sqlite_url, soft_time_limit_s="6", time_limit_s="8", visibility_timeout_s="600")
    (stuck_path, stuck), (other_path, other) = _stage_study(env, images, 2, (4096, 4096), JPEG2000Lossless)
    study = stuck_path.split("/")[1]
    worker = env.start_worker()
    env.send(stuck_path, stuck)
    wait_for(lambda: _processing(env), 60, 0.03, "the task in progress")
    for child in worker.pool_children():
        child.suspend()
    row = env.wait_terminal([stuck], timeout=60)[stuck]
    assert row["status"] == "failed", row
    assert row["reason"] == "processing exceeded the 8s hard time limit (its worker process was killed)"
    assert row["accession_number"] == "ACC-F0" and row["attempts"] == 1
    assert not (env.spool / stuck_path).exists()
    assert "killed at the 8s hard time limit; re-sent to record the failure" in worker.log()
    env.send(other_path, other)  # the replacement pool process scores the study's other image
    assert env.wait_terminal([other], timeout=60)[other]["status"] == "done"
    env.finalize(study)
    wait_for(lambda: (env.study(study) or {}).get("final"), 30, 0.3, "the study final")
    assert not _pending_files(env)


def _pg(action: str) -> None:
    """Stop/start the local cluster, whatever PostgreSQL version Debian installed: the newest, the one
    deploy/setup_dev.sh starts (`sort -V | tail -1`)."""
    versions = [p.name for p in Path("/etc/postgresql").iterdir()]
    version = max(versions, key=lambda name: [int(part) for part in re.findall(r"\d+", name)])
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action], check=True,
                   capture_output=True, timeout=120)


def _pg_up() -> bool:
    import psycopg

    try:
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=test", connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


@pytest.mark.postgres
def test_database_outage_tasks_retry_and_complete(make_triage_env, pg_url, test_split):
    images, _ = test_split
    env = make_triage_env(pg_url, retry_backoff_max_s="3")
    staged = _stage_study(env, images, 3, (512, 512), JPEGLosslessSV1)
    worker = env.start_worker()
    try:
        _pg("stop")
        for relpath, sop in staged:
            env.send(relpath, sop)
        wait_for(lambda: worker.log().count("transient") >= 3, 60, 0.5, "tasks retrying while the database is down")
        time.sleep(3)
        assert worker.proc is not None and worker.proc.poll() is None, "the worker must survive the outage"
    finally:
        _pg("start")
        wait_for(_pg_up, 60, 0.5, "PostgreSQL back")
    rows = env.wait_terminal([sop for _, sop in staged], timeout=90)
    assert len(rows) == 3 and all(r["status"] == "done" for r in rows.values())
    assert all(r["attempts"] == 1 for r in rows.values())
    assert not _pending_files(env)


def test_redis_restart_loses_nothing_with_spool_sweep(make_triage_env, sqlite_url, test_split, tmp_path):
    images, _ = test_split
    broker = RedisServer(tmp_path / "broker")
    (tmp_path / "broker").mkdir()
    broker.start()
    try:
        env = make_triage_env(sqlite_url, broker_url=broker.url)
        staged = _stage_study(env, images, 6, (2048, 2048), JPEG2000Lossless)
        worker = env.start_worker()
        for relpath, sop in staged:
            env.send(relpath, sop)
        broker.stop()  # no persistence: queued messages are gone
        time.sleep(2)
        broker.start()
        outstanding = len(_pending_files(env))
        assert outstanding > 0, "the restart should have lost queued work (else this test proves nothing)"
        time.sleep(3)  # the worker reconnects by itself
        # The gateway's recovery sweep: re-queue whatever is still pending (here via the admin CLI).
        sweep = subprocess.run(
            [sys.executable, "-m", "worker.admin", "requeue", "--older-than", "0"],
            env=env.env(), capture_output=True, text=True, timeout=60,
        )
        assert sweep.returncode == 0, sweep.stderr
        rows = env.wait_terminal([sop for _, sop in staged], timeout=120)
        assert sorted(rows) == sorted(sop for _, sop in staged)
        assert all(r["status"] == "done" for r in rows.values())
        assert not _pending_files(env)
        assert worker.proc is not None and worker.proc.poll() is None
        assert len(list((env.spool / "archive").rglob("*.dcm"))) == len(staged)
    finally:
        broker.stop()


SLOW_MODEL_LOAD = '''"""Test hook on PYTHONPATH: every process of this worker takes 6 s to build its detector."""
import time

import worker.pipeline as pipeline

_real = pipeline.make_detector


def _slow(settings):
    time.sleep(6)  # a cold CUDA/cuDNN start, a slow network mount, a busy host
    return _real(settings)


pipeline.make_detector = _slow
'''


def test_a_pool_process_that_replaces_a_dead_one_may_load_the_model_slowly(make_triage_env, sqlite_url, test_split,
                                                                           tmp_path):
    """Celery gave a new pool process 4 s to report ready, and each one loads the model first. So after the
    first pool process died (OOM under the compose memory cap, a hard time limit), every replacement whose
    load took longer was killed and restarted without end: the worker looked up and scored nothing."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_MODEL_LOAD)
    env = make_triage_env(sqlite_url)
    env.extra_env["PYTHONPATH"] = str(hooks)
    worker = env.start_worker()
    first = {child.pid for child in worker.pool_children()}
    for child in worker.pool_children():
        child.kill()
    wait_for(lambda: {c.pid for c in worker.pool_children()} - first, 30, 0.2, "a replacement pool process")
    relpath, sop = env.stage(make_cxr_dataset(test_split[0][0], size=(256, 256)))
    env.send(relpath, sop)
    assert env.wait_terminal([sop], timeout=60)[sop]["status"] == "done"
    assert "Timed out waiting for UP message" not in worker.log()
