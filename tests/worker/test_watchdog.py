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


def test_a_delivery_owned_by_no_task_for_the_whole_window_is_a_stall_though_messages_flow():
    """Beside a healthy worker that keeps the queue empty a stalled one never saw messages wait, and with two
    pool processes a lost ack leaves the worker a slot short while it still receives: the sign is the lost
    delivery itself, held unacknowledged by no task."""
    clock = Clock()
    watchdog = StallWatchdog(300, clock)
    assert not watchdog.leaked(frozenset({7}))
    clock.now += 150
    watchdog.received()  # messages still arrive on the other slot: no bearing on this sign
    assert not watchdog.leaked(frozenset({7, 8}))  # 8 is new
    clock.now += 150
    assert watchdog.leaked(frozenset({7, 8}))  # 7 at every look for 300 s
    assert not StallWatchdog(300, clock).leaked(frozenset())


def test_a_delivery_acknowledged_or_an_unknown_look_does_not_make_a_stall():
    clock = Clock()
    watchdog = StallWatchdog(300, clock)
    watchdog.leaked(frozenset({7}))
    clock.now += 200
    assert not watchdog.leaked(frozenset())  # acknowledged after all (a slow ack, a task handed over late)
    clock.now += 200
    assert not watchdog.leaked(frozenset({7}))  # seen again: counted from now
    clock.now += 200
    assert not watchdog.leaked(None)  # unknown: this look says nothing
    clock.now += 100
    assert watchdog.leaked(frozenset({7}))


def test_the_leak_sign_reads_the_consumer_s_qos_and_this_worker_s_tasks(monkeypatch):
    from types import SimpleNamespace

    from celery.worker import state

    from worker.watchdog import leaked_deliveries

    def consumer(delivered: dict, dirty: set) -> SimpleNamespace:
        qos = SimpleNamespace(_delivered=delivered, _dirty=dirty)
        return SimpleNamespace(task_consumer=SimpleNamespace(channel=SimpleNamespace(qos=qos)))

    class Request:  # weak-referenceable, as Celery's requests are
        def __init__(self, tag: int) -> None:
            self.message = SimpleNamespace(delivery_tag=tag)

    running, waiting = Request(1), Request(2)
    monkeypatch.setattr(state, "active_requests", {running})
    monkeypatch.setattr(state, "scheduled_requests", {waiting})
    assert leaked_deliveries(consumer({1: "m", 2: "m", 3: "m", 4: "m"}, {4})) == {3}  # 4 acknowledged meanwhile
    assert leaked_deliveries(consumer({}, set())) == frozenset()
    assert leaked_deliveries(SimpleNamespace(task_consumer=None)) is None  # between connections: unknown
