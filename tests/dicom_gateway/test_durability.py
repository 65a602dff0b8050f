"""Durability: Success only for instances that can no longer be lost.

Broker outage, gateway SIGKILL mid-push, aborted associations, unwritable spool (real
OSErrors: RLIMIT_FSIZE -> EFBIG, a file where a directory should be -> ENOTDIR).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_gateway.service import Gateway
from tests.dicom_gateway.conftest import RedisServer, gateway_subprocess, small_dataset
from tests.dicom_gateway.helpers import (
    free_port,
    pending_files,
    queued_tasks,
    run_storescu,
    store_with_pynetdicom,
    wait_for,
)
from worker.contract import FINALIZE_STUDY, PROCESS_INSTANCE, pending_relpath

pytestmark = pytest.mark.redis


def _process_messages(client) -> list[dict]:
    return [t for t in queued_tasks(client) if t["task"] == PROCESS_INSTANCE]


def test_broker_down_still_stores_then_sweep_queues_each_once(settings_factory, tmp_path, images):
    """Redis stopped while 50 instances are pushed; after restart each is queued exactly once."""
    own = RedisServer(tmp_path / "redis-own")
    own.start()
    gateway = Gateway(settings_factory(broker_url=own.url))
    gateway.start()
    try:
        own.stop()
        study = generate_uid()
        datasets = [small_dataset(images, i, study_uid=study) for i in range(50)]
        codes = store_with_pynetdicom(gateway.port, datasets)
        assert codes == [0x0000] * 50, "broker down must not fail the C-STORE"
        assert len(pending_files(gateway.spool.root)) == 50
        own.start()
        client = own.client()
        wanted = {str(ds.SOPInstanceUID) for ds in datasets}
        wait_for(lambda: {t["args"][1] for t in _process_messages(client)} == wanted, 20, what="sweep to queue all 50")
        time.sleep(2 * gateway.settings.gateway_sweep_interval_seconds + 0.5)  # further sweeps must not duplicate
        counts = Counter(t["args"][1] for t in _process_messages(client))
        assert len(counts) == 50 and set(counts.values()) == {1}, counts.most_common(3)
        for t in _process_messages(client):
            assert t["args"][0] == pending_relpath(study, t["args"][1])
        finals = wait_for(lambda: [t for t in queued_tasks(client) if t["task"] == FINALIZE_STUDY], 10, what="finalize")
        assert [f["args"] for f in finals] == [[study]]
    finally:
        gateway.stop(timeout=2)
        own.stop()


def test_a_hung_broker_does_not_make_parallel_stores_wait_in_turn(settings_factory, tmp_path, images):
    """Redis stopped with SIGSTOP (hung or partitioned: connections open, nothing answers). Parallel
    C-STOREs used to queue on the publish lock and each wait its own broker timeout in turn (8
    associations answered after 1, 2, ... 8 timeouts, past a modality's DIMSE timeout), although
    every instance was already durable. Each answer must take about one timeout whatever the number
    of associations; once Redis runs again the sweep queues what the stores left to it."""
    own = RedisServer(tmp_path / "redis-own")
    own.start()
    timeout, senders = 1.5, 8
    # No periodic sweep while Redis is stopped (its forced publishes would also wait on it), and a
    # long backoff: only the first store's publish reaches the stopped Redis.
    gateway = Gateway(settings_factory(broker_url=own.url, gateway_broker_timeout_seconds=timeout,
                                       gateway_broker_backoff_seconds=600, gateway_sweep_interval_seconds=3600))
    gateway.start()
    datasets = [small_dataset(images, i, study_uid=generate_uid()) for i in range(senders)]

    def timed_store(ds) -> tuple[list[int], float]:
        started = time.monotonic()
        codes = store_with_pynetdicom(gateway.port, [ds])
        return codes, time.monotonic() - started

    try:
        wait_for(lambda: gateway.last_sweep, 10, what="the start-up sweep")
        os.kill(own.proc.pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(senders) as pool:
                results = list(pool.map(timed_store, datasets))
        finally:
            os.kill(own.proc.pid, signal.SIGCONT)
        assert [codes for codes, _ in results] == [[0x0000]] * senders
        took = sorted(round(seconds, 2) for _, seconds in results)
        # in turn, the last would wait senders x timeout (8 x); 4 x leaves a loaded machine room
        assert took[-1] < 4 * timeout, f"C-STORE answers waited on each other: {took}"
        assert len(pending_files(gateway.spool.root)) == senders
        client = own.client()
        assert gateway.outbox.sweep()["queued"] == senders
        assert gateway.outbox.sweep()["queued"] == 0, "a queued instance is not re-sent before REQUEUE_AFTER"
        counts = Counter(t["args"][1] for t in _process_messages(client))
        assert set(counts) == {str(ds.SOPInstanceUID) for ds in datasets}
        # At-least-once: the one publish that was on the wire when Redis stopped may run on SIGCONT.
        assert sum(counts.values()) <= senders + 1, counts.most_common(3)
    finally:
        gateway.stop(timeout=2)
        own.stop()


def test_a_failed_sweep_keeps_the_bookkeeping_of_every_pending_file(tmp_path):
    """Redis refusing writes (maxmemory reached) while instances are pending: the sweep used to stop
    listing at the first failed publish and then forget that every file after it had been queued,
    so they were all re-queued after the grace period (21 messages for 11 instances), and it
    reported one failure and one pending file however large the backlog."""
    from dicom_gateway.config import GatewaySettings
    from dicom_gateway.queue import Outbox, TaskPublisher
    from dicom_gateway.spool import Spool

    own = RedisServer(tmp_path / "redis-own")
    own.start()
    client = own.client()
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    study = generate_uid()
    for _ in range(13):
        spool.store([b"instance"], study, generate_uid())
    listed = [item for item in spool.iter_pending()]  # directory order, stable while nothing changes
    publisher = TaskPublisher(GatewaySettings(broker_url=own.url, gateway_broker_timeout_seconds=1.0))
    outbox = Outbox(spool, publisher, grace_s=0.0, requeue_after_s=1800.0)
    try:
        for item in listed[1:11]:
            assert outbox.publish(item.relpath, item.sop_uid, "t")
        client.config_set("maxmemory", 1)  # noeviction: every write is refused with OOM
        assert not outbox.publish(listed[0].relpath, listed[0].sop_uid, "t")  # the first one listed
        # listed[11:] were never published (a previous run died first): due as well.
        assert outbox.sweep() == {"queued": 0, "failed": 3, "pending": 13}
        client.config_set("maxmemory", 0)
        assert outbox.sweep() == {"queued": 3, "failed": 0, "pending": 13}
        assert outbox.sweep() == {"queued": 0, "failed": 0, "pending": 13}
        counts = Counter(t["args"][1] for t in _process_messages(client))
        assert counts == Counter(item.sop_uid for item in listed), counts.most_common(3)
    finally:
        publisher.close()
        own.stop()


def subprocess_env(broker_url: str, spool: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of a `dicom-gateway run` subprocess on loopback, with no free-space floor."""
    return {"TRIAGE_BROKER_URL": broker_url, "TRIAGE_SPOOL_DIR": str(spool), "TRIAGE_GATEWAY_PORT": str(port),
            "TRIAGE_GATEWAY_BIND": "127.0.0.1", "TRIAGE_GATEWAY_MIN_FREE_BYTES": "0", **extra}


def test_gateway_sigkill_mid_push_every_success_is_queued_after_restart(settings_factory, tmp_path, images, broker, redis_server):
    """Kill -9 during a push; the restarted gateway publishes every acknowledged instance."""
    port = free_port()
    spool = tmp_path / "spool"
    env = subprocess_env(redis_server.url, spool, port, TRIAGE_GATEWAY_SWEEP_INTERVAL_SECONDS="0.5",
                         TRIAGE_GATEWAY_STABLE_STUDY_SECONDS="1")
    proc = gateway_subprocess(env, tmp_path / "gateway.log")
    acked: list[str] = []
    try:
        wait_for(lambda: _echo_ok(port), 20, what="gateway subprocess to listen")
        datasets = [small_dataset(images, i, size=(256, 256), study_uid=generate_uid()) for i in range(200)]

        def record(ds, code):
            if code == 0:
                acked.append(str(ds.SOPInstanceUID))
            if len(acked) == 30:
                os.kill(proc.pid, signal.SIGKILL)

        try:
            codes = store_with_pynetdicom(port, datasets, on_status=record)
        except (RuntimeError, ConnectionError):
            codes = []
        assert -1 in codes or len(codes) < 200, "the push must have been cut by the kill"
        proc.wait(10)
        assert 30 <= len(acked) < 200
        broker.flushall()  # pretend the broker lost everything too: only the spool can save us
        on_disk = {p.stem for p in pending_files(spool)}
        assert set(acked) <= on_disk, "an acknowledged instance is missing from the spool"
        proc = gateway_subprocess(env, tmp_path / "gateway.log")
        wait_for(lambda: _echo_ok(port), 20, what="gateway restart")
        assert list((spool / "incoming").iterdir()) == []
        wait_for(lambda: set(acked) <= {t["args"][1] for t in _process_messages(broker)}, 20, what="acked instances re-queued")
    finally:
        proc.kill()
        proc.wait(10)


def _echo_ok(port: int) -> bool:
    from dicom_gateway.health import echo
    from dicom_gateway.config import GatewaySettings

    return bool(echo(GatewaySettings(gateway_port=port), "127.0.0.1", timeout=2)["ok"])


def test_aborted_association_keeps_acknowledged_instances(gateway, images, broker):
    datasets = [small_dataset(images, i) for i in range(3)]
    codes = store_with_pynetdicom(gateway.port, datasets, abort=True)
    assert codes == [0, 0, 0]
    assert {p.stem for p in pending_files(gateway.spool.root)} == {str(d.SOPInstanceUID) for d in datasets}
    wait_for(lambda: len(_process_messages(broker)) == 3, 5, what="3 messages")


def test_duplicate_sop_instance_is_one_spool_file(gateway, images, broker):
    ds = small_dataset(images, 0)
    assert store_with_pynetdicom(gateway.port, [ds]) == [0]
    assert store_with_pynetdicom(gateway.port, [ds]) == [0]
    assert [p.stem for p in pending_files(gateway.spool.root)] == [str(ds.SOPInstanceUID)]
    # Both publishes carry the same SOP UID: the worker upserts per SOP Instance UID.
    wait_for(lambda: {t["args"][1] for t in _process_messages(broker)} == {str(ds.SOPInstanceUID)}, 5, what="message")


def replace_incoming_with_a_file(incoming: Path) -> None:
    """Put a file where incoming/ was, renamed into place and retried: the gateway's maintenance loop
    recreates a missing incoming/ folder, and did so between an rmdir and a write on a loaded CI machine."""
    blocker = incoming.with_name("blocker")
    blocker.write_text("not a directory")
    for _ in range(100):
        try:
            if incoming.is_dir():
                incoming.rmdir()
            os.rename(blocker, incoming)
            break
        except OSError:  # recreated in between (IsADirectoryError) or already gone: again
            continue
    assert incoming.is_file()


def test_spool_not_writable_answers_out_of_resources(gateway, images, broker):
    """incoming/ replaced by a file: the open() fails with ENOTDIR -> 0xA700, never Success."""
    replace_incoming_with_a_file(gateway.spool.incoming)
    ds = small_dataset(images, 0)
    assert store_with_pynetdicom(gateway.port, [ds]) == [0xA700]
    assert pending_files(gateway.spool.root) == []
    assert _process_messages(broker) == []
    assert gateway.status()["cstore_failures"] == {"0xA700": 1}  # counted for /metrics, not only logged


def test_file_size_limit_answers_failure_and_leaves_no_partial(tmp_path, images, broker, redis_server):
    """RLIMIT_FSIZE makes write() fail with EFBIG (a real 'disk full' for this process; root cannot bypass it)."""
    port = free_port()
    spool = tmp_path / "spool"
    limit = 64 * 1024
    env = {
        "TRIAGE_BROKER_URL": redis_server.url,
        "TRIAGE_SPOOL_DIR": str(spool),
        "TRIAGE_GATEWAY_PORT": str(port),
        "TRIAGE_GATEWAY_BIND": "127.0.0.1",
        "TRIAGE_GATEWAY_MIN_FREE_BYTES": "0",
    }
    proc = gateway_subprocess(env, tmp_path / "gateway.log", preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    try:
        wait_for(lambda: _echo_ok(port), 20, what="gateway subprocess")
        big = small_dataset(images, 0, size=(512, 512))  # ~512 KiB > limit
        small = small_dataset(images, 1, size=(64, 64))  # ~8 KiB < limit
        assert store_with_pynetdicom(port, [big, small]) == [0xA700, 0x0000]
        assert [p.stem for p in pending_files(spool)] == [str(small.SOPInstanceUID)]
        assert list((spool / "incoming").iterdir()) == [], "the failed partial write must be removed"
    finally:
        proc.terminate()
        proc.wait(15)
    assert proc.returncode == 0
    text = (tmp_path / "gateway.log").read_text()
    assert "EFBIG" in text and "C-STORE not persisted" in text
    assert "SYNTHETIC" not in text and "SYN-000001" not in text, "patient name/ID must never be logged"


def test_storescu_sees_failure_status_for_unwritable_spool(gateway, dcmtk, make_study):
    replace_incoming_with_a_file(gateway.spool.incoming)
    [path] = make_study(1)
    out = run_storescu(dcmtk("storescu"), gateway.port, [path])
    assert "Received Store Response (Refused: OutOfResources)" in out.stderr + out.stdout
    assert pending_files(gateway.spool.root) == []


class RedisRelay:
    """A TCP relay to Redis. `delay` holds every chunk that long: a slow but healthy broker (a congested
    WAN link, a busy Redis), as opposed to a hung one. Clearing `flowing` keeps Redis's replies back while
    commands still pass: the broker has the message, the client is still waiting for the answer."""

    def __init__(self, upstream_port: int, delay: float = 0.0) -> None:
        import socket
        import threading

        self.delay, self.upstream = delay, upstream_port
        self.flowing = threading.Event()
        self.flowing.set()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source, target, replies: bool) -> None:
        try:
            while chunk := source.recv(65536):
                time.sleep(self.delay)
                while replies and not self.flowing.wait(0.1):
                    pass
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            target.close()

    def close(self) -> None:
        self.flowing.set()
        self.server.close()


@contextlib.contextmanager
def publisher_over_slow_link(settings_factory, tmp_path, delay: float, timeout: float):
    """A TaskPublisher to a private Redis through a slow RedisRelay, already connected (one publish sent);
    yields it and a client of that Redis."""
    from dicom_gateway.queue import TaskPublisher

    own = RedisServer(tmp_path / "redis-own")
    own.start()
    link = RedisRelay(own.port, delay=delay)
    publisher = TaskPublisher(settings_factory(broker_url=f"redis://127.0.0.1:{link.port}/0",
                                               gateway_broker_timeout_seconds=timeout))
    try:
        assert publisher.process_instance("warm/up.dcm", "1.2.3", "2026-01-01T00:00:00+00:00")
        yield publisher, own.client()
    finally:
        publisher.close()
        link.close()
        own.stop()


def test_a_slow_but_answering_broker_gets_every_publish(settings_factory, tmp_path):
    """Publishes wait their turn behind one another while the broker keeps answering: only a
    publish stuck longer than the broker timeout makes the others leave their instance to the
    sweep. Eight parallel C-STORE publishes over a slow link used to give up after one timeout of
    queueing (about half of them, with no error anywhere) although every publish would succeed."""
    timeout, senders = 1.0, 8
    with publisher_over_slow_link(settings_factory, tmp_path, 0.1, timeout) as (publisher, client):
        started = time.monotonic()
        with ThreadPoolExecutor(senders) as pool:
            sent = list(pool.map(lambda i: publisher.process_instance(f"s/{i}.dcm", f"1.2.{i}", "2026-01-01T00:00:00+00:00"),
                                 range(senders)))
        took = time.monotonic() - started
        assert took > timeout, f"the link was not slow enough to queue the publishes ({took:.2f} s)"
        assert sent == [True] * senders and publisher.last_error is None
        assert len(_process_messages(client)) == senders + 1


def test_a_sweep_re_sending_a_backlog_lets_a_c_store_publish_through(settings_factory, tmp_path):
    """The sweep's (forced) publishes give way to a waiting C-STORE, which gets the next turn
    instead of waiting behind the backlog past its DIMSE timeout. With a plain lock that order
    was left to the thread scheduler (a review reproduced 12 s of waiting with a broker stub); over
    real Redis the C-STORE happened to get in too, so this guards the behaviour, it does not show
    the old code failing."""
    import threading

    timeout, backlog = 1.0, 40
    sweep_done = []
    with publisher_over_slow_link(settings_factory, tmp_path, 0.05, timeout) as (publisher, client):
        def sweep() -> None:
            for i in range(backlog):
                publisher.process_instance(f"b/{i}.dcm", f"1.4.{i}", "2026-01-01T00:00:00+00:00", force=True)
                sweep_done.append(i)

        sweeper = threading.Thread(target=sweep)
        sweeper.start()
        wait_for(lambda: len(sweep_done) >= 3, 10, what="the sweep to be under way")
        started = time.monotonic()
        assert publisher.process_instance("s/0.dcm", "1.2.9", "2026-01-01T00:00:00+00:00")
        waited = time.monotonic() - started
        left = backlog - len(sweep_done)
        sweeper.join(60)
        assert left > 10, f"the backlog was nearly sent before the C-STORE publish ({left} left): not a test"
        assert waited < timeout, f"a C-STORE publish waited {waited:.2f} s behind the sweep's backlog"
        assert len(_process_messages(client)) == backlog + 2


def test_a_finalize_lost_with_its_instances_is_sent_again_when_the_sweep_re_sends_them(start_gateway, broker, images):
    """Redis restarted without persistence after the study's finalize was published: the sweep re-sent
    the instances, but nothing re-sent the finalize, and the study stayed not final for good."""
    gateway = start_gateway(gateway_requeue_after_seconds=2)
    study = generate_uid()
    assert store_with_pynetdicom(gateway.port, [small_dataset(images, 0, study_uid=study)]) == [0]
    wait_for(lambda: [t for t in queued_tasks(broker) if t["task"] == FINALIZE_STUDY], 10, what="first finalize")
    broker.flushdb()  # the restart: both messages gone, the file still pending (no worker here)
    wait_for(lambda: _process_messages(broker), 10, what="the sweep to re-send the instance")
    finals = wait_for(lambda: [t for t in queued_tasks(broker) if t["task"] == FINALIZE_STUDY], 10, what="finalize again")
    assert [f["args"] for f in finals] == [[study]]


def test_a_gateway_killed_while_publishing_still_finalizes_the_study_after_restart(
        start_gateway, tmp_path, images, broker, redis_server):
    """SIGKILL between the instance's publish and the study's open-study marker: the marker was written
    after the publish, so when the worker archived the instance before the gateway came back, the
    restarted gateway found neither a marker nor a pending file for the study, and its finalize (the
    worklist's final flag) was never sent (only `pneumonia-admin requeue` found it, as overdue)."""
    from worker.spool import retire

    relay = RedisRelay(redis_server.port)
    port = free_port()
    spool = tmp_path / "spool"
    env = subprocess_env(relay.url, spool, port,
                         TRIAGE_GATEWAY_STABLE_STUDY_SECONDS="3600",  # no finalize from this process
                         TRIAGE_GATEWAY_BROKER_TIMEOUT_SECONDS="120")  # the publish waits for its reply until the kill
    proc = gateway_subprocess(env, tmp_path / "gateway.log")
    try:
        wait_for(lambda: _echo_ok(port), 20, what="gateway subprocess to listen")
        assert store_with_pynetdicom(port, [small_dataset(images, 0)]) == [0]  # the publisher's connection is up
        wait_for(lambda: len(_process_messages(broker)) == 1, 10, what="the first instance's message")
        broker.flushall()
        relay.flowing.clear()
        study = generate_uid()
        ds = small_dataset(images, 1, study_uid=study)
        with ThreadPoolExecutor(1) as pool:
            pending_store = pool.submit(store_with_pynetdicom, port, [ds])
            [message] = wait_for(lambda: _process_messages(broker), 30, what="the publish to reach Redis")
            os.kill(proc.pid, signal.SIGKILL)  # the publish is in Redis; the gateway still waits for its reply
            proc.wait(10)
            with contextlib.suppress(ConnectionError, RuntimeError):
                assert pending_store.result(60) != [0]
        # the worker takes the message and archives the instance before the gateway is back
        assert message["args"][0] == pending_relpath(study, str(ds.SOPInstanceUID))
        broker.flushall()
        retire(spool, spool / message["args"][0], study, str(ds.SOPInstanceUID), "archive")
        assert not (spool / message["args"][0]).exists()
    finally:
        relay.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    start_gateway(spool_dir=spool, gateway_stable_study_seconds=1.0)
    wait_for(lambda: [study] in [t["args"] for t in queued_tasks(broker) if t["task"] == FINALIZE_STUDY], 15,
             what="the study's finalize after the restart")
