"""Review follow-up (2026-11-29): a foreign file in a study's pending folder, flags with spaces, a retry
whose re-publish the broker refuses, and a finalize past its time limit; real SQLite, redis-server and
worker processes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import redis
from pydantic import ValidationError

from tests.worker.support import RedisServer, wait_for
from worker import contract, db, tasks
from worker.config import DEFAULT_FLAG_MAP, WorkerSettings
from worker.migrate import upgrade
from worker.samples import make_cxr_dataset, save


@pytest.fixture
def runtime(tmp_path, sqlite_url):
    upgrade(sqlite_url)
    return tasks.Runtime(WorkerSettings(database_url=sqlite_url, spool_dir=tmp_path / "spool"))


def _study_row(rt: tasks.Runtime, study: str) -> dict | None:
    with rt.engine.connect() as conn:
        found = conn.execute(db.studies.select().where(db.studies.c.study_instance_uid == study)).mappings().first()
    return dict(found) if found else None


# --- 1. a file in pending/<study>/ that is not <SOP Instance UID>.dcm ------------------------------------


@pytest.mark.parametrize("foreign", ["{sop}.dup-4242-1764400000000000000.dcm", "Smith^John copy.dcm",
                                     ".~lock.{sop}.dcm"])
def test_a_file_not_named_by_a_sop_uid_does_not_hold_its_study_back(runtime, test_split, caplog, foreign):
    """The gateway's sweep and the admin counts skip such a name (an archived duplicate moved back by
    hand, an editor's temporary file), so nothing ever scored it and finalize retried for ever: the
    study never got its worklist flag. It is left out, and said once, by count, not by name."""
    ds = make_cxr_dataset(test_split[0][0], size=(256, 256))
    study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    relpath = contract.pending_relpath(study, sop)
    save(ds, runtime.settings.spool_dir / relpath)
    assert tasks.process_instance(runtime, relpath, sop, None)["status"] == "done"
    name = foreign.format(sop=sop)
    archived = runtime.settings.spool_dir / contract.SPOOL_ARCHIVE / study / f"{sop}.dcm"
    (runtime.settings.spool_dir / contract.SPOOL_PENDING / study / name).write_bytes(archived.read_bytes())

    assert tasks.outstanding_instances(runtime, study) == []
    with caplog.at_level(logging.INFO, logger="worker.tasks"):
        assert tasks.finalize_study(runtime, study, None)["final"]
    assert _study_row(runtime, study)["final"]
    foreign_lines = [r.getMessage() for r in caplog.records if "not named" in r.getMessage()]
    assert len(foreign_lines) == 1 and "1 file" in foreign_lines[0], caplog.text
    assert "Smith" not in caplog.text and ".dup-" not in caplog.text and "lock" not in caplog.text


def test_a_real_instance_beside_a_foreign_file_still_holds_the_study(runtime, test_split):
    ds = make_cxr_dataset(test_split[0][0], size=(256, 256))
    study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    save(ds, runtime.settings.spool_dir / contract.pending_relpath(study, sop))
    (runtime.settings.spool_dir / contract.SPOOL_PENDING / study / "notes.dcm").write_bytes(b"x")
    assert tasks.outstanding_instances(runtime, study) == [sop]
    with pytest.raises(tasks.StudyNotSettledError, match="1 instance"):
        tasks.finalize_study(runtime, study, None)


# --- 2. TRIAGE_FLAG_MAP flags with leading or trailing spaces -----------------------------------------


@pytest.mark.parametrize("flag", [" URGENT", "URGENT ", "URGENT\t", "\nURGENT"])
def test_a_flag_with_surrounding_spaces_is_refused(flag):
    """`" URGENT"` was stored as written, and a worklist filtering on URGENT never showed those studies."""
    with pytest.raises(ValidationError, match="spaces"):
        WorkerSettings(flag_map={**DEFAULT_FLAG_MAP, "high_suspicion": flag})


def test_a_flag_with_surrounding_spaces_stops_the_worker_naming_the_variable(sqlite_url):
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env = {**base, "TRIAGE_DATABASE_URL": sqlite_url,
           "TRIAGE_FLAG_MAP": '{"high_suspicion": " URGENT", "indeterminate": "PRIORITY", "likely_normal": "ROUTINE"}'}
    done = subprocess.run([sys.executable, "-m", "worker.cli", "check"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "TRIAGE_FLAG_MAP" in done.stderr and "high_suspicion" in done.stderr and "Traceback" not in done.stderr


def test_a_flag_with_inner_spaces_is_still_accepted():
    assert WorkerSettings(flag_map={**DEFAULT_FLAG_MAP, "high_suspicion": "URGENT CXR"}).flag_map["high_suspicion"] \
        == "URGENT CXR"


# --- 3. a retry whose re-publish the broker refuses ----------------------------------------------------


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own: it is driven to its client limit."""
    server = RedisServer(tmp_path / "redis")
    server.workdir.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.redis
