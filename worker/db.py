"""Result storage: one row per instance, written only through idempotent upserts.

An instance is (Study Instance UID, SOP Instance UID), the study being the spool folder the
gateway filed it under: a PACS re-sending an instance under a corrected study, or a modality
reusing SOP UIDs, gives another study's image, which must be scored and flagged there.

Why upserts with a status guard: Celery delivers at least once (acks_late), the gateway
may resend, and the recovery sweep re-queues. The terminal write only lands while the
row is not yet terminal, so the first finished result wins and every later delivery of
the same instance changes nothing.

Timestamps are stored as naive UTC everywhere (SQLite has no time zones).
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any, Iterator
from contextlib import contextmanager

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    and_,
    case,
    create_engine,
    or_,
    event,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url

from worker.config import FLAG_MAX_LENGTH

TERMINAL = ("done", "skipped", "failed")
STATUSES = ("queued", "processing", *TERMINAL)

metadata = MetaData()

instances = Table(
    "instances",
    metadata,
    Column("sop_instance_uid", String(64), nullable=False),
    Column("study_instance_uid", String(64), nullable=False),  # "" where the spool path names none
    Column("series_instance_uid", String(64)),
    Column("accession_number", String(64)),
    Column("modality", String(16)),
    Column("spool_relpath", String(300)),
    Column("model_name", String(100)),
    Column("model_version", String(50)),
    Column("model_sha256", String(64)),
    Column("site_calibration_sha256", String(64)),
    Column("probability", Float),
    Column("prediction", String(32)),
    Column("stratum", String(32)),
    Column("severity", Integer),
    Column("flag", String(FLAG_MAX_LENGTH)),
    Column("status", String(16), nullable=False),
    Column("reason", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("transient_claims", Integer),  # migration 0004: claims that failed transiently (see lost_deliveries)
    Column("received_at", DateTime),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("processing_ms", Float),
    Column("requeued_at", DateTime),  # migration 0007: when `pneumonia-admin reprocess` last sent it again
    PrimaryKeyConstraint("study_instance_uid", "sop_instance_uid", name="instances_pkey"),  # migration 0003
    Index("ix_instances_study_received", "study_instance_uid", "received_at"),
    Index("ix_instances_accession", "accession_number"),
    Index("ix_instances_status_finished", "status", "finished_at"),
    Index("ix_instances_stratum", "stratum"),
    Index("ix_instances_flag", "flag"),
    Index("ix_instances_received", "received_at"),
    Index("ix_instances_finished", "finished_at"),
)

accession_aliases = Table(  # migration 0008
    "accession_aliases",
    metadata,
    Column("study_instance_uid", String(64), nullable=False),
    Column("sop_instance_uid", String(64), nullable=False),
    Column("accession_number", String(64), nullable=False),
    Column("first_seen_at", DateTime),
    PrimaryKeyConstraint("study_instance_uid", "sop_instance_uid", "accession_number", name="accession_aliases_pkey"),
    Index("ix_accession_aliases_accession", "accession_number"),
)
"""Accession numbers an instance was re-sent under after its result was stored (the first stays on its row)."""

reports = Table(  # migration 0009
    "reports",
    metadata,
    Column("study_instance_uid", String(64), nullable=False),
    Column("destination", String(300), nullable=False),  # "AE@host:port"
    Column("finalized_at", DateTime, nullable=False),  # the study's, when the report describes it
    Column("status", String(16), nullable=False),  # REPORT_SENT or REPORT_REFUSED
    Column("series_instance_uid", String(64)),
    Column("sop_instance_uid", String(64)),
    Column("reason", Text),  # why none could be made (REPORT_REFUSED)
    Column("recorded_at", DateTime, nullable=False),
    PrimaryKeyConstraint("study_instance_uid", "destination", "finalized_at", name="reports_pkey"),
)
REPORT_SENT, REPORT_REFUSED = "sent", "refused"

studies = Table(
    "studies",
    metadata,
    Column("study_instance_uid", String(64), primary_key=True),
    Column("accession_number", String(64)),
    Column("first_received_at", DateTime),
    Column("last_received_at", DateTime),
    Column("final", Boolean, nullable=False, default=False),
    Column("finalized_at", DateTime),
    Column("severity", Integer),
    Column("flag", String(FLAG_MAX_LENGTH)),
    Column("stratum", String(32)),
    Column("max_probability", Float),
    Column("reopened_count", Integer, nullable=False, default=0, server_default="0"),  # migration 0006
    Column("flag_before_reopen", String(FLAG_MAX_LENGTH)),
    Column("first_finalized_at", DateTime),
    Index("ix_studies_accession", "accession_number"),
    Index("ix_studies_finalized", "finalized_at"),
    Index("ix_studies_last_received", "last_received_at"),
    Index("ix_studies_flag_received", "flag", "last_received_at"),
    Index("ix_studies_stratum_received", "stratum", "last_received_at"),
)


view_metadata = MetaData()
study_flags = Table(
    "study_flags",
    view_metadata,
    Column("study_instance_uid", String(64), primary_key=True),
    Column("accession_number", String(64)),
    Column("final", Boolean),
    Column("finalized_at", DateTime),
    Column("first_received_at", DateTime),
    Column("last_received_at", DateTime),
    Column("flag", String(FLAG_MAX_LENGTH)),
    Column("stratum", String(32)),
    Column("max_probability", Float),
    Column("n_instances", Integer),
    Column("n_done", Integer),
    Column("n_pending", Integer),
    Column("n_failed", Integer),  # migration 0005
    Column("n_skipped", Integer),
    Column("reopened_count", Integer),  # migration 0006
    Column("flag_before_reopen", String(FLAG_MAX_LENGTH)),
    Column("first_finalized_at", DateTime),
)
"""The study-level view (created by migration 0001): most severe flag over a study's done frontals.

