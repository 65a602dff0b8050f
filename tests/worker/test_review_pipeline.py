"""Review findings on the worker's pipeline, each against real processes where the harm shows there."""

from __future__ import annotations

import time

import pytest
from pydicom.uid import generate_uid

from tests.worker.support import wait_for
from worker import db
from worker.samples import make_cxr_dataset

pytestmark = [pytest.mark.redis]


def test_a_spool_that_is_not_mounted_yet_fails_nothing_and_finalises_nothing(make_triage_env, sqlite_url, test_split):
    """A worker whose spool is not there (its network mount not up yet, a volume left out, TRIAGE_SPOOL_DIR
    unset so that ./var/spool is used) failed every instance "spool file missing and no earlier result
    exists" and finalised every study with no flag: terminal rows that nothing re-evaluates, while the
    images still waited in the gateway's pending/. The spool's storage missing is the host's problem, like
    a stale mount: retried, and the images are scored once it is there."""
    images, labels = test_split
    env = make_triage_env(sqlite_url, retry_backoff_max_s="2")
    study = generate_uid()
    staged = [env.stage(make_cxr_dataset(images[i], study_uid=study, size=(256, 256))) for i in range(2)]
    unmounted = env.spool.with_name("spool-not-mounted")
    env.spool.rename(unmounted)
    worker = env.start_worker()
    for relpath, sop in staged:
        env.send(relpath, sop)
    env.finalize(study)
    wait_for(lambda: worker.log().count("transient") >= 4 or any(r["status"] in db.TERMINAL for r in env.rows().values()),
             60, 0.3, "deliveries retried, or ended, while the spool is missing")
    time.sleep(2)
    rows = env.rows()
    assert not [r for r in rows.values() if r["status"] in db.TERMINAL], rows
    assert not (env.study(study) or {}).get("final"), env.study(study)

    unmounted.rename(env.spool)  # the mount comes up
    rows = env.wait_terminal([sop for _, sop in staged], timeout=90)
    assert all(r["status"] == "done" for r in rows.values()), rows
    wait_for(lambda: (env.study(study) or {}).get("final"), 60, 0.3, "the study final")
    assert env.study(study)["flag"] is not None and env.study(study)["n_done"] == 2
    assert not list((env.spool / "pending").rglob("*.dcm"))


def test_a_retry_backoff_that_outlasts_the_visibility_timeout_is_refused(sqlite_url):
    """`TRIAGE_RETRY_BACKOFF_MAX_S=3600` ("retry hourly") with the default visibility timeout of 3600 s was
    accepted. A retry waits in the worker, unacknowledged, for its countdown; Redis redelivered it after the
    visibility timeout and both copies ran and retried: a finalize waiting for its study's images went from one
    message to 509 retries in 80 s on a real worker with the same ratio (visibility 4 s, backoff 12 s). Refused
    at start, in one line naming the variables (exit 2), like every other invalid setting."""
    import subprocess
    import sys

    from pydantic import ValidationError

    from worker.config import WorkerSettings

    for kw in ({"retry_backoff_max_s": 3600}, {"time_limit_s": 200, "visibility_timeout_s": 250}):
        with pytest.raises(ValidationError):
            WorkerSettings(database_url=sqlite_url, **kw)
    WorkerSettings(database_url=sqlite_url, retry_backoff_max_s=600)  # a long backoff with room to spare is fine
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    done = subprocess.run([sys.executable, "-m", "worker.cli", "check"], capture_output=True, text=True, timeout=120,
                          env={**env, "TRIAGE_DATABASE_URL": sqlite_url, "TRIAGE_RETRY_BACKOFF_MAX_S": "3600"})
    assert done.returncode == 2 and "TRIAGE_RETRY_BACKOFF_MAX_S" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("url", ["sqlite:///", "sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_sqlite_database_is_refused_at_start(url, tmp_path):
    """`TRIAGE_DATABASE_URL=sqlite:///$DB_FILE` with the variable unset reads `sqlite:///`, an in-memory
    database: `check` said "database ok", `migrate` "schema is at head" (in its own memory), and `run`
    started a worker whose every pool process opened its own empty database, so every task failed "no such
    table" for its retries and no result was ever stored. Refused as an unusable URL (exit 3, one line)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    for command in ("check", "migrate", "run"):
        done = subprocess.run([sys.executable, "-m", "worker.cli", command], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path, env={**env, "TRIAGE_DATABASE_URL": url})
        assert done.returncode == 3, (command, done.stderr[-2000:])
        assert "in-memory SQLite" in done.stderr and "Traceback" not in done.stderr
