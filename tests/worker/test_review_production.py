"""Review of running the worker in production (2026-11-29): a DBA-managed schema read by a role with the
application's grants only, why `check`/`run` refuse a database, a rollback's downgrade, a migration run by root
beside the service, and a migration that fails part-way; real PostgreSQL, SQLite and `python -m worker.cli`."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.worker.support import PG_ADMIN_DSN
from worker.migrate import upgrade


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env={**base, **env},
                          capture_output=True, text=True, timeout=120)


@contextlib.contextmanager
def application_role(database: str, password: str, *grants: str) -> Iterator[str]:
    """A login role of its own (unique name, dropped afterwards) with only `grants` in `database`."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    role = f"triage_app_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'")
    in_database = make_conninfo(PG_ADMIN_DSN, dbname=database)
    try:
        with psycopg.connect(in_database, autocommit=True) as conn:
            for grant in grants:
                conn.execute(grant.format(role=f'"{role}"'))
        yield role
    finally:
        with psycopg.connect(in_database, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


@pytest.mark.postgres
def test_a_schema_revision_the_role_may_not_read_is_one_line_and_exit_3(pg_url):
    """A DBA migrates (TRIAGE_MIGRATE_ON_START=false) and grants the worker's role the application's tables
    only: `check` and `run` died with a 40-line SQLAlchemy traceback and exit 1 (a compose restart loop of
    tracebacks) where the README promises one line and exit 3."""
    upgrade(pg_url)
    database = pg_url.rsplit("/", 1)[1]
    password = "S3cret-pw"
    grants = ("GRANT SELECT, INSERT, UPDATE ON instances, studies, study_flags TO {role}",)
    with application_role(database, password, *grants) as role:
        url = pg_url.replace("postgres@", f"{role}:{password}@")
        for command in ("check", "run"):
            out = run_cli(command, TRIAGE_DATABASE_URL=url, TRIAGE_MIGRATE_ON_START="false")
            assert out.returncode == 3, (command, out.returncode, out.stderr[-3000:])
            assert "Traceback" not in out.stderr, out.stderr[-3000:]
            assert "schema revision cannot be read" in out.stderr and "permission denied for table alembic_version" \
                in out.stderr, out.stderr[-3000:]
            assert password not in out.stderr + out.stdout


@pytest.mark.postgres
def test_check_says_why_the_database_refused_the_connection_without_the_password(pg_url):
    """`check` (and so `run`) said "database unreachable (OperationalError)" whatever PostgreSQL answered: a
    database not created yet, a role or password refused, sslmode=require on a server without TLS all read
    like a network outage, while `migrate` on the same URL named the reason."""
    password = "S3cret-pw"
    missing = pg_url.rsplit("/", 1)[0].replace("postgres@", f"postgres:{password}@") + "/no_such_triage_db"
    for command in ("check", "run"):
        out = run_cli(command, TRIAGE_DATABASE_URL=missing)
        assert out.returncode == 3, (command, out.stderr[-3000:])
        assert 'database "no_such_triage_db" does not exist' in out.stderr, out.stderr[-3000:]
        assert "Traceback" not in out.stderr and password not in out.stderr


def test_the_schema_can_be_taken_down_for_a_rollback_with_the_release_that_migrated_it(database_url):
    """A rollback to an older release: `check` and `run` refuse a schema newer than the worker and say to
    "downgrade the schema with that release", but no command of any release did it (`alembic -c
    worker/alembic.ini` has no URL: a traceback), so the site could neither roll back nor follow the advice."""
    from sqlalchemy import text

    from worker.db import make_engine
    from worker.migrate import current_revision

    upgrade(database_url)
    engine = make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO instances (study_instance_uid, sop_instance_uid, status, attempts) "
                          "VALUES ('1.2.3', '1.2.3.4', 'done', 1)"))
    engine.dispose()
    out = run_cli("downgrade", "0005", TRIAGE_DATABASE_URL=database_url)
    assert out.returncode == 0, out.stderr[-3000:]
    assert current_revision(database_url) == "0005" and "database schema is at 0005" in out.stderr
    refused = run_cli("downgrade", "base", TRIAGE_DATABASE_URL=database_url)  # would drop every result
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    unknown = run_cli("downgrade", "0099", TRIAGE_DATABASE_URL=database_url)
    assert unknown.returncode == 2 and "0099" in unknown.stderr and "Traceback" not in unknown.stderr
    assert current_revision(database_url) == "0005"
    assert run_cli("migrate", TRIAGE_DATABASE_URL=database_url).returncode == 0
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM instances")).scalar() == 1
    finally:
        engine.dispose()


