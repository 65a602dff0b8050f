"""Alembic environment: online migrations only, serialised (PostgreSQL: an advisory lock; SQLite: a lock file).

Why the lock: several workers may start at once and each runs `upgrade head`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from alembic import context
from sqlalchemy import event, text

from worker.db import make_engine, metadata, sqlite_path

MIGRATION_LOCK_ID = 7_311_003


def run_migrations_online() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    if engine.dialect.name == "sqlite":
        _transactional_sqlite(engine)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _transactional_sqlite(engine) -> None:  # type: ignore[no-untyped-def]
    """Each revision in one SQLite transaction, its stamp included (SQLAlchemy's recipe for pysqlite).

    Why: Python's sqlite3 runs DDL outside any transaction unless one is open, so every statement of a
    migration was committed as it ran. An upgrade stopped part-way (the worker killed or the disk full while it
    migrated at start, any error) kept 0006's first columns with the schema still stamped 0005, and every later
    attempt failed on them ("duplicate column name: reopened_count"): `run` exited 3 at every start until the
    file was repaired by hand. SQLite's DDL is transactional once the driver leaves the transactions to us."""

    @event.listens_for(engine, "connect")
    def _driver_leaves_transactions_alone(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN")


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    is_pg = connection.dialect.name == "postgresql"
    with _serialised(connection):
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=not is_pg)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


@contextlib.contextmanager
def _serialised(connection) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """One migration at a time per database: an advisory lock on PostgreSQL, a lock file beside an
    SQLite file (three workers starting at once on schema 0002 each rebuilt `instances`: one or two
    failed with "table _alembic_tmp_instances already exists", and that table was left behind)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_ID})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_ID})
            connection.commit()
        return
    path = sqlite_path(connection.engine.url.render_as_string(hide_password=False))
    if path is None:  # in memory, or a `file:` URI: nothing another process could share a lock file with
        yield
        return
    lock = _open_lock(path.with_name(path.name + ".migrate-lock"), path)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        yield
    finally:
        os.close(lock)


def _open_lock(lock_path: Path, database: Path) -> int:
    """The lock file, owned as the database is. Why: `sudo pneumonia-worker migrate` left it root-owned 0644,
    and the service user could no longer open it for writing: every later start failed "database migration
    failed: PermissionError" (SQLite itself hands its -wal and -shm files to the database's owner when root).
    A lock file that root left so before 2026-11-29 is opened read-only, which takes the flock as well."""
    try:
        lock = os.open(lock_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    except PermissionError:
        return os.open(lock_path, os.O_RDONLY)
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            owner = os.stat(database)
            os.fchown(lock, owner.st_uid, owner.st_gid)
    return lock


run_migrations_online()