Declared as a Table in its own MetaData so queries get typed results (SQLite returns text
for raw view columns) and Alembic never tries to create it as a table.
"""


def utcnow() -> dt.datetime:
    """Naive UTC now, the only time representation stored."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def parse_timestamp(value: str | dt.datetime | None) -> dt.datetime | None:
    """ISO-8601 (any offset) -> naive UTC; None and garbage -> None (never fail a task on it), and so
    is a time whose UTC falls outside year 1..9999 (`0001-01-01T00:00+01:00`: OverflowError before)."""
    if value is None or value == "":
        return None
    try:
        parsed = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(dt.timezone.utc).replace(tzinfo=None)
    except (ValueError, OverflowError):
        return None
    return parsed


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other backends, in-memory databases and `file:` URIs,
    whose path and options only SQLite reads)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    if parsed.database.startswith("file:") or parsed.query.get("uri") == "true":
        return None
    return Path(parsed.database)


def in_memory_sqlite(url: str) -> bool:
    """Whether a URL names an in-memory SQLite database (`sqlite://`, `sqlite:///`, `:memory:`, `mode=memory`):
    each process, each pool process of the worker included, gets its own empty one, so nothing is shared or kept.
    `sqlite:///$DB_FILE` with the variable unset reads `sqlite:///`."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return False
    database = parsed.database or ""
    return database in ("", ":memory:") or "mode=memory" in database or parsed.query.get("mode") == "memory"


def make_engine(url: str) -> Engine:
    """Engine for SQLite (file created, WAL, busy timeout) or PostgreSQL (pre-ping).

    `hide_parameters`: SQLAlchemy otherwise prints bound values (accession numbers) in the text
    of every database error, and Celery logs that text with the task's traceback.
    """
    if make_url(url).get_backend_name() == "sqlite":
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _create_private(path)
        engine = create_engine(url, connect_args={"timeout": 30}, hide_parameters=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2, hide_parameters=True,
                         connect_args=postgres_connect_args(url))


def postgres_connect_args(url: str) -> dict[str, Any]:
    """libpq's bounds on a PostgreSQL that stops answering, each unless the URL sets it."""
    given = make_url(url).query
    defaults = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S, **POSTGRES_TCP_LIVENESS}
    return {name: value for name, value in defaults.items() if name not in given}


POSTGRES_CONNECT_TIMEOUT_S = 10
"""libpq's `connect_timeout` unless the URL sets one (`?connect_timeout=N`). Without it libpq waits for
ever on a server that accepts the connection and never answers (a hung PostgreSQL, a proxy in front
of a dead one): each task sat until its soft time limit, which failed it as non-transient and left the
file to the gateway's sweep, and `pneumonia-admin`, `pneumonia-worker check` and `migrate`, which have
no time limit, hung without a word. With it the connection fails as a database error: tasks retry it,
the commands say it in one line."""

POSTGRES_TCP_LIVENESS = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
                         "tcp_user_timeout": 30_000}
"""libpq's TCP keepalives and `tcp_user_timeout` (ms), unless the URL sets them. Why: a connection that was
established and then went silent (the server's host lost, a failover that moved the address, a firewall
that dropped the connection's state) hung whoever waited on it: Linux sends its first keepalive after two
hours, and unacknowledged data is retransmitted for about 15 minutes. A worker's task sat until its soft
time limit failed it, `pneumonia-admin` and `migrate` hung. With these a dead peer is a database error
within about a minute (a query in flight: keepalives after 30 s idle; a request never acknowledged: 30 s),
which tasks retry. A live server answers keepalives from its kernel, so a long query is not cut short."""


