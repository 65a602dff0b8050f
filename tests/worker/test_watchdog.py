"""The stall watchdog's rule, on its own clock (the real stall, with Redis and a worker process, is in test_broker)."""

from __future__ import annotations

import pytest

from worker.config import WorkerSettings
from worker.watchdog import StallWatchdog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_messages_waiting_with_nothing_received_for_the_whole_window_is_a_stall():
    clock = Clock()
    watchdog = StallWatchdog(300, clock)
    assert not watchdog.stalled(2)  # the first look starts the count
    clock.now += 299
    assert not watchdog.stalled(2)
    clock.now += 1
    assert watchdog.stalled(2)


def test_an_empty_queue_a_receipt_or_an_unknown_count_starts_over():
    clock = Clock()
    watchdog = StallWatchdog(300, clock)
    for interruption in ("empty", "received", "unknown"):
        watchdog.stalled(1)
        clock.now += 200
        if interruption == "empty":
            assert not watchdog.stalled(0)
        elif interruption == "received":
            watchdog.received()
        else:
            assert not watchdog.stalled(None)  # the broker unreachable: Celery is reconnecting
        clock.now += 200
        assert not watchdog.stalled(1), interruption  # 400 s since the first look, but not 300 s of a stall
        clock.now += 300
        assert watchdog.stalled(1), interruption
        watchdog = StallWatchdog(300, clock)


def test_a_pool_busy_longer_than_the_window_is_not_taken_for_a_stall():
    """The window must exceed the hard time limit: a worker whose pool works on slow images receives nothing
    until one ends, though messages wait."""
    with pytest.raises(ValueError, match="TRIAGE_STALL_EXIT_S must exceed TRIAGE_TIME_LIMIT_S"):
        WorkerSettings(stall_exit_s=180, time_limit_s=180)
    assert WorkerSettings(stall_exit_s=0).stall_exit_s == 0  # off
    assert WorkerSettings().stall_exit_s > WorkerSettings().time_limit_s


def test_a_prefetch_held_by_no_task_with_nothing_received_is_a_stall_though_the_queue_is_empty():
    """Beside a healthy worker that keeps the queue empty, a stalled one never saw messages wait: its own sign is
    a prefetch held by a delivery whose ack was lost, while it runs no task."""
    clock = Clock()
    watchdog = StallWatchdog(300, clock)
    assert not watchdog.stalled(0, held=True)
    clock.now += 300
    assert watchdog.stalled(0, held=True)
    watchdog.received()  # a message arrived after all: the count starts over
    clock.now += 299
    assert not watchdog.stalled(0, held=True)
    assert not watchdog.stalled(0, held=False)  # a look without either sign: a new window
    clock.now += 600
    assert not watchdog.stalled(None, held=True)
    clock.now += 300
    assert watchdog.stalled(None, held=True)  # the count unknown (its connection failed too): held is a sign


def test_the_prefetch_sign_reads_the_consumer_s_qos_and_this_worker_s_tasks(monkeypatch):
    from types import SimpleNamespace

    from celery.worker import state

    from worker.watchdog import prefetch_held_by_no_task

    def consumer(can_consume: bool) -> SimpleNamespace:
        qos = SimpleNamespace(can_consume=lambda: can_consume)
        return SimpleNamespace(task_consumer=SimpleNamespace(channel=SimpleNamespace(qos=qos)))

    assert prefetch_held_by_no_task(consumer(False)) and not prefetch_held_by_no_task(consumer(True))
    monkeypatch.setattr(state, "reserved_requests", {"a task received, maybe running"})
    assert not prefetch_held_by_no_task(consumer(False))  # the prefetch is that task's
    assert not prefetch_held_by_no_task(SimpleNamespace(task_consumer=None))  # between connections: no sign
