"""Alembic environment: online migrations only, serialised (PostgreSQL: an advisory lock; SQLite: a lock file).

Why the lock: several workers may start at once and each runs `upgrade head`.
"""

from __future__ import annotations

import contextlib
import fcntl
from typing import Iterator

from alembic import context
from sqlalchemy import text

from worker.db import make_engine, metadata, sqlite_path

MIGRATION_LOCK_ID = 7_311_003


def run_migrations_online() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


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
    with open(path.with_name(path.name + ".migrate-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        yield


run_migrations_online()
