"""Helpers for the worker tests: private redis-server, worker subprocesses, polling."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import contextlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest
from celery import Celery
from sqlalchemy import select

from worker import admin, contract, db
from worker.samples import save

REPO_ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_DSN = os.environ.get("PYTEST_TRIAGE_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=test")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll until `predicate()` is truthy; fail the test with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class RedisServer:
    """A private redis-server (no persistence) that tests may stop and restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self.ping, 10, 0.05, "redis-server to accept connections")

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=0.5).ping())
        except redis.exceptions.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def flush(self) -> None:
        import redis

        redis.Redis(port=self.port).flushall()


@contextlib.contextmanager
def _listening(on_accept: Callable[[socket.socket], list[socket.socket]]) -> Iterator[int]:
    """A local port whose connections `on_accept` takes (returning the sockets to close at the end); yields it."""
    import threading

    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.extend(on_accept(listener.accept()[0]))

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        for connection in held:
            connection.close()


def silent_server() -> contextlib.AbstractContextManager[int]:
    """A TCP port that accepts connections and never answers (a hung server, a proxy in front of a dead
    one); yields the port. The connections stay open until the block ends."""
    return _listening(lambda connection: [connection])


def tcp_forwarder(target_port: int) -> contextlib.AbstractContextManager[int]:
    """A local port that relays every connection to 127.0.0.1:`target_port`; yields the port. With
    `silenced_port` it stands for a network path to the server that can go dead on its own."""
    import threading

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def relay(client: socket.socket) -> list[socket.socket]:
        server = socket.create_connection(("127.0.0.1", target_port))
        threading.Thread(target=pump, args=(client, server), daemon=True).start()
        threading.Thread(target=pump, args=(server, client), daemon=True).start()
        return [client, server]

    return _listening(relay)


def iptables_usable() -> bool:
    """Whether this process may add packet filter rules (root with CAP_NET_ADMIN and iptables installed,
    as `deploy/setup_dev.sh` leaves a CI machine)."""
    import shutil

    if shutil.which("iptables") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["iptables", "-w", "-L", "INPUT", "-n"], capture_output=True).returncode == 0


@contextlib.contextmanager
def silenced_port(port: int) -> Iterator[None]:
    """Every packet to or from local `port` dropped while the block runs: its established connections go
    silent both ways, as when the server's host is lost or a firewall forgets the connection (nothing
    is reset, nothing answers). The rules are removed afterwards whatever happens."""
    rules = [["INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"],
             ["INPUT", "-p", "tcp", "--sport", str(port), "-j", "DROP"]]
    added = []
    try:
        for rule in rules:
            subprocess.run(["iptables", "-w", "-I", *rule], check=True, capture_output=True)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(["iptables", "-w", "-D", *rule], capture_output=True)


