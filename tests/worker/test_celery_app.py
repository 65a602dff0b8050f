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