def test_a_finalize_whose_retry_cannot_be_published_is_not_lost(own_redis, make_triage_env, sqlite_url, test_split):
    """Celery's `Task.retry` acknowledges (rejects without requeue) the message it retries when the
    re-publish fails. The pool process publishes, on a connection of its own, and the main process
    acknowledges, on its own: when only the first fails, a finalize waiting for its study's images was
    dropped, and nothing re-sends it: the study never became final. The message must come back.
    (A Redis at `maxmemory` is no such case: it refuses the acknowledgement too, a MULTI, and Celery
    stops the worker with "Unrecoverable error"; the message stays unacknowledged and is restored.)"""
    env = make_triage_env(sqlite_url, broker_url=own_redis.url, retry_backoff_max_s="2", soft_time_limit_s="5",
                          time_limit_s="8", visibility_timeout_s="12", unacked_restore_interval_s="1")
    ds = make_cxr_dataset(test_split[0][0], size=(256, 256))
    relpath, sop = env.stage(ds)
    study = str(ds.StudyInstanceUID)
    worker = env.start_worker()
    env.finalize(study)  # its image waits in pending/, unsent: finalize retries every 2 s
    wait_for(lambda: worker.log().count("Retry in 2s") >= 1, 60, 0.05, "finalize to wait for its image")
    broker = redis.Redis(port=own_redis.port)
    pool_process = next(p for p in worker.pool_children() if "worker.cli" in p.cmdline())  # not the resource tracker
    # The pool process's connection is lost (an idle timeout, a reset) and it cannot make another: the
    # server is at `maxclients` (a connection leak elsewhere). The main process's connections carry on.
    for conn in pool_process.net_connections(kind="tcp"):
        if conn.raddr and conn.raddr.port == own_redis.port:
            broker.client_kill_filter(_type=None, addr=f"127.0.0.1:{conn.laddr.port}")
    broker.config_set("maxclients", broker.info("clients")["connected_clients"])
    try:
        wait_for(lambda: "could not be published" in worker.log() or "reject requeue=False" in worker.log(), 30, 0.1,
                 "the retry's publish to be refused")
    finally:
        broker.config_set("maxclients", 10000)
    env.send(relpath, sop)
    assert env.wait_terminal([sop])[sop]["status"] == "done"
    assert worker.proc is not None and worker.proc.poll() is None, "the worker must keep running"
    try:
        wait_for(lambda: (env.study(study) or {}).get("final"), 45, 0.3, "the study to become final")
    except AssertionError:
        raise AssertionError(f"finalize lost; worker log tail:\n{worker.log()[-4000:]}") from None


# --- 4. a finalize past its time limit ------------------------------------------------------------------


HANG_ONCE = '''"""Test hook on PYTHONPATH: the first listing of a study's pending folder hangs (a hard-mounted NFS)."""
import os
import signal
import time
from pathlib import Path

import worker.tasks as tasks

_real = tasks.outstanding_instances


def _hang_once(rt, study_uid):
    mark = Path(os.environ["PYTEST_HANG_MARK"])
    if not mark.exists():
        mark.write_text("hung")
        if os.environ["PYTEST_HANG_KIND"] == "hard":  # stuck in the kernel: the soft limit's signal waits
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        time.sleep(60)
    return _real(rt, study_uid)


tasks.outstanding_instances = _hang_once
'''


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_a_finalize_past_its_time_limit_is_sent_again(make_triage_env, sqlite_url, test_split, tmp_path, kind):
    """A finalize whose listing of the spool hung was failed at the soft time limit, or killed at the hard
    one, and acknowledged: nothing re-sends a finalize (the gateway forgets it once the broker is idle),
    so its study never went final. It is retried (soft) or re-sent by the main process (hard)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HANG_ONCE)
    env = make_triage_env(sqlite_url, soft_time_limit_s="3", time_limit_s="5", visibility_timeout_s="600",
                          retry_backoff_max_s="2")
    env.extra_env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
                         PYTEST_HANG_MARK=str(tmp_path / "hung"), PYTEST_HANG_KIND=kind)
    ds = make_cxr_dataset(test_split[0][0], size=(256, 256))
    relpath, sop = env.stage(ds)
    study = str(ds.StudyInstanceUID)
    worker = env.start_worker()
    env.send(relpath, sop)
    assert env.wait_terminal([sop])[sop]["status"] == "done"
    env.finalize(study)
    wait_for(lambda: (tmp_path / "hung").exists(), 30, 0.1, "the listing to hang")
    try:
        wait_for(lambda: (env.study(study) or {}).get("final"), 40, 0.3, "the study to become final")
    except AssertionError:
        raise AssertionError(f"finalize lost; worker log tail:\n{worker.log()[-3000:]}") from None
    assert worker.proc is not None and worker.proc.poll() is None
    if kind == "hard":  # the line README's Reliability section quotes
        assert f"the finalize of study {study} was killed at the 5s hard time limit; sent again, in 2s" in worker.log()
