"""The gateway notices a broker that lost its queue (a real redis-server restarted without persistence)
and re-sends at once what was lost; a broker that kept its data (appendonly) gets nothing twice."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import redis
from pydicom.uid import generate_uid

from dicom_gateway.service import Gateway
from tests.dicom_gateway.conftest import RedisServer, small_dataset
from tests.dicom_gateway.helpers import pending_files, queued_tasks, store_with_pynetdicom, wait_for
from worker.contract import FINALIZE_STUDY, PROCESS_INSTANCE, QUEUE

pytestmark = pytest.mark.redis


def _tasks(client: redis.Redis, name: str) -> list[list]:
    return [t["args"] for t in queued_tasks(client) if t["task"] == name]


@pytest.fixture
def own_gateway(start_gateway: Callable[..., Gateway]) -> Callable[[Any], Gateway]:
    """A gateway on a private redis-server (`server`: anything with the broker's `url`); the sweep's own
    re-send (requeue after) is an hour away, so anything re-sent within the test was re-sent because the
    broker's loss was noticed."""
    return lambda server: start_gateway(broker_url=server.url, gateway_requeue_after_seconds=3600,
                                        gateway_stable_study_seconds=0.5)


def _one_study_finalized(own_gateway: Callable[[Any], Gateway], server: RedisServer,
                         images) -> tuple[Gateway, redis.Redis, str]:
    """A gateway on `server` that stored one image and sent its study's finalize: (gateway, client, study)."""
    gateway = own_gateway(server)
    client = server.client()
    study = generate_uid()
    assert store_with_pynetdicom(gateway.port, [small_dataset(images, 0, study_uid=study)]) == [0]
    wait_for(lambda: _tasks(client, FINALIZE_STUDY) == [[study]], 15, what="the finalize")
    return gateway, client, study


def _scored_study_and_pending_study(gateway: Gateway, client: redis.Redis, images) -> tuple[str, str]:
    """Study A: its image scored (message taken, file archived), its finalize still queued behind a
    backlog. Study B: its image still pending. Returns (A, B)."""
    scored, pending = generate_uid(), generate_uid()
    assert store_with_pynetdicom(gateway.port, [small_dataset(images, 0, study_uid=scored)]) == [0]
    wait_for(lambda: _tasks(client, FINALIZE_STUDY) == [[scored]], 15, what="study A's finalize")
    for raw in client.lrange(QUEUE, 0, -1):  # the worker took A's image and archived its file
        if b"process_instance" in raw:
            client.lrem(QUEUE, 1, raw)
    for path in pending_files(gateway.settings.spool_dir):
        path.unlink()
    assert store_with_pynetdicom(gateway.port, [small_dataset(images, 1, study_uid=pending)]) == [0]
    wait_for(lambda: _tasks(client, FINALIZE_STUDY) == [[scored], [pending]], 15, what="study B's finalize")
    return scored, pending


def test_a_broker_restarted_without_persistence_gets_what_it_lost_at_once(own_gateway, tmp_path, images):
    """Before: the pending image was re-sent only after TRIAGE_GATEWAY_REQUEUE_AFTER_SECONDS (30 min),
    and study A's finalize never (its image was scored, nothing pending): A stayed not final for good."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        gateway = own_gateway(server)
        client = server.client()
        scored, pending = _scored_study_and_pending_study(gateway, client, images)
        server.stop()
        server.start()  # empty: no persistence (the gateway may re-send before a look at the queue here)
        wait_for(lambda: _tasks(client, PROCESS_INSTANCE), 15, what="the pending image sent again")
        finals = wait_for(lambda: sorted(map(tuple, _tasks(client, FINALIZE_STUDY))) == sorted([(scored,), (pending,)]),
                          15, what="both finalizes sent again")
        assert finals
        assert [args[1] for args in _tasks(client, PROCESS_INSTANCE)] == [p.stem for p in
                                                                          pending_files(gateway.settings.spool_dir)]
        assert gateway.status()["broker_queue_losses"] == 1
    finally:
        server.stop()


def test_a_broker_that_kept_its_data_gets_nothing_twice(own_gateway, tmp_path, images):
    """Redis restarted with appendonly (as compose runs it): the queue is intact, and re-sending it would
    only make duplicate deliveries."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    try:
        gateway = own_gateway(server)
        client = server.client()
        _scored_study_and_pending_study(gateway, client, images)
        before = client.lrange(QUEUE, 0, -1)
        server.stop()
        server.start()
        assert client.lrange(QUEUE, 0, -1) == before, "not a test: the restart lost the queue"
        wait_for(lambda: gateway.last_sweep.get("at", 0) > time.time() - 0.2, 10, what="a sweep after the restart")
        time.sleep(1.5)  # three more sweeps
        assert client.lrange(QUEUE, 0, -1) == before
        assert gateway.status()["broker_queue_losses"] == 0
    finally:
        server.stop()


def test_a_finalize_taken_before_the_loss_is_not_sent_again(own_gateway, tmp_path, images):
    """Once the broker held nothing, queued or unacknowledged, the finalizes sent before were done with: the
    gateway forgets them rather than re-sending every study it ever saw."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        gateway, client, study = _one_study_finalized(own_gateway, server, images)
        client.delete(QUEUE)  # a worker took both messages
        for path in pending_files(gateway.settings.spool_dir):
            path.unlink()
        wait_for(lambda: not gateway.tracker._sent, 15, what="the broker seen idle")  # sweeps every 0.5 s
        server.stop()
        server.start()
        wait_for(lambda: gateway.status()["broker_queue_losses"] == 1, 15, what="the loss noticed")
        time.sleep(1.5)  # past the stable-study period
        assert queued_tasks(client) == []
    finally:
        server.stop()


def test_a_broker_that_refuses_the_key_is_one_warning_and_publishing_goes_on(own_gateway, tmp_path, images, caplog):
    """A Redis ACL that allows Celery's keys only (its queue and priority lists, kombu's bindings and unacked
    messages; NOPERM on ours): the watch is off, which is said once,
    and nothing else changes (every sweep failed quietly before the warning was there)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "celery", "on", ">secret", "~_kombu*", f"~{QUEUE}", f"~{QUEUE}[^:]*", "~unacked*",
                              "&*", "+@all")
        as_celery = SimpleNamespace(url=f"redis://celery:secret@127.0.0.1:{server.port}/0")
        with caplog.at_level("WARNING", logger="dicom_gateway.broker_watch"):
            gateway = own_gateway(as_celery)
            study = generate_uid()
            assert store_with_pynetdicom(gateway.port, [small_dataset(images, 0, study_uid=study)]) == [0]
            wait_for(lambda: _tasks(admin, FINALIZE_STUDY) == [[study]], 15, what="the finalize")
            time.sleep(1.5)  # three more sweeps
        warnings = [r for r in caplog.records if "refuses the gateway's key" in r.getMessage()]
        assert len(warnings) == 1 and "secret" not in warnings[0].getMessage()
        assert gateway.status()["broker_queue_losses"] == 0
    finally:
        server.stop()


