"""Fixtures for gateway tests: a private Redis, DCMTK tools, sample CXR files, a gateway.

Everything is real: the gateway is the production `Gateway` listening on a free port,
clients are DCMTK binaries or pynetdicom SCUs, the broker is a real redis-server we
start ourselves (never the machine's shared Redis, whose consumers would eat our
messages).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import redis
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_gateway.config import GatewaySettings
from dicom_gateway.service import Gateway
from tests.dicom_gateway.helpers import dcmtk_tool, free_port, wait_for
from worker.samples import make_cxr_dataset, save


class RedisServer:
    """A throwaway redis-server that tests may stop and start: no persistence (a restart loses
    everything) unless `appendonly` (as compose runs it: a restart keeps what was written)."""

    def __init__(self, workdir: Path, port: int | None = None, *, appendonly: bool = False) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not installed: the gateway tests need a real Redis (.ci/run installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "yes" if self.appendonly else "no", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = self.client()
        wait_for(lambda: _ping(client), 10, what="redis-server to answer PING")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def broker(redis_server: RedisServer) -> redis.Redis:
    """The session Redis, emptied for this test."""
    client = redis_server.client()
    client.flushall()
    return client


@pytest.fixture(scope="session")
def dcmtk() -> Callable[[str], str]:
    """Resolve a DCMTK tool; a missing one fails the test (the DICOM exchanges are real; .ci/run installs DCMTK)."""

    def tool(name: str) -> str:
        path = dcmtk_tool(name)
        if path is None:
            pytest.fail(f"DCMTK tool {name!r} not installed (apt-get install dcmtk)")
        return path

    return tool


@pytest.fixture(scope="session")
def images(pneumoniamnist: dict[str, np.ndarray]) -> np.ndarray:
    """A few real PneumoniaMNIST thumbnails (test split) to build DICOM objects from."""
    return pneumoniamnist["test_images"][:64]


@pytest.fixture
def make_study(images: np.ndarray, tmp_path: Path) -> Callable[..., list[Path]]:
    """Write `n` small CXR files of one new study under tmp_path; returns their paths."""
    counter = iter(range(10**6))

    def factory(n: int = 1, *, size: tuple[int, int] = (64, 64), out: Path | None = None, **kw: object) -> list[Path]:
        target = out or tmp_path / f"study{next(counter)}"
        study_uid, series_uid = kw.pop("study_uid", None) or generate_uid(), generate_uid()
        paths = []
        for i in range(n):
            ds = make_cxr_dataset(
                images[i % len(images)], size=size, study_uid=study_uid, series_uid=series_uid, instance_number=i + 1, **kw
            )
            paths.append(save(ds, target / f"{ds.SOPInstanceUID}.dcm"))
        return paths

    return factory


def small_dataset(images: np.ndarray, index: int = 0, **kw: object) -> Dataset:
    """One 64x64 CR dataset (fast to build and send)."""
    kw.setdefault("size", (64, 64))
    return make_cxr_dataset(images[index % len(images)], **kw)


@pytest.fixture
def settings_factory(tmp_path: Path, redis_server: RedisServer) -> Callable[..., GatewaySettings]:
    """Test settings: port 0, short timers, no disk threshold, private broker."""

    def factory(**kw: object) -> GatewaySettings:
        base: dict[str, object] = {
            "broker_url": redis_server.url,
            "spool_dir": tmp_path / "spool",
            "gateway_bind": "127.0.0.1",
            "gateway_port": 0,
            "gateway_stable_study_seconds": 1.0,
            "gateway_sweep_interval_seconds": 0.5,
            "gateway_sweep_grace_seconds": 1.0,
            "gateway_min_free_bytes": 0,
            "gateway_broker_timeout_seconds": 1.0,
            "gateway_broker_backoff_seconds": 0.5,
        }
        base.update(kw)
        return GatewaySettings(**base)

    return factory


@pytest.fixture
def start_gateway(settings_factory: Callable[..., GatewaySettings]) -> Iterator[Callable[..., Gateway]]:
    """Start in-process gateways (stopped at teardown); returns the running `Gateway`."""
    running: list[Gateway] = []

    def factory(**kw: object) -> Gateway:
        gateway = Gateway(settings_factory(**kw))
        gateway.start()
        running.append(gateway)
        return gateway

    yield factory
    for gateway in running:
        gateway.stop(timeout=2)


@pytest.fixture
def gateway(start_gateway: Callable[..., Gateway], broker: redis.Redis) -> Gateway:
    """A gateway with default test settings on an emptied broker."""
    return start_gateway()


def gateway_subprocess(settings_env: dict[str, str], log_path: Path, **popen: object) -> subprocess.Popen:
    """`dicom-gateway run` as a real process (for SIGKILL and rlimit tests), logging to `log_path`.

    A file, not a pipe: an unread pipe fills up and blocks the gateway's logging.
    """
    env = {**os.environ, **settings_env}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "dicom_gateway.cli", "run"], env=env, stdout=log, stderr=subprocess.STDOUT, **popen
        )