def _create_private(path: Path) -> None:
    """Create an absent SQLite file empty (SQLite takes an empty file for a new database) as 0640, owner
    rw and group r, at most (the umask may take more). Why: the results hold accession numbers, and SQLite
    created the file 0644, world-readable under the usual umask 022, while the gateway spools 0640; SQLite
    gives the -wal and -shm files the main file's mode. A file that exists keeps the mode its owner chose.
    Any other failure (a read-only folder) is left to SQLite to report at the first connection, as before."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
    except OSError:
        pass


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL for concurrent readers; synchronous=FULL because a committed result is what lets the worker
    move the file out of pending/ (and the gateway's sweep stop re-sending it). With NORMAL, SQLite may
    roll back a WAL commit after a power loss while the rename survives: the instance would have no row
    and no pending file. FULL costs one fsync per commit, next to about 100 ms of inference."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _insert(conn: Connection, table: Table):  # type: ignore[no-untyped-def]
    """Dialect-specific INSERT supporting ON CONFLICT."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    with engine.begin() as conn:
        yield conn


INSTANCE_KEY = (instances.c.study_instance_uid, instances.c.sop_instance_uid)
"""The conflict target of every upsert: the primary key (migration 0003)."""
KEY_COLUMNS = tuple(c.name for c in INSTANCE_KEY)


def get_instance(conn: Connection, study_uid: str, sop_uid: str) -> dict[str, Any] | None:
    row = conn.execute(select(instances).where(instances.c.study_instance_uid == study_uid,
                                               instances.c.sop_instance_uid == sop_uid)).mappings().first()
    return dict(row) if row else None


def lock_instance(conn: Connection, study_uid: str, sop_uid: str) -> dict[str, Any] | None:
    """The row's status and accession number, the row locked until `conn`'s transaction ends (None: no such
    row). A no-op UPDATE, so that SQLite takes its write lock too (it ignores SELECT ... FOR UPDATE): a writer
    of the row, such as `requeue_terminal_instance`, waits for the transaction and then sees what it did."""
    t = instances
    stmt = (t.update().where(t.c.study_instance_uid == study_uid, t.c.sop_instance_uid == sop_uid)
            .values(status=t.c.status).returning(t.c.status, t.c.accession_number))
    row = conn.execute(stmt).mappings().first()
    return dict(row) if row else None


def record_report(conn: Connection, study_uid: str, destination: str, finalized_at: dt.datetime, status: str, *,
                  series_uid: str | None = None, sop_uid: str | None = None, reason: str | None = None) -> None:
    """What became of the study's report for `destination` at this finalisation. A report sent replaces anything;
    a refusal replaces a refusal only: a failed re-send must not erase the record of the report the PACS holds."""
    values = {"status": status, "series_instance_uid": series_uid, "sop_instance_uid": sop_uid, "reason": reason,
              "recorded_at": utcnow()}
    stmt = _insert(conn, reports).values(study_instance_uid=study_uid, destination=destination,
                                         finalized_at=finalized_at, **values)
    keys = ["study_instance_uid", "destination", "finalized_at"]
    conn.execute(stmt.on_conflict_do_update(index_elements=keys, set_=values,
                                            where=None if status == REPORT_SENT else reports.c.status != REPORT_SENT))


def sent_reports(conn: Connection, study_uid: str, destination: str) -> list[dict[str, Any]]:
    """The reports sent for the study to `destination`, oldest first."""
    t = reports
    return [dict(r) for r in conn.execute(
        select(t.c.series_instance_uid, t.c.sop_instance_uid, t.c.finalized_at)
        .where(t.c.study_instance_uid == study_uid, t.c.destination == destination, t.c.status == REPORT_SENT)
        .order_by(t.c.finalized_at)).mappings()]


def add_accession_alias(conn: Connection, study_uid: str, sop_uid: str, accession: str) -> bool:
    """Record `accession` as a number the instance is also found under; True when it is new."""
    stmt = _insert(conn, accession_aliases).values(study_instance_uid=study_uid, sop_instance_uid=sop_uid,
                                                   accession_number=accession, first_seen_at=utcnow())
    stmt = stmt.on_conflict_do_nothing(index_elements=["study_instance_uid", "sop_instance_uid", "accession_number"])
    return bool(conn.execute(stmt.returning(accession_aliases.c.accession_number)).first())