def call_within(seconds: float, call: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """`call()`'s result or exception, or an AssertionError if it is still running after `seconds` (a hang
    must fail the test, not stall the suite; the call's daemon thread is left behind)."""
    import threading

    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((call(), None))
        except BaseException as exc:
            outcome.append((None, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s"
    return outcome[0]


def drop_pg_database(name: str) -> None:
    import psycopg

    for _ in range(30):  # the server may be restarting after a fault test
        try:
            with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except psycopg.OperationalError:
            time.sleep(1)


@contextlib.contextmanager
def temporary_pg_database(prefix: str) -> Iterator[str]:
    """A PostgreSQL database of its own for one test (parallel runs never clash), dropped afterwards."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 unavailable: {exc}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        drop_pg_database(name)


@dataclass
class WorkerProcess:
    """`pneumonia-worker run` as a subprocess, the way production starts it."""

    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self, timeout: float = 90) -> "WorkerProcess":
        self.starts += 1
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
            cwd=self.env["PYTEST_TRIAGE_CWD"], start_new_session=True,
        )
        log.close()
        wait_for(lambda: self._ready_count() >= self.starts or self._died(), timeout, 0.2, "worker ready")
        assert not self._died(), f"worker exited early:\n{self.log()[-3000:]}"
        wait_for(self.pool_children, 60, 0.2, "pool process with model loaded")
        return self

    def _ready_count(self) -> int:
        return self.log().count(" ready.")

    def _died(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pool_children(self) -> list[psutil.Process]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return psutil.Process(self.proc.pid).children(recursive=True)

    def kill_all(self) -> None:
        """SIGKILL the main process and its pool: an abrupt crash, nothing gets acknowledged."""
        if self.proc is None:
            return
        victims = [psutil.Process(self.proc.pid), *self.pool_children()]
        for victim in victims:
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(10)
        psutil.wait_procs(victims, timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        children = self.pool_children()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill_all()
            return
        psutil.wait_procs(children, timeout=10)
        for child in children:
            if child.is_running():
                child.kill()
        self.proc = None


@dataclass
class TriageEnv:
    """Broker + database + spool for one test, and helpers to drive a real worker."""

    broker_url: str
    database_url: str
    spool: Path
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    workers: list[WorkerProcess] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        env.update(
            TRIAGE_BROKER_URL=self.broker_url,
            TRIAGE_DATABASE_URL=self.database_url,
            TRIAGE_SPOOL_DIR=str(self.spool),
            PYTEST_TRIAGE_CWD=str(self.workdir),
            TRIAGE_INTRA_OP_THREADS="2",
            **self.extra_env,
        )
        for key in ("TRIAGE_MODEL_PATH",):
            if key in os.environ:
                env[key] = os.environ[key]
        return env

    def start_worker(self) -> WorkerProcess:
        worker = WorkerProcess(self.env(), self.workdir / f"worker{len(self.workers)}.log")
        self.workers.append(worker)
        return worker.start()

    def client(self) -> Celery:
        return Celery("triage-test-client", broker=self.broker_url, set_as_current=False)

    def stage(self, ds: Any) -> tuple[str, str]:
        """Put a dataset where the gateway would: pending/<Study>/<SOP>.dcm; returns (relpath, sop)."""
        relpath = contract.pending_relpath(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
        save(ds, self.spool / relpath)
        return relpath, str(ds.SOPInstanceUID)

    def send(self, relpath: str, sop: str, received_at: str = "2026-01-01T00:00:00+00:00") -> None:
        client = self.client()
        client.send_task(contract.PROCESS_INSTANCE, args=(relpath, sop), kwargs={"received_at": received_at},
                         queue=contract.QUEUE)
        client.close()

    def finalize(self, study_uid: str) -> None:
        client = self.client()
        client.send_task(contract.FINALIZE_STUDY, args=(study_uid,),
                         kwargs={"last_received_at": "2026-01-01T00:00:00+00:00"}, queue=contract.QUEUE)
        client.close()

    def rows(self) -> dict[str, dict[str, Any]]:
        """Rows by SOP Instance UID. Instances are (Study, SOP) since migration 0003, so a SOP stored
        under two studies would make this lookup drop one row: that is refused, not collapsed."""
        engine = db.make_engine(self.database_url)
        try:
            with engine.connect() as conn:
                found = [dict(r) for r in conn.execute(select(db.instances)).mappings()]
        except Exception:  # not migrated yet
            return {}
        finally:
            engine.dispose()
        by_sop = {r["sop_instance_uid"]: r for r in found}
        assert len(by_sop) == len(found), "a SOP Instance UID under two studies: look rows up by (study, SOP)"
        return by_sop

    def study(self, study_uid: str) -> dict[str, Any] | None:
        """The study's worklist row (`study_flags`), None while it has none."""
        engine = db.make_engine(self.database_url)
        try:
            with engine.connect() as conn:
                found = conn.execute(select(db.study_flags).where(db.study_flags.c.study_instance_uid == study_uid))
                first = found.mappings().first()
        finally:
            engine.dispose()
        return dict(first) if first else None

    def wait_terminal(self, sops: list[str], timeout: float = 120) -> dict[str, dict[str, Any]]:
        def done() -> dict[str, dict[str, Any]] | None:
            rows = self.rows()
            if all(s in rows and rows[s]["status"] in db.TERMINAL for s in sops):
                return rows
            return None

        try:
            return wait_for(done, timeout, 0.3, f"{len(sops)} terminal rows")
        except AssertionError:
            logs = "\n".join(w.log()[-4000:] for w in self.workers)
            raise AssertionError(f"rows not terminal in {timeout}s; worker log tail:\n{logs}") from None

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()


def run_admin(url: str, *args: str) -> str:
    """What `pneumonia-admin --database-url URL ARGS` prints, asserting it exits 0."""
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert admin.main(["--database-url", url, *args]) == 0
    return out.getvalue()
