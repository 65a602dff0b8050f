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
