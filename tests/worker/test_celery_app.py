"""Celery wiring: hardened settings and which errors are retried."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from models.errors import ExecutionProviderError, ModelIntegrityError, UnreadableImageError
from worker import contract
from worker.celery_app import create_app, is_transient
from worker.config import WorkerSettings


def test_no_loss_settings_and_task_names():
    app = create_app(WorkerSettings(broker_url="redis://127.0.0.1:1/0"))
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit > conf.task_soft_time_limit
    assert conf.task_default_queue == contract.QUEUE
    assert {contract.PROCESS_INSTANCE, contract.FINALIZE_STUDY} <= set(app.tasks)


@pytest.mark.parametrize(
    "exc, retried",
    [
        (OperationalError("SELECT 1", {}, Exception("connection refused")), True),
        (ConnectionError("broker"), True),
        (ModelIntegrityError("sha256 mismatch"), True),
        (ExecutionProviderError("CUDAExecutionProvider required but not active"), True),
        (FileNotFoundError("ONNX model not found: x"), True),
        (IntegrityError("INSERT", {}, Exception("dup")), False),
        (DataError("INSERT", {}, Exception("too long")), False),
        (UnreadableImageError("bad pixels"), False),
        (FileNotFoundError("spool file"), False),
        (ValueError("bug"), False),
    ],
)
def test_only_infrastructure_errors_are_retried(exc, retried):
    assert is_transient(exc) is retried


def app_with_a_pending_instance(tmp_path, sqlite_url, image, **settings):
    """A migrated SQLite database, an app bound to it (tasks run eagerly with `apply`) and one
    CR waiting in pending/: (settings, app, dataset, spool-relative path)."""
    from worker.migrate import upgrade
    from worker.samples import make_cxr_dataset, save

    upgrade(sqlite_url)
    settings = WorkerSettings(broker_url="redis://127.0.0.1:1/0", database_url=sqlite_url, spool_dir=tmp_path / "spool",
                              **settings)
    ds = make_cxr_dataset(image, size=(256, 256))
    relpath = contract.pending_relpath(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    save(ds, settings.spool_dir / relpath)
    return settings, create_app(settings), ds, relpath


def test_retries_before_any_claim_do_not_raise_the_poison_message_limit(tmp_path, sqlite_url, test_split):
    """A message retried while the model was being deployed carries Celery's retry count on every
    later redelivery; only retries that followed a claim may be subtracted from the attempts, or an
    image that kills its worker would crash-loop that many more times than TRIAGE_MAX_ATTEMPTS."""
    from worker import db

    settings, app, ds, relpath = app_with_a_pending_instance(tmp_path, sqlite_url, test_split[0][0])
    runtime = app.conf.triage_runtime
    claim = {"sop_instance_uid": str(ds.SOPInstanceUID), "study_instance_uid": str(ds.StudyInstanceUID),
             "spool_relpath": relpath, "received_at": db.utcnow(), "started_at": db.utcnow()}
    for _ in range(settings.max_attempts):  # deliveries that died with their worker
        with runtime.engine.begin() as conn:
            db.claim_instance(conn, claim)

    result = app.tasks[contract.PROCESS_INSTANCE].apply(args=(relpath, str(ds.SOPInstanceUID)),
                                                        kwargs={"received_at": None}, retries=10).get()
    assert result["status"] == "failed" and f"after {settings.max_attempts} deliveries" in result["reason"]


def test_a_transient_failure_after_the_claim_is_retried_and_counted(tmp_path, sqlite_url, test_split, monkeypatch):
    from worker import db, tasks

    _, app, ds, relpath = app_with_a_pending_instance(tmp_path, sqlite_url, test_split[0][0], max_attempts=1)
    real_finish, calls = tasks._finish, []

    def finish_after_one_outage(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("INSERT", {}, Exception("server closed the connection"))
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(tasks, "_finish", finish_after_one_outage)
    task = app.tasks[contract.PROCESS_INSTANCE]
    result = task.apply(args=(relpath, str(ds.SOPInstanceUID)), kwargs={"received_at": None}).get()
    assert result["status"] == "done", "two claims, one of them followed by a counted retry: not a lost delivery"
    with app.conf.triage_runtime.engine.connect() as conn:
        stored = db.get_instance(conn, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    assert (stored["attempts"], stored["transient_claims"]) == (2, 1), "two claims, the first counted as transient"


def test_a_retry_chain_that_runs_out_leaves_no_claim_counted_as_lost(tmp_path, sqlite_url, test_split, monkeypatch):
    """Every store fails (the database takes claims and refuses results) until Celery's retries run
    out; the sweep's next message must score the instance: each failed claim is counted as
    transient on the row at once, the chain's last one included (no retry follows it). Two whole
    chains would end it (`max_attempts` of them); one is a database outage to ride out."""
    from worker import db, tasks

    _, app, ds, relpath = app_with_a_pending_instance(tmp_path, sqlite_url, test_split[0][0], max_attempts=2,
                                                      max_retries=2)
    real_finish, calls = tasks._finish, []

    def refused(*args, **kwargs):
        calls.append(1)
        raise OperationalError("INSERT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(tasks, "_finish", refused)
    task = app.tasks[contract.PROCESS_INSTANCE]
    chain = task.apply(args=(relpath, str(ds.SOPInstanceUID)), kwargs={"received_at": None})
    assert chain.failed() and len(calls) == 3, "the first delivery and its two retries, all refused"
    monkeypatch.setattr(tasks, "_finish", real_finish)
    result = task.apply(args=(relpath, str(ds.SOPInstanceUID)), kwargs={"received_at": None}).get()  # the sweep
    assert result["status"] == "done", result
    with app.conf.triage_runtime.engine.connect() as conn:
        stored = db.get_instance(conn, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    assert (stored["attempts"], stored["transient_claims"]) == (4, 3), "the chain's three claims all transient"


def test_finalize_waits_and_rides_out_transient_errors_without_limit(tmp_path, monkeypatch):
    """A study whose images wait longer than the backoff schedule must still be finalised, and so must
    one whose database was down for longer than TRIAGE_MAX_RETRIES retries (the gateway sends finalize
    once and nothing re-sends it: a bounded retry left the study not final for good); an error that is
    not transient still fails it. The task body is replaced by a script of outcomes: the retry policy
    of the Celery wrapper is what is tested here."""
    from worker import tasks

    app = create_app(WorkerSettings(broker_url="redis://127.0.0.1:1/0", database_url=f"sqlite:///{tmp_path / 'x.db'}",
                                    max_retries=2))
    blip = OperationalError("UPDATE", {}, Exception("server closed the connection"))

    def scripted(outcomes):
        def body(rt, study, last):
            outcome = outcomes.pop(0)
            if outcome is not None:
                raise outcome
            return {"study_instance_uid": study, "final": True}
        return body

    task = app.tasks[contract.FINALIZE_STUDY]
    outcomes = [tasks.StudyNotSettledError("1 waits")] * 3 + [blip, blip, None]
    monkeypatch.setattr(tasks, "finalize_study", scripted(outcomes))
    result = task.apply(args=("1.2.3",), retries=40)  # 40 waits already, more than TRIAGE_MAX_RETRIES
    assert result.get() == {"study_instance_uid": "1.2.3", "final": True} and outcomes == []

    outcomes = [blip] * 12 + [None]  # four times TRIAGE_MAX_RETRIES (3 here, with the first try)
    monkeypatch.setattr(tasks, "finalize_study", scripted(outcomes))
    assert task.apply(args=("1.2.3",)).get() == {"study_instance_uid": "1.2.3", "final": True} and outcomes == []

    monkeypatch.setattr(tasks, "finalize_study", scripted([ValueError("a bug"), None]))
    with pytest.raises(ValueError):
        task.apply(args=("1.2.3",)).get()


def test_a_hard_time_limit_that_cannot_be_resent_is_logged_and_left_to_the_sweep(caplog):
    """`on_failure` runs in the worker's main process, inside billiard's timeout handling: a broker that
    does not answer there must cost a log line, never an exception. Other failures (raised in a pool
    process, already recorded by the task) re-send nothing."""
    import logging
    import time

    from celery.exceptions import TimeLimitExceeded

    app = create_app(WorkerSettings(broker_url="redis://127.0.0.1:1/0"))
    task = app.tasks[contract.PROCESS_INSTANCE]
    args = ("pending/1.2.3/4.5.6.dcm", "4.5.6")
    with caplog.at_level(logging.WARNING, logger="worker.celery_app"):
        task.on_failure(ValueError("a bug"), "id-1", args, {}, None)
        assert not caplog.records
        started = time.monotonic()
        task.on_failure(TimeLimitExceeded(180.0), "id-2", args, {"received_at": None}, None)
    assert time.monotonic() - started < 60
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert caplog.records[0].getMessage().startswith(
        "instance 4.5.6 was killed at the 180s hard time limit and could not be re-sent to record it")


def test_a_finalize_killed_at_the_hard_limit_that_cannot_be_sent_again_names_the_way_out(caplog):
    """The finalize's own wording: nothing else re-sends a finalize, so the admin is told what to run."""
    import logging

    from celery.exceptions import TimeLimitExceeded

    app = create_app(WorkerSettings(broker_url="redis://127.0.0.1:1/0"))
    task = app.tasks[contract.FINALIZE_STUDY]
    with caplog.at_level(logging.WARNING, logger="worker.celery_app"):
        task.on_failure(TimeLimitExceeded(180.0), "id-3", ("1.2.3",), None, None)
    [record] = caplog.records
    assert record.levelname == "ERROR" and record.getMessage().startswith(
        "the finalize of study 1.2.3 was killed at the 180s hard time limit and could not be sent again (")
    assert record.getMessage().endswith("); run `pneumonia-admin requeue`")


