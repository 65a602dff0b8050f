"""Fixtures for the worker tests: real Redis, PostgreSQL, SQLite and Celery worker processes.

Every test gets its own broker (a redis-server started on a free port for the session,
flushed per environment), its own spool and its own database (SQLite file or a freshly
created PostgreSQL database), so parallel runs do not clash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

from tests.worker.support import RedisServer, TriageEnv, temporary_pg_database
from worker.config import WorkerSettings
from worker.pipeline import DetectorCache
from worker.samples import load_pneumoniamnist


@pytest.fixture(scope="session")
def test_split(data_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """PneumoniaMNIST test images (28x28 uint8) and labels."""
    return load_pneumoniamnist(data_root, "test")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL database created for this test and dropped afterwards."""
    with temporary_pg_database("triage_wt") as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'triage.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Runs a test once on SQLite and once on PostgreSQL."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return request.getfixturevalue("sqlite_url")


@pytest.fixture
def make_triage_env(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., TriageEnv]]:
    """Factory for broker + database + spool environments; stops their workers afterwards."""
    envs: list[TriageEnv] = []

    def factory(database_url: str, broker_url: str | None = None, **extra: str) -> TriageEnv:
        redis_server.flush()
        workdir = tmp_path / f"env{len(envs)}"
        workdir.mkdir()
        env = TriageEnv(broker_url or redis_server.url, database_url, workdir / "spool", workdir,
                        {f"TRIAGE_{k.upper()}": v for k, v in extra.items()})
        envs.append(env)
        return env

    yield factory
    for env in envs:
        env.close()


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> WorkerSettings:
    """Worker settings on a module's own SQLite file, for tests that call the pipeline directly."""
    return WorkerSettings(database_url=f"sqlite:///{tmp_path_factory.mktemp('db') / 't.db'}")


@pytest.fixture(scope="module")
def detectors(settings: WorkerSettings) -> DetectorCache:
    """One detector per module: the released model loads once."""
    return DetectorCache(settings)