def terminal_sops(conn: Connection, study_uid: str, sop_uids: list[str]) -> set[str]:
    """Those of `sop_uids` that already have a terminal row in study `study_uid`."""
    found: set[str] = set()
    for start in range(0, len(sop_uids), 500):  # bound the IN list
        chunk = sop_uids[start : start + 500]
        rows = conn.execute(select(instances.c.sop_instance_uid)
                            .where(instances.c.study_instance_uid == study_uid,
                                   instances.c.sop_instance_uid.in_(chunk), instances.c.status.in_(TERMINAL)))
        found.update(row[0] for row in rows)
    return found


def claim_instance(conn: Connection, values: dict[str, Any]) -> dict[str, Any] | None:
    """Mark an instance `processing` (insert or bump attempts) unless it is already terminal.

    Returns the row after the claim, or None when the row is terminal (nothing to do).
    `values` carry the instance's key: study_instance_uid and sop_instance_uid.
    `attempts` counts every claim; `lost_deliveries` says how many of them never finished.
    """
    stmt = _insert(conn, instances).values(status="processing", attempts=1, **values)
    update = {k: stmt.excluded[k] for k in values if k not in ("received_at", *KEY_COLUMNS)}
    update["status"] = "processing"
    update["attempts"] = instances.c.attempts + 1
    update["received_at"] = func.coalesce(instances.c.received_at, stmt.excluded.received_at)
    stmt = stmt.on_conflict_do_update(
        index_elements=list(INSTANCE_KEY),
        set_=update,
        where=instances.c.status.notin_(TERMINAL),
    )
    conn.execute(stmt)
    row = get_instance(conn, values["study_instance_uid"], values["sop_instance_uid"])
    if row is None or row["status"] in TERMINAL:
        return None
    return row


def lost_deliveries(claimed: dict[str, Any], retries_after_claim: int) -> int:
    """The claims of a row, this one included, that are not known to have failed transiently: the
    poison-message count (deliveries whose worker died). What is known: the row's
    `transient_claims`, counted by every delivery that failed transiently while the database
    answered, whatever its message, and this message's own `retries_after_claim`, counted by Celery
    even when the database did not answer. Each counts a subset of the same failed claims, so the
    larger is taken, never their sum: a worker's death is never counted as transient."""
    return claimed["attempts"] - max(claimed.get("transient_claims") or 0, retries_after_claim)


def credit_failed_claim(conn: Connection, study_uid: str, sop_uid: str) -> bool:
    """Count a claim whose delivery failed transiently (Celery retries it); True if the row was
    there to count it. Done before the retry, while the database answers, so neither a retry chain
    that runs out nor another message for the same instance (a gateway restart re-sends what is
    pending) reads those claims as lost deliveries."""
    t = instances
    stmt = (t.update()
            .where(t.c.study_instance_uid == study_uid, t.c.sop_instance_uid == sop_uid, t.c.status.notin_(TERMINAL))
            .values(transient_claims=func.coalesce(t.c.transient_claims, 0) + 1)
            .returning(t.c.sop_instance_uid))
    return conn.execute(stmt).first() is not None


def finish_instance(conn: Connection, values: dict[str, Any]) -> bool:
    """Write the terminal result unless another delivery already did; True if this one landed."""
    stmt = _insert(conn, instances).values(attempts=1, **values)
    update = {k: stmt.excluded[k] for k in values if k not in ("received_at", *KEY_COLUMNS)}
    update["received_at"] = func.coalesce(instances.c.received_at, stmt.excluded.received_at)
    stmt = stmt.on_conflict_do_update(
        index_elements=list(INSTANCE_KEY),
        set_=update,
        where=instances.c.status.notin_(TERMINAL),
    ).returning(instances.c.sop_instance_uid)
    return conn.execute(stmt).first() is not None  # RETURNING: rowcount is unreliable for upserts