def test_a_finalize_a_worker_holds_unacknowledged_is_sent_again(own_gateway, tmp_path, images):
    """A finalize that waits for its study is retried with a countdown: the worker takes the retry off the
    queue and holds it unacknowledged, and drops it when the connection breaks. The gateway took the empty
    queue for "taken" and forgot it; after a restart without persistence the study stayed not final."""
    from kombu import Connection

    server = RedisServer(tmp_path / "redis")
    server.start()
    consumer = Connection(server.url)
    try:
        gateway, client, study = _one_study_finalized(own_gateway, server, images)
        for raw in client.lrange(QUEUE, 0, -1):  # a worker took the image and scored it ...
            if b"process_instance" in raw:
                client.lrem(QUEUE, 1, raw)
        for path in pending_files(gateway.settings.spool_dir):
            path.unlink()
        held = consumer.SimpleQueue(QUEUE)  # ... and holds the finalize: a real kombu delivery, not acknowledged
        assert held.get(timeout=10).headers["task"] == FINALIZE_STUDY
        assert client.llen(QUEUE) == 0 and client.hlen("unacked") == 1
        time.sleep(1.5)  # sweeps every 0.5 s: the queue is seen empty, the unacknowledged store is not
        server.stop()
        server.start()
        wait_for(lambda: gateway.status()["broker_queue_losses"] == 1, 15, what="the loss noticed")
        wait_for(lambda: _tasks(client, FINALIZE_STUDY) == [[study]], 15, what="the held finalize sent again")
    finally:
        consumer.release()
        server.stop()
