"""The Celery application, hardened so that no delivered instance is lost.

`celery -A worker.celery_app worker` finds `app` through the module `__getattr__`, which
calls the cached factory; nothing else is a module global.

Why each setting:
  acks_late + reject_on_worker_lost  a message is acknowledged only after the task ran, and
                                     re-queued if the process running it dies (SIGKILL, OOM).
  prefetch_multiplier 1              a dying worker holds at most one message per process.
  visibility_timeout > time_limit    Redis re-delivers unacknowledged messages only after
                                     any task could have finished.
  retries with backoff               database or broker blips are transient; bad input is not
                                     retried (it becomes a failed/skipped row instead).
  hard time limit -> re-send         the main process re-sends an instance whose pool process it
                                     killed, marked, and the next delivery records that failure;
                                     a finalize so killed is re-sent as it was (a soft limit retries it).
  retry not published -> requeue     a retry the broker does not take puts its message back, where
                                     Celery acknowledged it and it was lost (`retry_keeping_message`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject, Retry, SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import worker_process_init
from kombu.exceptions import OperationalError as BrokerOperationalError
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from models.errors import ImageAccessError
from worker import contract, tasks
from worker.config import WorkerSettings

log = logging.getLogger(__name__)

READ_ONLY_SQL_TRANSACTION = "25006"
"""PostgreSQL's SQLSTATE for a write in a read-only transaction (a hot standby, `default_transaction_read_only`)."""


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the database or broker is unreachable, the model is not deployed yet, its GPU is not up,
    or the spool's storage failed to read a file (`ImageAccessError`: permissions, I/O, a stale mount).

    Integrity/data errors are bugs or bad input and are not retried; neither is anything
    about the image itself (those already became failed/skipped rows in `tasks`).
    """
    if isinstance(exc, (OperationalError, InterfaceError, DisconnectionError, SATimeoutError)):
        return True
    if isinstance(exc, DBAPIError):  # a standby refusing writes (SQLSTATE 25006): a failover under way
        return bool(exc.connection_invalidated) or getattr(exc.orig, "sqlstate", None) == READ_ONLY_SQL_TRANSACTION
    return isinstance(exc, (ConnectionError, TimeoutError, ImageAccessError)) or tasks.is_model_problem(exc)


@dataclass(frozen=True)
class HardLimitResend:
    """How a task killed at the hard time limit is sent again, and what the log says of it."""

    subject: str  # "instance <SOP>", "the finalize of study <UID>"
    kwargs: dict[str, Any]
    countdown: int | None
    resend: str  # what could not be done, as in "could not be <resend>"
    done: str  # said once it is sent
    fallback: str  # what happens, or is to be done, when it could not be sent


class ResentAtHardLimit(Task):
    """Base of the contract tasks: a delivery Celery killed at the hard time limit is sent again.

    Celery acknowledges such a delivery and (5.7, the version this project requires) calls `on_failure`
    in the worker's main process once it has given up on the pool process, which it then kills. The
    main process holds no database connection and must not block on one: it only re-sends the message,
    as `hard_time_limit_resend` says. A broker that refuses the re-send costs a log line, never an
    exception (this runs inside billiard's timeout handling)."""

    def hard_time_limit_resend(self, args: Any, kwargs: dict[str, Any], seconds: int) -> HardLimitResend:
        raise NotImplementedError

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if not isinstance(exc, TimeLimitExceeded):
            return  # raised in a pool process: the task has recorded it already
        seconds = _limit_seconds(exc, self.app.conf.task_time_limit)
        plan = self.hard_time_limit_resend(args, dict(kwargs or {}), seconds)
        try:
            self.apply_async(args=args, kwargs=plan.kwargs, queue=contract.QUEUE, countdown=plan.countdown)
        except Exception as resend_error:
            log.error("%s was killed at the %ss hard time limit and could not be %s (%s); %s",
                      plan.subject, seconds, plan.resend, type(resend_error).__name__, plan.fallback)
            return
        log.warning("%s was killed at the %ss hard time limit; %s", plan.subject, seconds, plan.done)


class ProcessInstanceTask(ResentAtHardLimit):
    """`triage.process_instance`: re-sent marked `hard_time_limit_s`, and the pool process that takes it
    records the failure (`tasks.hard_time_limit_outcome`), with the retries every delivery has. Before,
    nothing heard of it: the row stayed `processing` until the gateway's sweep had re-sent the file
    `TRIAGE_MAX_ATTEMPTS` times (about 1.5 h with the defaults). Should the re-send fail (the broker gone
    too), that sweep still ends it as before."""

    def hard_time_limit_resend(self, args: Any, kwargs: dict[str, Any], seconds: int) -> HardLimitResend:
        sop = args[1] if len(args) > 1 else kwargs.get("sop_instance_uid", "?")
        return HardLimitResend(f"instance {sop}", {**kwargs, "hard_time_limit_s": seconds}, None,
                               resend="re-sent to record it", done="re-sent to record the failure",
                               fallback="the gateway's sweep re-sends it")


class FinalizeStudyTask(ResentAtHardLimit):
    """`triage.finalize_study`, killed at the hard time limit by a listing of the spool hung on a
    hard-mounted network file system, in the kernel, where the soft limit cannot reach.

    Nothing else sends a finalize again: the gateway forgets it once the broker has been seen idle, and
    its sweep re-sends the images still pending, not their study's finalize. The study then stayed not
    final until someone ran `pneumonia-admin requeue`. It is re-sent after the longest retry backoff (a
    mount that stays hung kills a pool process at that pace, not in a loop)."""

    def hard_time_limit_resend(self, args: Any, kwargs: dict[str, Any], seconds: int) -> HardLimitResend:
        study = args[0] if args else kwargs.get("study_instance_uid", "?")
        countdown = self.app.conf.triage_runtime.settings.retry_backoff_max_s
        return HardLimitResend(f"the finalize of study {study}", kwargs, countdown, resend="sent again",
                               done=f"sent again, in {countdown}s", fallback="run `pneumonia-admin requeue`")


def retry_keeping_message(task: Task, **options: Any) -> Retry:
    """`task.retry(**options)`, except that a retry the broker does not take returns the message to the queue.

    Celery's `Task.retry` publishes the retry as a new message, and when that publish fails (the pool
    process's broker connection lost and no new one to be had: the server at `maxclients`, a reset during
    a blip) it raises `Reject(requeue=False)`: the worker's main process, whose own connection still
    works, acknowledges the message it retried, and nothing is left to run. A finalize waiting for its
    study's images was lost so (nothing re-sends it: the study never went final), and an instance waited
    for the gateway's sweep (30 min). The message is rejected with requeue instead, at the head of the
    queue; when that cannot reach the broker either, it stays unacknowledged and Redis restores it
    after the visibility timeout. Only a broker error is requeued: anything else would come back failing."""
    try:
        return task.retry(**options)
    except Reject as exc:
        reason = exc.reason
        if exc.requeue or not isinstance(reason, (BrokerOperationalError, ConnectionError, TimeoutError, OSError)):
            raise
        log.warning("the retry of %s could not be published (%s); its message goes back to the queue",
                    task.name, type(reason).__name__)
        time.sleep(min(float(options.get("countdown") or 0), RETRY_REQUEUE_PAUSE_MAX_S))  # back at once, not in a spin
        raise Reject(reason, requeue=True) from None


RETRY_REQUEUE_PAUSE_MAX_S = 5.0
"""How long a pool process waits (at most the retry's countdown) before it returns a message whose retry could
not be published: the message comes back at once, and while the broker keeps refusing it would spin."""


def _limit_seconds(exc: TimeLimitExceeded, configured: float | None) -> int:
    """The limit billiard reports (its first argument), else the configured one, in whole seconds."""
    for value in (*exc.args[:1], configured):
        try:
            return max(1, round(float(value)))
        except (TypeError, ValueError):
            continue
    return 1


def create_app(settings: WorkerSettings) -> Celery:
    """Build the Celery app and register the two contract tasks bound to `settings`.

    The tasks are not `shared`: each closes over this app's runtime, and Celery's shared-task
    registry would hand them to (or take them from) any other app built in the same process."""
    app = Celery("pneumonia_triage", broker=settings.broker_url, set_as_current=False)
    app.conf.update(_celery_config(settings))
    runtime = tasks.Runtime(settings)
    app.conf.triage_runtime = runtime

    def backoff(retries: int) -> int:
        return min(settings.retry_backoff_max_s, 2 ** min(retries, 10))

    @app.task(name=contract.PROCESS_INSTANCE, bind=True, base=ProcessInstanceTask, max_retries=settings.max_retries,
              shared=False)
    def process_instance(self: Task, spool_relpath: str, sop_instance_uid: str, received_at: str | None = None,
                         retries_after_claim: int = 0, hard_time_limit_s: int | None = None) -> Any:
        try:
            return tasks.process_instance(runtime, spool_relpath, sop_instance_uid, received_at,
                                          retries_after_claim=retries_after_claim, hard_time_limit_s=hard_time_limit_s)
        except Exception as exc:
            claimed = isinstance(exc, tasks.ClaimedDeliveryError)
            cause = exc.cause if claimed else exc
            # the soft limit outside the analysis (storing the result behind a lock, loading the model): the
            # analysis records its own; acknowledged unretried, this one left nothing until the sweep
            if not (is_transient(cause) or isinstance(cause, SoftTimeLimitExceeded)):
                raise cause
            log.warning("transient %s for %s, retry %d", type(cause).__name__, sop_instance_uid, self.request.retries + 1)
            if claimed:
                tasks.credit_failed_claim(runtime, spool_relpath, sop_instance_uid)
            kwargs = {**(self.request.kwargs or {}), "retries_after_claim": retries_after_claim + int(claimed)}
            raise retry_keeping_message(self, exc=cause, countdown=backoff(self.request.retries), kwargs=kwargs)

    @app.task(name=contract.FINALIZE_STUDY, bind=True, base=FinalizeStudyTask, max_retries=None, shared=False)
    def finalize_study(self: Task, study_instance_uid: str, last_received_at: str | None = None,
                       transient_retries: int = 0) -> Any:
        """Retried without limit while the study's images wait (`StudyNotSettledError`), however long
        that lasts, and while the database, the broker or the spool's storage fails (transient
        errors): the gateway sends finalize once and nothing else re-sends it, so a bounded retry
        left every study that went quiet during a long outage not final for good. The task is
        idempotent and cheap; `transient_retries`, its own count (Celery's includes the waits),
        spaces the retries out to TRIAGE_RETRY_BACKOFF_MAX_S."""
        kwargs = dict(self.request.kwargs or {})
        try:
            return tasks.finalize_study(runtime, study_instance_uid, last_received_at)
        except tasks.StudyNotSettledError as exc:
            raise retry_keeping_message(self, exc=exc, countdown=backoff(self.request.retries), kwargs=kwargs)
        except Exception as exc:
            # the soft time limit (a slow or stalled listing of the spool): acknowledged unretried, it was lost
            if not (is_transient(exc) or isinstance(exc, SoftTimeLimitExceeded)):
                raise
            kwargs["transient_retries"] = transient_retries + 1
            raise retry_keeping_message(self, exc=exc, countdown=backoff(transient_retries), kwargs=kwargs)

    worker_process_init.connect(lambda **_: _warm(runtime), weak=False)
    return app


POOL_PROCESS_START_TIMEOUT_S = 300.0
"""How long Celery waits for a new pool process to report ready. Each one loads the model before it does
(`_warm`); with Celery's default of 4 s, a load slower than that (a cold CUDA/cuDNN start, a slow mount, a
busy host) got every replacement process killed and restarted without end, after the first pool process
died (OOM under the compose memory cap, a hard time limit), while the main process looked healthy."""


def _celery_config(settings: WorkerSettings) -> dict[str, Any]:
    """The hardened settings above; the broker's transport options and TLS come from the helper the
    gateway's publisher and `pneumonia-admin requeue` use too (a sentinel master, a verified rediss://)."""
    broker = contract.broker_celery_options(settings, {
        "visibility_timeout": settings.visibility_timeout_s,
        # A killed worker's message comes back after visibility_timeout plus at most one
        # restore interval (the throttle of 1 checks on every tick; default would be 10 ticks).
        "unacked_restore_interval": settings.unacked_restore_interval_s,
        "unacked_restore_throttle": 1,
        "socket_timeout": 10,
        "socket_connect_timeout": 10,
        "retry_on_timeout": True,
    })
    return {
        **broker,
        "worker_proc_alive_timeout": POOL_PROCESS_START_TIMEOUT_S,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.time_limit_s,
        "task_soft_time_limit": settings.soft_time_limit_s,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_default_queue": contract.QUEUE,
        "task_routes": {f"{contract.QUEUE}.*": {"queue": contract.QUEUE}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_track_started": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_enable_remote_control": contract.broker_scheme(settings.broker_url) != "sentinel",  # README: failover
    }


def _warm(runtime: tasks.Runtime) -> None:
    """Load the model in each new pool process; a failure is logged, not fatal (no crash loop)."""
    try:
        runtime.after_fork()
    except Exception as exc:  # tasks will retry until the model becomes loadable
        log.error("model could not be loaded in worker process: %s", exc)


@lru_cache(maxsize=1)
def get_app() -> Celery:
    """The process's app, configured from the environment (used by `celery -A`)."""
    return create_app(WorkerSettings())


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        return get_app()
    raise AttributeError(name)