@pytest.mark.parametrize("where", ["_finish", "_require_model"])
def test_a_soft_time_limit_outside_the_analysis_is_retried_not_dropped(tmp_path, sqlite_url, test_split, monkeypatch,
                                                                       where):
    """The soft limit fired while the result was being stored (a database lock wait after a slow analysis) or
    before the claim: the exception was not transient, so the message was acknowledged with no row written
    (or the row left `processing` with no reason) until the gateway's sweep half an hour later, and the
    claim counted later as a worker death. It is retried as a transient failure, as finalize's is."""
    from celery.exceptions import SoftTimeLimitExceeded

    from worker import db, tasks

    _, app, ds, relpath = app_with_a_pending_instance(tmp_path, sqlite_url, test_split[0][0], max_attempts=1)
    real, calls = getattr(tasks, where), []

    def limit_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise SoftTimeLimitExceeded()
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, where, limit_once)
    result = app.tasks[contract.PROCESS_INSTANCE].apply(args=(relpath, str(ds.SOPInstanceUID)),
                                                        kwargs={"received_at": None}).get()
    assert result["status"] == "done", result
    with app.conf.triage_runtime.engine.connect() as conn:
        stored = db.get_instance(conn, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    claimed = where == "_finish"
    assert (stored["attempts"], stored["transient_claims"] or 0) == ((2, 1) if claimed else (1, 0))