def touch_study(conn: Connection, study_uid: str, accession: str | None, received_at: dt.datetime | None,
                result: dict[str, Any] | None = None) -> None:
    """Create the study row, widen its received window and raise its flag if this result is worse.

    The study flag is kept on the row (not computed per query) so a worklist filtered by
    flag is an index lookup even with 100k studies. Never lowers a flag; un-finalising is `reopen_study`'s.
    """
    stamp = received_at or utcnow()
    result = result or {}
    stmt = _insert(conn, studies).values(
        study_instance_uid=study_uid,
        accession_number=accession,
        first_received_at=stamp,
        last_received_at=stamp,
        final=False,
        severity=result.get("severity"),
        flag=result.get("flag"),
        stratum=result.get("stratum"),
        max_probability=result.get("probability"),
    )
    new, old = stmt.excluded, studies.c
    worse = or_(new.severity > func.coalesce(old.severity, -1),
                and_(new.severity == old.severity, new.max_probability > func.coalesce(old.max_probability, -1.0)))
    least, greatest = (func.min, func.max) if conn.dialect.name == "sqlite" else (func.least, func.greatest)
    stmt = stmt.on_conflict_do_update(
        index_elements=[studies.c.study_instance_uid],
        set_={
            "accession_number": func.coalesce(old.accession_number, new.accession_number),
            # coalesce: SQLite's min()/max() are NULL if any argument is (finalize_study may leave the
            # window empty), where PostgreSQL's LEAST/GREATEST skip NULLs
            "first_received_at": least(func.coalesce(old.first_received_at, new.first_received_at),
                                       func.coalesce(new.first_received_at, old.first_received_at)),
            "last_received_at": greatest(func.coalesce(old.last_received_at, new.last_received_at),
                                         func.coalesce(new.last_received_at, old.last_received_at)),
            **{col: case((worse, new[col]), else_=old[col]) for col in ("severity", "flag", "stratum",
                                                                         "max_probability")},
        },
    )
    conn.execute(stmt)


def reopen_study(conn: Connection, study_uid: str) -> bool:
    """Mark a final study not final again: an image of it arrived after its finalisation. True if it was final.

    Without it a late image turned a "final, ROUTINE" study URGENT with no sign in between; the
    gateway finalises the study again once it is quiet, and `finalize_study` waits for that image.
    The flag it had when first final is kept (`flag_before_reopen`, beside `first_finalized_at`) and the
    reopenings counted: a radiologist may have read it from the ROUTINE list, and its new final state alone
    did not say so. The first, not the last: a flag only rises, so the first final flag is the lowest one a
    reader may have acted on, and a second reopening (a late lateral) overwrote it with the raised flag.
    Keyed on the count, not on the column being empty: a study first final with no flag (every image
    skipped) keeps none."""
    t = studies.c
    stmt = (studies.update().where(t.study_instance_uid == study_uid, t.final.is_(True))
            .values(final=False, finalized_at=None,
                    flag_before_reopen=case((func.coalesce(t.reopened_count, 0) == 0, t.flag), else_=t.flag_before_reopen),
                    reopened_count=func.coalesce(t.reopened_count, 0) + 1)
            .returning(t.study_instance_uid))
    return conn.execute(stmt).first() is not None


RESULT_COLUMNS = ("model_name", "model_version", "model_sha256", "site_calibration_sha256", "probability",
                  "prediction", "stratum", "severity", "flag", "started_at", "finished_at", "processing_ms")
"""What an analysis writes on a row, beside its status and reason (identifiers are the image's, and stay)."""


def requeue_terminal_instance(conn: Connection, study_uid: str, sop_uid: str, was: str,
                              finished_at: dt.datetime | None, relpath: str, reason: str, now: dt.datetime) -> bool:
    """Put a terminal row back to `queued`, its attempts and results cleared and `requeued_at` = `now`, for
    `pneumonia-admin reprocess`; True if the row was still the one selected: status `was`, finished at `finished_at`. A row
    that another delivery finished or that another run reprocessed meanwhile is left alone, even one that
    ended in the same status again (the status alone could not tell it from the row selected)."""
    t = instances
    stmt = (t.update()
            .where(t.c.study_instance_uid == study_uid, t.c.sop_instance_uid == sop_uid, t.c.status == was,
                   t.c.finished_at.is_not_distinct_from(finished_at))
            .values(status="queued", reason=reason, attempts=0, transient_claims=None, spool_relpath=relpath,
                    requeued_at=now,
                    **{column: None for column in RESULT_COLUMNS})
            .returning(t.c.sop_instance_uid))
    return conn.execute(stmt).first() is not None


def finalize_study(conn: Connection, study_uid: str, last_received_at: dt.datetime | None) -> None:
    """Mark a study final (idempotent: the first finalisation time is kept)."""
    now = utcnow()
    stmt = _insert(conn, studies).values(
        study_instance_uid=study_uid,
        first_received_at=last_received_at,
        last_received_at=last_received_at,
        final=True,
        finalized_at=now,
        first_finalized_at=now,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[studies.c.study_instance_uid],
        set_={"final": True, "finalized_at": func.coalesce(studies.c.finalized_at, stmt.excluded.finalized_at),
              "first_finalized_at": func.coalesce(studies.c.first_finalized_at, stmt.excluded.finalized_at)},
    )
    conn.execute(stmt)