def _as_user(uid: int, gid: int, call) -> str:  # type: ignore[no-untyped-def]
    """Run `call` in a forked child under another uid; its outcome ("ok" or the exception) comes back as text.
    Forked rather than exec'd: the interpreter may live where that user cannot read (/root/.pyenv)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            os.setgid(gid)
            os.setuid(uid)
            call()
            outcome = "ok"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            outcome = f"{type(exc).__name__}: {exc}"
        os.write(write, outcome.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        outcome = pipe.read()
    os.waitpid(pid, 0)
    return outcome


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to act as two users")
def test_a_migration_run_by_root_leaves_the_service_user_able_to_migrate(tmp_path):
    """An administrator runs `sudo pneumonia-worker migrate` on the service's SQLite file (as the README's
    upgrade says to migrate): SQLite hands its -wal/-shm files to the database's owner, but the lock file beside
    it was left root-owned 0644, and every later `run` of the service user failed "database migration failed:
    PermissionError" (exit 3, a restart loop) until someone deleted it."""
    import pwd

    try:
        service = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no `nobody` user")
    upgrade(f"sqlite:///{tmp_path / 'warm.db'}")  # every module the migration needs is loaded before the fork
    with tempfile.TemporaryDirectory(prefix="triage-root-migrate-") as shared:  # pytest's tmp_path is root's 0700
        Path(shared).chmod(0o755)
        folder = Path(shared) / "var"
        folder.mkdir()
        os.chown(folder, service.pw_uid, service.pw_gid)
        _migrate_as_root_between_service_runs(folder, service.pw_uid, service.pw_gid)


def _migrate_as_root_between_service_runs(folder: Path, uid: int, gid: int) -> None:
    from worker.migrate import current_revision, head_revision

    url = f"sqlite:///{folder / 'triage.db'}"
    assert _as_user(uid, gid, lambda: upgrade(url, "0005")) == "ok"  # the service made it
    (folder / "triage.db.migrate-lock").unlink()  # as a release before the lock file left it, or a clean-up
    upgrade(url, "0005")  # root, by hand
    assert _as_user(uid, gid, lambda: upgrade(url)) == "ok"
    assert current_revision(url) == head_revision()
    lock = folder / "triage.db.migrate-lock"
    os.chown(lock, 0, 0)  # as root left it before the fix: root's, 0644
    lock.chmod(0o644)
    assert _as_user(uid, gid, lambda: upgrade(url)) == "ok"


def test_a_migration_that_fails_part_way_leaves_the_previous_revision_whole(database_url):
    """On SQLite the driver committed each DDL statement as it ran: an upgrade stopped part-way (the worker killed
    or its disk full while it migrated at start, any error) kept 0006's first columns with the schema still
    stamped 0005, and every later start failed "duplicate column name: reopened_count" (exit 3, for ever) until
    someone repaired the file by hand. Here the step that fails is 0006's index, its name taken."""
    from sqlalchemy import inspect, text

    from worker.db import make_engine
    from worker.migrate import current_revision, head_revision

    upgrade(database_url, "0005")
    engine = make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO studies (study_instance_uid, final, finalized_at) VALUES ('1.2.3', true, "
                          "'2026-11-01 10:00:00')"))
        conn.execute(text("CREATE INDEX ix_studies_finalized ON instances (status)"))
    first = run_cli("migrate", TRIAGE_DATABASE_URL=database_url)
    assert first.returncode == 3 and "ix_studies_finalized" in first.stderr, first.stderr[-3000:]
    try:
        assert current_revision(database_url) == "0005"
        assert "reopened_count" not in {c["name"] for c in inspect(engine).get_columns("studies")}
        with engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_studies_finalized"))
    finally:
        engine.dispose()
    again = run_cli("migrate", TRIAGE_DATABASE_URL=database_url)
    assert again.returncode == 0, again.stderr[-3000:]
    assert current_revision(database_url) == head_revision()
