"""`pneumonia-admin`: look at, summarise and export triage results; re-queue stranded work.

    pneumonia-admin list [--studies] [--flag URGENT] [--stratum S] [--status failed]
                         [--since 2026-01-01] [--until ...] [--final-since ...] [--accession ACC] [--limit 50]
                         [--format table|csv|json]
    pneumonia-admin show <StudyInstanceUID>
    pneumonia-admin stats [--window-hours 24]
    pneumonia-admin export --format csv|json [--out FILE] [same filters as list]
    pneumonia-admin requeue [--older-than SECONDS]
    pneumonia-admin reprocess [--status failed|skipped] [--study UID] [--accession ACC] [--sop UID]
                              [--reason-contains TEXT] [--since ...] [--until ...] [--limit N] [--dry-run]
    pneumonia-admin prune-archive --older-than-days DAYS [--dry-run] [--every-hours HOURS]
    pneumonia-admin sr <StudyInstanceUID> [--out FILE] [--send HOST:PORT --called-ae AE] [--calling-ae AE]
                       [--content-qualification RESEARCH|PRODUCT]
    pneumonia-admin sr --pending --send HOST:PORT --called-ae AE [--limit N] [--final-since ...] [--every-minutes M]

Every query filters on indexed columns (status, stratum, flag, accession, received/finished
times, a study's `finalized_at`) and pages with LIMIT, so it stays fast on
100k+ rows. Output holds only the stored identifiers (UIDs, accession number), never patient data, except the
DICOM SR that `sr --out` writes (0640), which carries its images' patient module as any object of the study must.
Times are printed in UTC with their offset (`+00:00`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import fcntl
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from urllib.parse import unquote, urlsplit

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import Connection, and_, case, exists, func, inspect, not_, or_, select, text
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from dicom_gateway.config import ae_title_argument
from models.atomic import write_whole
from models.card import STRATUM_NAMES
from models.dicom_io import read_dicom
from models.errors import ImageAccessError, UnreadableImageError
from worker import contract, db
from worker.arguments import CENTURY_DAYS, CENTURY_HOURS, CENTURY_SECONDS, SQL_BIGINT_MAX, int_in, number_in
from worker.config import (DEFAULT_FLAG_MAP, NOT_TRIAGED, STRATUM_SEVERITY, WorkerSettings, load_worker_settings,
                           names_not_triaged)
from worker.reprocess import REPROCESSABLE, Selection, reprocess
from worker.selection import BODY_PART_MISSING, ORIENTATION_MISCOUNTED, VIEW_MISSING, unverified_skip
from worker.report import ReportError, ScoredImage, SendError, build_report, quiet, send_report
from worker.spool import newest_archived_copy, study_uid_from_relpath, valid_uid, waiting_in_pending, waiting_in_study

LIST_COLUMNS = ("sop_instance_uid", "study_instance_uid", "accession_number", "modality", "status", "stratum",
                "flag", "probability", "reason", "received_at", "finished_at", "processing_ms")
"""The worklist's view of a result: the triage follows the stratum. The binary prediction (the card's 0.5
threshold) is left to the export: the high-suspicion band starts below 0.5, and a worklist row read
"URGENT, high_suspicion, Normal" with nothing there to explain it."""
EXPORT_COLUMNS = LIST_COLUMNS + ("prediction", "model_name", "model_version", "model_sha256", "site_calibration_sha256",
                                 "attempts", "started_at")
"""An export is for audit: each row says which model and which site calibration produced it."""
STUDY_COLUMNS = ("study_instance_uid", "accession_number", "worklist_flag", "flag", "stratum", "max_probability",
                 "final", "triage_complete", "n_instances", "n_done", "n_pending", "n_failed", "n_skipped", "n_unverified",
                 "last_received_at", "finalized_at", "reopened_count", "flag_before_reopen", "first_finalized_at")
"""`reopened_count` > 0: the study was final before a late image reopened it, with `flag_before_reopen`
(the flag a reader may have seen as final) since `first_finalized_at` (migration 0006). `triage_complete`
(computed, `with_triage_complete`) is false while the study is not final, any of its images failed or
waits, or none was scored, or an image was skipped for want of the tags that would say whether it is a frontal
chest (`n_unverified`, computed, `with_unverified`). `worklist_flag` (computed) is the one column a RIS can map
to a priority: the flag, but NOT_TRIAGED where a study not `triage_complete` would read low priority."""
STORED_STUDY_COLUMNS = tuple(c for c in STUDY_COLUMNS if c not in ("worklist_flag", "triage_complete", "n_unverified"))
STUDY_EXPORT_COLUMNS = STUDY_COLUMNS + ("model_version", "model_sha256", "site_calibration_sha256", "failure_reasons")
"""`export --studies`, a RIS's poll, says which model and site calibration made the flag ("mixed" when its
images were scored by more than one) and why images failed, without an export per study."""


def with_triage_complete(study: Mapping[str, Any], low: Collection[str]) -> dict[str, Any]:
    """A copy of the study row with `triage_complete` (final, no image failed or waiting, and one scored) and
    `worklist_flag` (`low`: the flags that say "may wait", `low_flags(settings.flag_map)`).

    Why: the flag comes from the images that were scored. A study whose pneumonia image failed (a
    truncated file) and whose other image scored normal read final and ROUTINE, and a RIS mapping the
    flag to a priority filed it so; `n_failed` said it, in a column an integrator may not read. A study
    whose images were all skipped (a lateral only, a frontal without ViewPosition under the `skip`
    policy) has no flag at all and read complete too, "triaged, nothing found", before 2026-11-29."""
    complete = (bool(study.get("final")) and not study.get("n_failed") and not study.get("n_pending")
                and not study.get("n_unverified") and bool(study.get("n_done")))
    escalates = (study.get("stratum") not in (None, *LOW_STRATA)
                 and study.get("flag") is not None and study.get("flag") not in low)
    worklist_flag = study.get("flag") if complete or escalates else NOT_TRIAGED
    return {**study, "worklist_flag": worklist_flag, "triage_complete": complete}


LOW_STRATA = tuple(name for name, severity in STRATUM_SEVERITY.items() if severity == 0)
"""The strata that say "may wait" (`likely_normal`): only a complete study may carry their flag."""


def low_flags(flag_map: Mapping[str, str]) -> tuple[str, ...]:
    """The flags a reader takes for "may wait": those of the lowest strata. A site mapping `indeterminate` to
    ROUTINE too makes an indeterminate study read ROUTINE, so an incomplete one must not carry it either."""
    return tuple(sorted({flag_map[name] for name in LOW_STRATA}))


def _escalates_or_complete(v: Any, low: Collection[str]) -> Any:
    """SQL for `worklist_flag == flag` on the study_flags view `v`: `with_triage_complete`'s rule, so that
    `list --studies --flag ROUTINE` returns only the studies whose worklist flag is ROUTINE. The skips of
    `unverified_skip` are matched as it matches them, case and all: SQLite's LIKE ignores case, so the
    prefix and suffix are compared with `=` (`tests/worker/test_admin.py` checks the two agree)."""
    t = db.instances
    prefix, suffix = ORIENTATION_MISCOUNTED
    reason = t.c.reason
    starts = func.substr(reason, 1, len(prefix)) == prefix
    ends = and_(func.length(reason) >= len(suffix),
                func.substr(reason, func.length(reason) - len(suffix) + 1) == suffix)
    unverified = and_(t.c.status == "skipped", or_(reason.in_((BODY_PART_MISSING, VIEW_MISSING)), and_(starts, ends)))
    # A count over the study's rows, as the view counts: searched by the study alone. An EXISTS with the status in
    # its WHERE let SQLite search the status index instead, every skipped row of the table for each study (40x).
    n_unverified = (select(func.coalesce(func.sum(case((unverified, 1), else_=0)), 0))
                    .where(t.c.study_instance_uid == v.c.study_instance_uid).scalar_subquery())
    complete = and_(v.c.final.is_(True), v.c.n_failed == 0, v.c.n_pending == 0, v.c.n_done > 0, n_unverified == 0)
    escalates = and_(v.c.stratum.is_not(None), v.c.stratum.not_in(LOW_STRATA), v.c.flag.is_not(None),
                     v.c.flag.not_in(low))
    return or_(escalates, complete)


def with_unverified(conn: Connection, studies: list[dict[str, Any]], low: Collection[str]) -> list[dict[str, Any]]:
    """Copies of the study rows with `n_unverified` and `triage_complete`. Why: a frontal without ViewPosition
    (the default `skip` policy) may be the study's pneumonia image, and its study read final, ROUTINE and
    complete from its other, scored image before 2026-11-29, `n_skipped` counting it with the laterals."""
    t = db.instances
    counts: dict[str, int] = {}
    uids = [study["study_instance_uid"] for study in studies]
    for start in range(0, len(uids), PROVENANCE_BATCH):  # by the study index, as `with_provenance`
        batch = uids[start:start + PROVENANCE_BATCH]
        for study_uid, status, reason in conn.execute(
                select(t.c.study_instance_uid, t.c.status, t.c.reason).where(t.c.study_instance_uid.in_(batch))):
            if status == "skipped" and unverified_skip(reason):
                counts[study_uid] = counts.get(study_uid, 0) + 1
    return [with_triage_complete({**study, "n_unverified": counts.get(study["study_instance_uid"], 0)}, low)
            for study in studies]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumonia-admin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=None, help="override TRIAGE_DATABASE_URL")
    parser.set_defaults(low_flags=low_flags(DEFAULT_FLAG_MAP))  # main() puts TRIAGE_FLAG_MAP's in its place
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("list", "export"):
        cmd = sub.add_parser(name, help="list rows" if name == "list" else "export rows to CSV/JSON")
        _add_filters(cmd)
        cmd.add_argument("--format", choices=("table", "csv", "json") if name == "list" else ("csv", "json"),
                         default="table" if name == "list" else "csv")
        cmd.add_argument("--out", type=Path, default=None, help="write to this file instead of stdout")
    show = sub.add_parser("show", help="one study with its instances")
    show.add_argument("study_uid")
    show.add_argument("--format", choices=("table", "json"), default="table")
    stats = sub.add_parser("stats", help="counts, failure reasons, throughput and latency")
    stats.add_argument("--window-hours", type=number_in(0, CENTURY_HOURS, "hours", above_low=True), default=24.0,
                       help="hours back (at most 100 years)")
    stats.add_argument("--format", choices=("table", "json"), default="table")
    requeue = sub.add_parser("requeue", help="re-send tasks for spool files still pending (recovery sweep)")
    requeue.add_argument("--older-than", type=number_in(0, CENTURY_SECONDS, "seconds"), default=300.0,
                         help="seconds since the file was written (0 to at most 100 years)")
    again = sub.add_parser("reprocess", help="analyse failed or skipped instances again from their archived copy")
    again.add_argument("--status", choices=REPROCESSABLE, default="failed",
                       help="the rows to analyse again (default failed; done results are never re-scored here)")
    again.add_argument("--study", type=_given)
    again.add_argument("--accession", type=_given)
    again.add_argument("--sop", type=_given, help="one SOP Instance UID")
    again.add_argument("--reason-contains", type=_given, metavar="TEXT",
                       help="only rows whose reason contains TEXT (case as stored), e.g. 'ViewPosition'")
    again.add_argument("--since", type=_timestamp, help="received at or after (ISO-8601, UTC if no offset)")
    again.add_argument("--until", type=_timestamp, help="received before")
    again.add_argument("--limit", type=int_in(1, SQL_BIGINT_MAX), default=None, help="at most this many instances, oldest first")
    again.add_argument("--dry-run", action="store_true", help="list what would be analysed again, change nothing")
    report = sub.add_parser("sr", help="the study's result as a DICOM SR (TID 1500): write it and/or send it to a PACS")
    report.add_argument("study_uid", type=_uid, nargs="?", help="the study (or --pending)")
    report.add_argument("--pending", action="store_true",
                        help="every final study without a report for --send's PACS at its current finalisation, "
                             "oldest first (a cron job's call); refusals are recorded and not tried again")
    report.add_argument("--limit", type=int_in(1, SQL_BIGINT_MAX), default=None, help="with --pending: at most N")
    report.add_argument("--every-minutes", type=number_in(0, CENTURY_HOURS * 60, "minutes", above_low=True),
                        default=None, help="with --pending: keep running, a round every MINUTES (a compose service)")
    report.add_argument("--final-since", type=_timestamp, default=None,
                        help="with --pending: only studies final at or after this time (a first run after upgrading)")
    report.add_argument("--out", type=Path, default=None, help="write the SR here (a DICOM file, created 0640)")
    report.add_argument("--send", type=_host_port, default=None, metavar="HOST:PORT",
                        help="C-STORE the SR to this PACS (e.g. the one that sent the study)")
    report.add_argument("--called-ae", type=ae_title_argument, default="ANY-SCP", help="the PACS's AE title")
    report.add_argument("--calling-ae", type=ae_title_argument, default="PNEUMONIA-SR", help="this sender's AE title")
    report.add_argument("--content-qualification", choices=("RESEARCH", "PRODUCT"), default="RESEARCH",
                        help="the SR's Content Qualification (RESEARCH until the site has validated the model)")
    prune = sub.add_parser("prune-archive", help="delete archived DICOM files received more than N days ago")
    prune.add_argument("--older-than-days", type=number_in(0, CENTURY_DAYS, "days", above_low=True), required=True)
    prune.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")
    prune.add_argument("--every-hours", type=number_in(0, CENTURY_HOURS, "hours", above_low=True), default=None,
                       help="keep running and prune again every HOURS (a compose service; default: once)")
    return parser


def _add_filters(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--studies", action="store_true", help="one line per study (most severe flag)")
    cmd.add_argument("--flag", type=_given, help="a flag of TRIAGE_FLAG_MAP (any case) or one stored in the database; "
                     "with --studies the worklist flag: a study not triage_complete is listed under its flag only if "
                     "that flag raises it (URGENT, PRIORITY), never under ROUTINE; NOT_TRIAGED lists the others")
    cmd.add_argument("--stratum", type=_given, help=f"one of {', '.join(STRATUM_NAMES)} (any case)")
    cmd.add_argument("--status", choices=db.STATUSES)
    cmd.add_argument("--accession", type=_given)
    cmd.add_argument("--study", type=_given)
    cmd.add_argument("--since", type=_timestamp, help="received at or after (ISO-8601, UTC if no offset)")
    cmd.add_argument("--until", type=_timestamp, help="received before")
    cmd.add_argument("--final-since", type=_timestamp, metavar="TIMESTAMP",
                     help="with --studies: final studies finalised at or after (ISO-8601, UTC if no offset; a RIS "
                          "polls with it: a study re-finalised after a late image appears again); per instance: "
                          "results finished at or after")
    cmd.add_argument("--limit", type=int_in(1, SQL_BIGINT_MAX), default=None, help="at most this many rows (a positive number)")


def _given(value: str) -> str:
    """A filter's value, refused when empty. Why: an empty one read as no filter, so `--accession "$ACC"`
    with the variable unset printed every study's results, exit 0."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty (an unset variable?): leave the option out to list everything")
    return value


def _uid(value: str) -> str:
    """A DICOM UID (digits and dots, at most 64), refused without echoing it: it may hold control characters."""
    if not valid_uid(value):
        raise argparse.ArgumentTypeError("not a DICOM UID (digits and dots, at most 64 characters)")
    return value


def _host_port(value: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 address in brackets), the port 1-65535."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"not HOST:PORT with a port 1-65535: {value!r}")
    return host, int(port)


def _timestamp(value: str) -> dt.datetime:
    parsed = db.parse_timestamp(value)
    if parsed is None:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 date/time within years 1-9999 (UTC): {value!r}")
    return parsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = load_worker_settings(parser.prog)  # warnings go to stderr: stdout carries the data
    if settings is None:
        return 2
    if args.command == "prune-archive":  # files only: no database needed
        return prune(settings, args.older_than_days, args.dry_run, args.every_hours)
    url = args.database_url or settings.database_url
    try:
        missing = db.sqlite_path(url)
        engine = None if missing is not None and not missing.is_file() else db.make_engine(url)
    except (ArgumentError, NoSuchModuleError) as exc:  # a malformed URL or an unknown dialect; the URL may hold a password
        print(f"{parser.prog}: invalid database URL ({type(exc).__name__}; e.g. postgresql+psycopg://user:pass@host/db)",
              file=sys.stderr)
        return 3
    if engine is None:  # make_engine would create an empty one (a typo, another CWD)
        print(f"{parser.prog}: no database file at {missing} (TRIAGE_DATABASE_URL or --database-url; "
              "`pneumonia-worker migrate` creates it)", file=sys.stderr)
        return 3
    try:
        try:
            with engine.connect() as conn:
                migrated = inspect(conn).has_table(db.instances.name)
                behind = migrated and schema_behind(conn)
        except (DBAPIError, UnicodeError) as exc:  # down, refused, wrong password, not a database file, a host name
            # with an empty label (psycopg's idna error): its text may quote the host
            cause = getattr(exc, "orig", None) or exc
            print(f"{parser.prog}: cannot open the database ({type(cause).__name__})", file=sys.stderr)
            return 3
        if not migrated:
            print(f"{parser.prog}: the database has no triage tables: run `pneumonia-worker migrate`", file=sys.stderr)
            return 3
        if behind:  # the queries name columns the old tables lack: a traceback ("no such column") before
            print(f"{parser.prog}: the database schema is at {behind[0]}, this release needs {behind[1]}: "
                  "run `pneumonia-worker migrate`", file=sys.stderr)
            return 3
        if args.command == "sr":
            return run_sr(engine, argparse.Namespace(**{**vars(args), "spool_dir": Path(settings.spool_dir),
                                                        "low_flags": low_flags(settings.flag_map)}))
        if args.command == "requeue":
            return requeue(settings, engine, args.older_than)
        if args.command == "reprocess":
            selection = Selection(status=args.status, study=args.study, accession=args.accession, sop=args.sop,
                                  reason_contains=args.reason_contains, since=args.since, until=args.until,
                                  limit=args.limit)
            return reprocess(settings, engine, selection, args.dry_run, lambda: broker_client(settings))
        fetch, render = COMMANDS[args.command]
        with engine.connect() as conn:
            if args.command in ("list", "export"):
                args = resolve_filters(conn, args, settings)
            args = argparse.Namespace(**{**vars(args), "spool_dir": Path(settings.spool_dir),
                                         "low_flags": low_flags(settings.flag_map)})
            found = fetch(conn, args)
        # The read transaction has ended before any output: a pager or a stalled pipe that holds
        # the output keeps no lock on PostgreSQL (an ALTER behind it would queue every worker's write).
        return render(found, args)
    except BrokenPipeError:  # `| head` stopped reading: no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except UnknownChoice as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OutputError as exc:  # only --out's own errors: a spool read error of requeue is not "the output"
        print(f"{parser.prog}: cannot write the output ({exc})", file=sys.stderr)
        return 2
    except DBAPIError as exc:  # lost after it opened (a restart, a connection gone silent): one line, as when it
        # cannot be opened; a write of reprocess or requeue in progress is left as its steps allow
        print(f"{parser.prog}: lost the database ({type(getattr(exc, 'orig', None) or exc).__name__})", file=sys.stderr)
        return 3
    finally:
        engine.dispose()


def schema_behind(conn: Connection) -> tuple[str, str] | None:
    """(stamped, head) when the database's schema is an older revision than this release's; None when it
    is at head or newer (a newer release migrated it: the columns named here are still there)."""
    from alembic.runtime.migration import MigrationContext

    from worker.migrate import head_revision, is_known_revision

    stamped, head = MigrationContext.configure(conn).get_current_revision(), head_revision()
    if stamped == head or (stamped is not None and not is_known_revision(stamped)):
        return None
    return stamped or "none (unstamped)", head


class UnknownChoice(ValueError):
    """A --flag or --stratum that no row can have: exit 2, as argparse does for `--status bogus`."""


def resolve_filters(conn: Connection, args: argparse.Namespace, settings: WorkerSettings) -> argparse.Namespace:
    """`args` with --flag and --stratum spelt as stored, or UnknownChoice naming the accepted values.

    Why: a typo (`--flag URGNT`) printed an empty worklist with exit 0, which reads as "nothing urgent".
    Any case is accepted where it names one value only (`urgent` is URGENT). A flag outside today's
    TRIAGE_FLAG_MAP is still accepted when stored rows hold it: results scored under an earlier map keep
    their flag, and must stay listable."""
    stratum = args.stratum and _spelling(args.stratum, STRATUM_NAMES)
    if args.stratum and not stratum:
        raise UnknownChoice(f"argument --stratum: invalid choice: {args.stratum!r} (choose from "
                            f"{', '.join(map(repr, STRATUM_NAMES))}, in any case)")
    flags = list(dict.fromkeys(settings.flag_map.values()))
    if args.flag and names_not_triaged(args.flag):  # no TRIAGE_FLAG_MAP holds it, in any spelling
        if not args.studies:
            raise UnknownChoice(f"argument --flag: {NOT_TRIAGED} is a study's worklist flag, not an image's: add "
                                "--studies (the images not scored are --status failed, skipped, queued or processing)")
        return argparse.Namespace(**{**vars(args), "flag": NOT_TRIAGED, "stratum": stratum})
    flag = args.flag and (_spelling(args.flag, flags) or _stored_flag(conn, args.flag))
    if args.flag and not flag:
        raise UnknownChoice(f"argument --flag: invalid choice: {args.flag!r} (choose from "
                            f"{', '.join(map(repr, flags))}, in any case, a flag stored in the database, or "
                            f"{NOT_TRIAGED} with --studies)")
    return argparse.Namespace(**{**vars(args), "flag": flag, "stratum": stratum})


def _spelling(value: str, accepted: Sequence[str]) -> str | None:
    """`value` as `accepted` spells it: itself, or its only match in any case (None: no match, or two)."""
    if value in accepted:
        return value
    matches = [a for a in accepted if a.casefold() == value.casefold()]
    return matches[0] if len(matches) == 1 else None


def _stored_flag(conn: Connection, flag: str) -> str | None:
    """`flag` if an instance or a study holds it (two index lookups), else None."""
    for column in (db.instances.c.flag, db.studies.c.flag):
        if conn.execute(select(exists().where(column == flag))).scalar():
            return flag
    return None


def query_rows(conn: Connection, args: argparse.Namespace,
               columns: tuple[str, ...] = LIST_COLUMNS) -> list[dict[str, Any]]:
    """Instances (or studies with --studies) matching the filters, newest arrival first; with --final-since
    oldest finalisation first, on the index it filters by. Why ascending there: a poll is a cursor, and with
    --limit the newest-first answer was the same newest rows at every poll, so a burst of more finalisations
    than the limit lost its oldest (an URGENT study) for good; oldest first, each poll pages on from the last."""
    if args.studies:
        return _query_studies(conn, args)
    t = db.instances
    stmt = select(*[t.c[c] for c in columns])
    for column, value in (("flag", args.flag), ("stratum", args.stratum), ("status", args.status),
                          ("study_instance_uid", args.study)):
        if value:
            stmt = stmt.where(t.c[column] == value)
    if args.accession:  # its own number, or one a re-send carried after its result (migration 0008): the
        # aliases' keys first, so that each branch of the OR searches an index (an EXISTS made SQLite scan)
        a = db.accession_aliases
        keys = conn.execute(select(a.c.study_instance_uid, a.c.sop_instance_uid)
                            .where(a.c.accession_number == args.accession).limit(1000)).all()
        stmt = stmt.where(or_(t.c.accession_number == args.accession, *[
            and_(t.c.study_instance_uid == study, t.c.sop_instance_uid == sop) for study, sop in keys]))
    if args.since:
        stmt = stmt.where(t.c.received_at >= args.since)
    if args.until:
        stmt = stmt.where(t.c.received_at < args.until)
    if args.final_since:  # a result is final once written (the first terminal write wins)
        stmt = stmt.where(t.c.status.in_(db.TERMINAL), t.c.finished_at >= args.final_since)
    stmt = stmt.order_by(t.c.finished_at.asc() if args.final_since else t.c.received_at.desc())
    if args.limit:
        stmt = stmt.limit(args.limit)
    return [dict(r) for r in conn.execute(stmt).mappings()]


def _query_studies(conn: Connection, args: argparse.Namespace) -> list[dict[str, Any]]:
    v = db.study_flags
    stmt = select(*[v.c[c] for c in STORED_STUDY_COLUMNS])
    for column, value in (("stratum", args.stratum), ("study_instance_uid", args.study)):
        if value:
            stmt = stmt.where(v.c[column] == value)
    if args.flag == NOT_TRIAGED:  # the worklist flag's other value: studies the model's flag does not stand for
        stmt = stmt.where(not_(_escalates_or_complete(v, args.low_flags)))
    elif args.flag:  # the worklist flag: a study not triage_complete is listed under its flag only if that raises it
        stmt = stmt.where(v.c.flag == args.flag, _escalates_or_complete(v, args.low_flags))
    if args.accession:  # the study's own (its first image's) or any of its images': images of one study may
        # carry two (a temporary one replaced, a second series), and the study was found under the first only
        stmt = stmt.where(or_(v.c.accession_number == args.accession, v.c.study_instance_uid.in_(
            select(db.instances.c.study_instance_uid).where(db.instances.c.accession_number == args.accession)),
            v.c.study_instance_uid.in_(select(db.accession_aliases.c.study_instance_uid).where(  # a re-send's
                db.accession_aliases.c.accession_number == args.accession))))
    if args.status:
        stmt = stmt.where(v.c.study_instance_uid.in_(
            select(db.instances.c.study_instance_uid).where(db.instances.c.status == args.status)))
    if args.since:
        stmt = stmt.where(v.c.last_received_at >= args.since)
    if args.until:
        stmt = stmt.where(v.c.last_received_at < args.until)
    if args.final_since:
        # Why not --since: a study becomes final (or final again after a late image, with a new
        # finalized_at) well after its images arrived, so a RIS polling on arrival never saw it final.
        stmt = stmt.where(v.c.final.is_(True), v.c.finalized_at >= args.final_since)
    stmt = stmt.order_by(v.c.finalized_at.asc() if args.final_since else v.c.last_received_at.desc())
    if args.limit:
        stmt = stmt.limit(args.limit)
    return with_unverified(conn, [dict(r) for r in conn.execute(stmt).mappings()], args.low_flags)


def fetch_list(conn: Connection, args: argparse.Namespace) -> list[dict[str, Any]]:
    return query_rows(conn, args, LIST_COLUMNS)


def fetch_export(conn: Connection, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = query_rows(conn, args, EXPORT_COLUMNS)
    return with_provenance(conn, rows) if args.studies else rows


PROVENANCE_BATCH = 500
"""Studies per provenance query: SQLite takes at most 32766 bound parameters in one statement."""


def with_provenance(conn: Connection, studies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the study rows with the model, site calibration and failure reasons of their images."""
    t = db.instances
    found: dict[str, list[Any]] = {}
    uids = [study["study_instance_uid"] for study in studies]
    columns = (t.c.study_instance_uid, t.c.status, t.c.reason, t.c.model_version, t.c.model_sha256,
               t.c.site_calibration_sha256)
    for start in range(0, len(uids), PROVENANCE_BATCH):
        batch = uids[start:start + PROVENANCE_BATCH]
        for row in conn.execute(select(*columns).where(t.c.study_instance_uid.in_(batch)).order_by(t.c.received_at)):
            found.setdefault(row.study_instance_uid, []).append(row)
    return [{**study, **_provenance(found.get(study["study_instance_uid"], []))} for study in studies]


def _provenance(images: Sequence[Any]) -> dict[str, Any]:
    """One study's model, site calibration ("mixed" when its scored images differ) and failure reasons."""
    scored = [r for r in images if r.status == "done"]
    found: dict[str, Any] = {}
    for column in ("model_version", "model_sha256", "site_calibration_sha256"):
        values = {getattr(r, column) for r in scored}
        found[column] = values.pop() if len(values) == 1 else "mixed" if values else None
    reasons = [r.reason for r in images if r.status == "failed" and r.reason]
    found["failure_reasons"] = "; ".join(dict.fromkeys(reasons)) or None
    return found


def render_list(rows: list[dict[str, Any]], args: argparse.Namespace) -> int:
    export = args.command == "export"
    columns = ((STUDY_EXPORT_COLUMNS if export else STUDY_COLUMNS) if args.studies
               else EXPORT_COLUMNS if export else LIST_COLUMNS)
    _emit(rows, columns, args.format, args.out)
    return 0


def fetch_show(conn: Connection, args: argparse.Namespace) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int | None]:
    """The study's row, its instances, and how many of its images wait in the spool's pending/ (None when this
    host cannot read the spool): the database sees an image only once a worker claims it, so a study whose
    images no worker has taken yet was "not found" while the gateway held them."""
    v = db.study_flags
    study = conn.execute(select(*[v.c[c] for c in STORED_STUDY_COLUMNS])
                         .where(v.c.study_instance_uid == args.study_uid)).mappings().first()
    t = db.instances
    instances = [dict(r) for r in conn.execute(
        select(*[t.c[c] for c in LIST_COLUMNS]).where(t.c.study_instance_uid == args.study_uid)
        .order_by(t.c.received_at)).mappings()]
    in_spool = waiting_in_study(args.spool_dir, args.study_uid)
    return (None if study is None else with_unverified(conn, [dict(study)], args.low_flags)[0]), instances, in_spool


def render_show(found: tuple[dict[str, Any] | None, list[dict[str, Any]], int | None], args: argparse.Namespace) -> int:
    study, instances, in_spool = found
    if study is None and not instances and not in_spool:
        print(f"study {args.study_uid} not found", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps({"study": _jsonable(study or {}), "instances": [_jsonable(r) for r in instances],
                          "waiting_in_spool": in_spool}, indent=2))
        return 0
    for key, value in (study or {"study_instance_uid": args.study_uid}).items():
        print(f"{key:>20}: {_fmt(value)}")
    print(f"{'waiting_in_spool':>20}: {_fmt(in_spool)}  (images in pending/ no worker has finished)")
    print()
    _emit(instances, LIST_COLUMNS, "table", None)
    return 0


def compute_stats(conn: Connection, window_hours: float, spool_dir: Path | None = None) -> dict[str, Any]:
    """Counts per stratum/status, top failure reasons, throughput and latency percentiles, and what waits in
    the spool (`spool_dir`'s pending/, when this host can read it)."""
    t = db.instances
    since = db.utcnow() - dt.timedelta(hours=window_hours)
    recent = t.c.finished_at >= since
    by_status = dict(conn.execute(select(t.c.status, func.count()).where(recent).group_by(t.c.status)).all())
    by_stratum = dict(conn.execute(select(t.c.stratum, func.count())
                                   .where(recent, t.c.status == "done").group_by(t.c.stratum)).all())
    by_flag = dict(conn.execute(select(t.c.flag, func.count())
                                .where(recent, t.c.status == "done").group_by(t.c.flag)).all())
    reasons = conn.execute(select(t.c.status, t.c.reason, func.count().label("n"))
                           .where(recent, t.c.status.in_(("failed", "skipped")))
                           .group_by(t.c.status, t.c.reason).order_by(text("n DESC")).limit(20)).all()
    timing = conn.execute(select(t.c.received_at, t.c.finished_at, t.c.processing_ms, t.c.requeued_at)
                          .where(recent, t.c.status.in_(db.TERMINAL))).all()
    pending = conn.execute(select(func.count()).where(t.c.status.in_(("queued", "processing")))).scalar_one()
    waiting = waiting_in_pending(spool_dir) if spool_dir is not None else None
    return {
        "window_hours": window_hours,
        "by_status": by_status,
        "by_stratum": by_stratum,
        "by_flag": by_flag,
        "outstanding": pending,
        **spool_summary(waiting),
        "overdue_studies": overdue_studies(conn, since, waiting),
        "top_reasons": [{"status": s, "reason": r, "count": n} for s, r, n in reasons],
        **_timing_stats(timing),
    }


OVERDUE_AFTER = dt.timedelta(hours=1)
"""A study still not final this long after its last image has most likely lost its finalize."""


def overdue_studies(conn: Connection, since: dt.datetime, waiting: dict[str, list[float]] | None = None) -> int:
    """Studies of the window still not final `OVERDUE_AFTER` after their last image. Why: a finalize lost
    with the broker's queue (a Redis restart without persistence) is never sent again, and such a study
    stayed provisional on the worklist for good with nothing to show for it; `requeue` re-sends it.
    With the spool's `waiting` images, a study whose newest waiting image is that old counts too, whether
    the database has seen it or not: with no worker taking work the database saw nothing, and this read 0."""
    s = db.studies
    late = conn.execute(select(s.c.study_instance_uid).where(
        s.c.last_received_at >= since, s.c.last_received_at < db.utcnow() - OVERDUE_AFTER, s.c.final.is_(False),
    )).scalars().all()
    cutoff = time.time() - OVERDUE_AFTER.total_seconds()
    stuck = {study for study, mtimes in (waiting or {}).items() if max(mtimes) < cutoff}
    return len(set(late) | stuck)


def spool_summary(waiting: dict[str, list[float]] | None) -> dict[str, Any]:
    """What the spool holds that no worker has finished: images and studies waiting in pending/ and the
    oldest one's age. Why: the database sees an image only once a worker claims it (or `requeue` sends it),
    so while no worker takes work `outstanding` and the worklist said nothing waited."""
    if waiting is None:
        return {"waiting_in_spool": None, "studies_waiting_in_spool": None, "oldest_waiting_s": None}
    mtimes = [m for per_study in waiting.values() for m in per_study]
    oldest = round(max(0.0, time.time() - min(mtimes)), 1) if mtimes else None
    return {"waiting_in_spool": len(mtimes), "studies_waiting_in_spool": len(waiting), "oldest_waiting_s": oldest}


def _timing_stats(rows: Sequence[Any]) -> dict[str, Any]:
    """Throughput, latency and processing time of the rows finished in the window. Latency runs from the
    image's arrival, or for a reprocessed image from its reprocess request (`requeued_at`): from its first
    arrival, one image reprocessed weeks later put weeks into p99 and max."""
    if not rows:
        return {"finished": 0, "reprocessed": 0, "throughput_per_s": None, "latency_s": None, "processing_ms": None}
    finished = [r[1] for r in rows if r[1] is not None]
    spans = [(r[1], _latency_start(r[0], r[3], r[1])) for r in rows if r[1] is not None]
    latency = np.array([(end - start).total_seconds() for end, start in spans if start is not None], dtype=float)
    processing = np.array([r[2] for r in rows if r[2] is not None], dtype=float)
    span = (max(finished) - min(finished)).total_seconds() if len(finished) > 1 else 0.0
    return {
        "finished": len(rows),
        "reprocessed": sum(r[3] is not None and r[1] is not None and r[3] <= r[1] for r in rows),
        # N finish times span N - 1 intervals: 5 results a second apart are 1.0/s, not 1.25/s
        "throughput_per_s": round((len(finished) - 1) / span, 3) if span > 0 else None,
        "latency_s": _percentiles(latency),
        "processing_ms": _percentiles(processing),
    }


def _latency_start(received: dt.datetime | None, requeued: dt.datetime | None,
                   finished: dt.datetime) -> dt.datetime | None:
    """The reprocess request where one came before the finish, else the arrival: a time after the finish is
    not this result's request (a database edited by hand, a clock stepped back), and gave a negative latency."""
    return requeued if requeued is not None and requeued <= finished else received


def _percentiles(values: np.ndarray) -> dict[str, float] | None:
    if values.size == 0:
        return None
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
            "max": round(float(values.max()), 3)}


def fetch_stats(conn: Connection, args: argparse.Namespace) -> dict[str, Any]:
    return compute_stats(conn, args.window_hours, args.spool_dir)


def render_stats(stats: dict[str, Any], args: argparse.Namespace) -> int:
    if args.format == "json":
        print(json.dumps(stats, indent=2, default=str))
        return 0
    for key, value in stats.items():
        if key == "top_reasons":
            print("top_reasons:")
            for item in value:
                print(f"  {item['count']:>7}  {_printable(str(item['status'])):<8} {_printable(str(item['reason']))}")
        else:
            print(f"{key}: {_printable(str(value))}")
    return 0


def requeue(settings: WorkerSettings, engine: Any, older_than_s: float) -> int:
    """Re-send `process_instance` for every pending spool file older than `older_than_s`.

    The same sweep the gateway runs on start-up; safe to repeat because the worker is
    idempotent. Rows not yet present are recorded as `queued` so nothing is invisible.
    A broker that cannot be reached is one line on stderr and exit 3, as a database that cannot be opened;
    so is a spool whose pending/ cannot be listed (after the overdue finalizes, which need the database only).
    """
    from kombu.exceptions import OperationalError as BrokerError

    spool_dir = Path(settings.spool_dir)
    try:
        files, foreign = stale_pending(spool_dir, time.time() - older_than_s)
        unread = None
    except OSError as exc:  # the finalizes below are still sent: they need the database only
        files, foreign, unread = [], 0, exc
    client = broker_client(settings)
    sent: list[Path] = []
    try:
        latest = _send_pending(client, engine, spool_dir, files, sent)
        _send_finalizes(client, engine, latest, older_than_s)
    except (BrokerError, OSError) as exc:  # kombu wraps redis' connection errors; a socket's may come bare
        print(f"pneumonia-admin: cannot send to the broker ({_broker_problem(exc, settings)}); re-sent {len(sent)} "
              f"of {len(files)} pending instance(s): run requeue again once it answers", file=sys.stderr)
        return 3
    finally:
        client.close()
    print(f"requeued {len(files)} pending instance(s) and the finalize of {len(latest)} study(ies)")
    if foreign:
        print(f"skipped {foreign} file(s) in {contract.SPOOL_PENDING}/ whose folder or name is not a UID: the gateway "
              "did not write them, and the worker would refuse them", file=sys.stderr)
    if unread is not None:  # never the error's text: it names a study folder
        print(f"pneumonia-admin: cannot read the spool's {contract.SPOOL_PENDING}/ in {spool_dir.absolute()} "
              f"({type(unread).__name__}): no pending file re-sent; run requeue where TRIAGE_SPOOL_DIR names the "
              "gateway's spool, as a user that may read it", file=sys.stderr)
        return 3
    return 0


def broker_client(settings: WorkerSettings) -> Any:
    """A Celery client of the worker's broker with the worker's broker options (a sentinel master, a
    verified rediss://): without them a sentinel:// requeue failed with a traceback and a rediss:// one
    trusted any certificate."""
    from celery import Celery

    client = Celery("pneumonia-admin", broker=settings.broker_url, set_as_current=False)
    client.conf.update(contract.broker_celery_options(settings, {"socket_timeout": 10, "socket_connect_timeout": 10}))
    return client


def _send_pending(client: Any, engine: Any, spool_dir: Path, files: list[tuple[Path, dt.datetime]],
                  sent: list[Path]) -> dict[str, dt.datetime]:
    """Send each file's `process_instance`, then record its `queued` row; each one sent is appended to
    `sent`. Returns the latest receive time per study. Why the row after the send: with the broker
    down, a row written first read `queued` for a message never sent. After is safe: a worker that
    claimed or finished the instance meanwhile keeps its row (the insert does nothing on a row that is there)."""
    latest: dict[str, dt.datetime] = {}
    for path, received_at in files:
        relpath = path.relative_to(spool_dir).as_posix()
        client.send_task(contract.PROCESS_INSTANCE, args=(relpath, path.stem),
                         kwargs={"received_at": received_at.isoformat()}, queue=contract.QUEUE)
        # the row the worker will write, under the study folder (a UID: others were left out)
        _mark_queued(engine, study_uid_from_relpath(relpath) or "", path.stem, relpath, received_at)
        sent.append(path)
        latest[path.parent.name] = max(received_at, latest.get(path.parent.name, received_at))
    return latest


def _send_finalizes(client: Any, engine: Any, latest: dict[str, dt.datetime], older_than_s: float) -> None:
    """Send the finalize of each study in `latest` (adding those overdue) and fill `latest` with them.
    Their studies' finalize may have been lost with them (a Redis restart): idempotent, and it waits for
    the study's images, so it is sent again for each; so is the finalize of a study left not final
    with nothing pending (lost after its images were all scored)."""
    cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=older_than_s)
    for study_uid, last in unfinished_studies(engine, cutoff):
        latest.setdefault(study_uid, last)
    for study_uid, last in latest.items():
        client.send_task(contract.FINALIZE_STUDY, args=(study_uid,), kwargs={"last_received_at": last.isoformat()},
                         queue=contract.QUEUE)


def _broker_problem(exc: BaseException, settings: WorkerSettings) -> str:
    """The error's kind and text, with the broker's passwords blanked: redis-py names only host and
    port, but nothing should print a secret should a message ever quote the URL."""
    problem = f"{type(exc).__name__}: {exc}"
    passwords = [urlsplit(address).password or "" for address in settings.broker_url.split(";")]
    sentinel = settings.broker_sentinel_password
    for secret in [*passwords, *map(unquote, passwords), sentinel.get_secret_value() if sentinel else ""]:
        if secret:
            problem = problem.replace(secret, "***")
    return problem


def unfinished_studies(engine: Any, cutoff: dt.datetime) -> list[tuple[str, dt.datetime]]:
    """Studies not final whose last image arrived before `cutoff` (aware UTC): their finalize is overdue."""
    t = db.studies
    naive = cutoff.astimezone(dt.timezone.utc).replace(tzinfo=None)
    with engine.connect() as conn:
        rows = conn.execute(select(t.c.study_instance_uid, t.c.last_received_at)
                            .where(t.c.final.is_(False), t.c.last_received_at < naive)).all()
    return [(uid, last.replace(tzinfo=dt.timezone.utc)) for uid, last in rows]


def stale_pending(spool_dir: Path, cutoff: float) -> tuple[list[tuple[Path, dt.datetime]], int]:
    """Pending files last written before `cutoff`, with that time (when the gateway received them),
    and the number of files left out because their study folder or name is not a UID, as the
    gateway's sweep leaves them out (a row keyed by such a name stayed `queued` for good, and on
    PostgreSQL one too long for its column stopped the requeue with a traceback).
    A running worker may archive a file between the listing and its stat: that one is skipped."""
    stale, foreign = [], 0
    for path in sorted(_pending_files(spool_dir / contract.SPOOL_PENDING)):
        if not (valid_uid(path.stem) and valid_uid(path.parent.name)):
            foreign += 1
            continue
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            continue
        if mtime <= cutoff:
            stale.append((path, dt.datetime.fromtimestamp(mtime, dt.timezone.utc)))
    return stale, foreign


def _pending_files(pending: Path) -> list[Path]:
    """The `.dcm` files of pending/'s study folders. A pending/ or a study folder that cannot be listed raises
    OSError: glob took one for an empty folder, so a requeue run where the spool is not (TRIAGE_SPOOL_DIR unset
    or another host's, a mount not up, a folder this user may not read) said "requeued 0 pending instance(s)"
    with exit 0, and nothing stranded was re-sent. A study folder retired while listed is skipped."""
    files = []
    with os.scandir(pending) as folders:
        studies = [Path(entry.path) for entry in folders if entry.is_dir()]
    for folder in studies:
        try:
            with os.scandir(folder) as entries:
                files.extend(Path(entry.path) for entry in entries if entry.name.endswith(".dcm"))
        except FileNotFoundError:
            continue
    return files


def prune(settings: WorkerSettings, older_than_days: float, dry_run: bool, every_hours: float | None) -> int:
    """Delete (or count) archived instances older than the retention period, once or periodically.

    A spool that is not there (neither the gateway's pending/ nor archive/: TRIAGE_SPOOL_DIR unset or wrong,
    the volume not mounted) is said on stderr, exit 3 once; the periodic loop says it each round and carries
    on (no restart loop while a fresh volume waits for the gateway). Before, it read "deleted 0 archived
    instance(s)", exit 0, every night, while the real archive kept patient images past their retention."""
    from worker.spool import prune_archive

    spool_dir = Path(settings.spool_dir)
    while True:
        if not any((spool_dir / folder).is_dir() for folder in (contract.SPOOL_PENDING, contract.SPOOL_ARCHIVE)):
            print(f"pneumonia-admin prune-archive: no spool in {spool_dir.absolute()} (no {contract.SPOOL_PENDING}/ "
                  f"or {contract.SPOOL_ARCHIVE}/): nothing pruned; TRIAGE_SPOOL_DIR must name the gateway's spool",
                  file=sys.stderr, flush=True)
            if every_hours is None:
                return 3
        else:
            files, size = prune_archive(spool_dir, older_than_days * 86400, now=time.time(), dry_run=dry_run)
            verb = "would delete" if dry_run else "deleted"
            print(f"{verb} {files} archived instance(s), {size / 2**20:.1f} MiB, received more than "
                  f"{older_than_days:g} days ago", flush=True)
            if every_hours is None:
                return 0
        time.sleep(every_hours * 3600)


def _mark_queued(engine: Any, study_uid: str, sop_uid: str, relpath: str, received_at: dt.datetime) -> None:
    """A `queued` row for an instance (study, SOP) the database has not seen, received when the gateway
    stored it; the same SOP UID finished in another study does not hide this one. Its study, if final, is
    reopened in the same transaction, as a worker's first claim does: a late image the database now holds
    must not leave its study "final" (and handed to a RIS as such) until a worker gets to it."""
    with engine.begin() as conn:
        stmt = db._insert(conn, db.instances).values(
            sop_instance_uid=sop_uid, study_instance_uid=study_uid, spool_relpath=relpath,
            status="queued", attempts=0, received_at=db.parse_timestamp(received_at))
        stmt = stmt.on_conflict_do_nothing(index_elements=list(db.INSTANCE_KEY)).returning(db.instances.c.sop_instance_uid)
        if conn.execute(stmt).first() is not None and study_uid:
            db.reopen_study(conn, study_uid)


class OutputError(Exception):
    """`--out` could not be written (no such folder, permissions, disk full)."""


def _emit(rows: list[dict[str, Any]], columns: Iterable[str], fmt: str, out: Path | None) -> None:
    """Rows to stdout or to `out`, in UTF-8 whatever the locale; a regular file appears whole or not at all.

    Why: with the locale's encoding an accession number in another script raised UnicodeEncodeError (a
    traceback) in an ASCII or Latin-1 locale, and `--out` was left cut short, which a RIS polling the file
    reads as a complete export. The file is written beside its target and renamed over it, keeping the old
    file's mode, owner and group, or in place where that cannot be done (`models.atomic.write_whole`)."""
    if out is None:
        _write(rows, list(columns), fmt, _utf8(sys.stdout))
        return
    try:  # a new file is 0640: an export holds accession numbers (the gateway's spool is 0640 too)
        write_whole(out, lambda handle: _write(rows, list(columns), fmt, handle), new_file_mode=0o640)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "a value the encoding cannot hold"
        raise OutputError(f"{type(exc).__name__}: {reason or 'I/O error'}") from exc


def _utf8(stream: Any) -> Any:
    """`stream` (stdout) re-encoded as UTF-8 where it can be (a real text stream; a test's StringIO is kept)."""
    if hasattr(stream, "reconfigure") and str(getattr(stream, "encoding", "") or "").lower().replace("-", "") != "utf8":
        stream.reconfigure(encoding="utf-8")
    return stream


def _write(rows: list[dict[str, Any]], columns: list[str], fmt: str, handle: Any) -> None:
    if fmt == "json":
        json.dump([_jsonable(r) for r in rows], handle, indent=2)
        handle.write("\n")
    elif fmt == "csv":
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _spreadsheet_safe(_jsonable(r).get(k)) for k in columns} for r in rows)
    else:
        handle.write("  ".join(columns) + "\n")
        for row in rows:
            handle.write("  ".join(_fmt(row.get(c)) for c in columns) + "\n")


def _spreadsheet_safe(value: Any) -> Any:
    """Text that a spreadsheet would run as a formula (an accession number from the modality
    starting with '=', '+', '-' or '@') gets a leading apostrophe, as OWASP advises for CSV export."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (_utc(v).isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.items()}


def _utc(value: dt.datetime) -> dt.datetime:
    """A stored time (naive UTC, see worker.db) made aware, so it prints with `+00:00`. Why: printed
    without an offset, an ISO-8601 reader in another zone took `11:56` for its own local time."""
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _fmt(value: Any) -> str:
    """One table cell: always one line of printable text (see `_printable`)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dt.datetime):
        return _utc(value).isoformat(timespec="seconds")
    return _printable(str(value))


def _printable(text: str) -> str:
    """`text` with each unprintable character (newline, carriage return, tab, escape, U+2028...) written as
    its Python escape (`\\n`, `\\x1b`). Why: the values come from the modality (an accession number "ACC1\\nX"),
    and a raw newline split a table row over two lines, the second one able to pass for another worklist
    row; an escape sequence could rewrite the terminal. CSV and JSON quote such values already."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def run_sr(engine: Any, args: argparse.Namespace) -> int:
    """`sr STUDY` or `sr --pending`: each study's report written and/or sent, and each send recorded."""
    if args.out is None and args.send is None:
        print("pneumonia-admin sr: error: give --out FILE and/or --send HOST:PORT", file=sys.stderr)
        return 2
    if (args.study_uid is None) == (not args.pending) or (args.pending and (args.send is None or args.out)):
        print("pneumonia-admin sr: error: give a study UID, or --pending with --send (and no --out)", file=sys.stderr)
        return 2
    if (args.final_since or args.every_minutes or args.limit) and not args.pending:
        print("pneumonia-admin sr: error: --final-since, --every-minutes and --limit go with --pending", file=sys.stderr)
        return 2
    if not args.pending:
        return _archive_missing(args) or SR_EXIT[report_study(engine, args, args.study_uid)]
    while True:  # once, or every --every-minutes (a compose service): a round's problem is said, the loop goes on
        if args.every_minutes is None:
            return _archive_missing(args) or _pending_round(engine, args)
        try:
            _archive_missing(args) or _pending_round(engine, args)
        except DBAPIError as exc:  # the database restarting: said, and the next round reconnects (pool_pre_ping)
            print(f"pneumonia-admin sr: lost the database ({type(getattr(exc, 'orig', None) or exc).__name__}); "
                  "trying again next round", file=sys.stderr, flush=True)
        time.sleep(args.every_minutes * 60)


def _archive_missing(args: argparse.Namespace) -> int:
    """3, said on stderr, when this host sees no archive/ (a refusal per study would be recorded for good)."""
    if (args.spool_dir / contract.SPOOL_ARCHIVE).is_dir():
        return 0
    print(f"pneumonia-admin sr: no {contract.SPOOL_ARCHIVE}/ in {args.spool_dir.absolute()} (TRIAGE_SPOOL_DIR "
          "unset or wrong, or the volume not mounted): the reports need the archived images", file=sys.stderr,
          flush=True)
    return 3


def _pending_round(engine: Any, args: argparse.Namespace) -> int:
    with _run_alone(args.spool_dir, destination(args)) as alone:
        if alone is None:
            return 3
        if not alone:  # cron started it again while a long run goes on: the same studies would be sent twice
            print(f"another `sr --pending` to {destination(args)} is running: nothing done", flush=True)
            return 0
        return _send_due_reports(engine, args)


SR_EXIT = {"done": 0, "refused": 1, "skipped": 1, "deferred": 3, "unavailable": 3}
"""`sr STUDY`'s exit status for each outcome of `report_study`."""


def _send_due_reports(engine: Any, args: argparse.Namespace) -> int:
    """One round. `--limit` counts the studies sent or refused: deferred ones (unreadable here for now) are said
    and passed over, so that a few stuck at the head of the queue do not hold back every newer study."""
    with engine.connect() as conn:
        studies = pending_reports(conn, destination(args), args.final_since)
    counts = dict.fromkeys(SR_EXIT, 0)
    for study_uid in studies:
        if args.limit is not None and counts["done"] + counts["refused"] >= args.limit:
            break
        outcome = report_study(engine, args, study_uid)
        counts[outcome] += 1
        if outcome == "unavailable":  # the PACS is down or busy: the next run takes the rest, this study first
            break
    stopped = "; stopped: the PACS is unavailable" if counts["unavailable"] else ""
    print(f"{counts['done']} report(s) sent to {destination(args)}, {counts['refused']} refused (reasons recorded), "
          f"{counts['deferred']} deferred to the next run, {counts['skipped']} no longer final or gone{stopped}",
          flush=True)
    return 3 if counts["deferred"] or counts["unavailable"] else 0


@contextlib.contextmanager
def _run_alone(spool_dir: Path, to: str) -> Iterator[bool | None]:
    """An exclusive lock per PACS on a file in the spool: True when held, False when another run holds it, None
    (said on stderr) when the file cannot be opened. The file is created 0640 and, where an earlier run as root
    left it unwritable, opened read-only, which takes the flock as well (`worker/migrations/env.py`'s lock, the
    same fix). flock covers the processes of one host and containers sharing its volume, not other hosts."""
    path = spool_dir / f".sr-pending-{hashlib.sha256(to.encode()).hexdigest()[:16]}.lock"
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY)
    except OSError as exc:  # a read-only spool, a folder this user cannot write, no lock file yet
        print(f"pneumonia-admin sr: cannot open the lock file {path} ({type(exc).__name__}): nothing sent",
              file=sys.stderr, flush=True)
        yield None
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)  # closing releases the flock


def destination(args: argparse.Namespace) -> str:
    """The PACS as the records name it, "AE@host:port", as written (localhost and 127.0.0.1 are two)."""
    host, port = args.send
    return f"{args.called_ae}@{host}:{port}"


def pending_reports(conn: Connection, to: str, since: dt.datetime | None = None) -> list[str]:
    """Final studies without a report for `to` (sent, or refused with its reason) at their current finalisation,
    oldest finalisation first (from `since`). A reopened study is final again at a later time, so it is due again."""
    s, r = db.studies, db.reports
    done = exists().where(r.c.study_instance_uid == s.c.study_instance_uid, r.c.destination == to,
                          r.c.finalized_at == s.c.finalized_at)
    stmt = select(s.c.study_instance_uid).where(s.c.final.is_(True), s.c.finalized_at.is_not(None), ~done)
    if since is not None:
        stmt = stmt.where(s.c.finalized_at >= since)
    return list(conn.execute(stmt.order_by(s.c.finalized_at)).scalars())


def fetch_sr(conn: Connection, args: argparse.Namespace, study_uid: str
             ) -> tuple[dict[str, Any] | None, list[dict[str, Any]], list[dict[str, Any]]]:
    """The study's worklist row (with `worklist_flag`, `triage_complete`), its scored images oldest first, and
    the reports sent for it to `--send`'s PACS."""
    v, t = db.study_flags, db.instances
    study = conn.execute(select(*[v.c[c] for c in STORED_STUDY_COLUMNS])
                         .where(v.c.study_instance_uid == study_uid)).mappings().first()
    images = [dict(r) for r in conn.execute(
        select(*[t.c[c] for c in ScoredImage.__dataclass_fields__])
        .where(t.c.study_instance_uid == study_uid, t.c.status == "done")
        .order_by(t.c.received_at, t.c.sop_instance_uid)).mappings()]
    sent = db.sent_reports(conn, study_uid, destination(args)) if args.send else []
    return (None if study is None else with_unverified(conn, [dict(study)], args.low_flags)[0]), images, sent


def report_study(engine: Any, args: argparse.Namespace, study_uid: str) -> str:
    """Build one study's SR from its archived images' headers, then write and/or send it; the outcome: done,
    refused (recorded with its reason when sending), skipped (not found, not final), deferred (a local problem
    that may pass, not recorded) or unavailable (the PACS). It prints UIDs, flags and the PACS's address, no
    patient data: the SR carries the patient module of its images, which must not reach a terminal or a log."""
    with engine.connect() as conn:
        study, rows, sent = fetch_sr(conn, args, study_uid)
    if study is None:
        print(f"study {study_uid} not found", file=sys.stderr)
        return "skipped"
    if not study["final"]:  # a report sent now could be contradicted by the next image, in the PACS for good
        print(f"study {study_uid} is not final (images may still arrive): no report until it is", file=sys.stderr)
        return "skipped"
    earlier = [r for r in sent if r["finalized_at"] < study["finalized_at"]]  # the same finalisation: the same bytes
    try:
        images = [ScoredImage.from_row(row) for row in rows]
        sources = [_archived_header(args.spool_dir, study_uid, image.sop_instance_uid) for image in images]
        report = build_report(study, images, sources, content_qualification=args.content_qualification,
                              replaces=[(r["series_instance_uid"], r["sop_instance_uid"]) for r in earlier])
    except ReportError as exc:
        print(f"no report for study {study_uid}: {exc}", file=sys.stderr)
        if exc.transient:
            return "deferred"
        _record_refusal(engine, args, study, str(exc))
        return "refused"
    said = (f"SR {report.SOPInstanceUID} for study {study_uid}: {len(images)} scored image(s), "
            f"worklist flag {study['worklist_flag']}")
    if args.out is not None:
        try:
            write_whole(args.out, lambda handle: report.save_as(handle, enforce_file_format=True), binary=True,
                        new_file_mode=0o640)
        except OSError as exc:
            raise OutputError(f"{type(exc).__name__}: {exc.strerror or 'I/O error'}") from exc
        print(f"{said}, written to {args.out}")
    if args.send is not None:
        host, port = args.send
        try:
            send_report(report, host, port, called_ae=args.called_ae, calling_ae=args.calling_ae)
        except SendError as exc:
            print(f"pneumonia-admin sr: not sent: {exc}", file=sys.stderr)
            if not exc.object_refused:
                return "unavailable"
            _record_refusal(engine, args, study, str(exc))  # its own answer to this object: the queue goes on
            return "refused"
        with engine.begin() as conn:
            db.record_report(conn, study_uid, destination(args), study["finalized_at"], db.REPORT_SENT,
                             series_uid=str(report.SeriesInstanceUID), sop_uid=str(report.SOPInstanceUID))
        print(f"{said}, stored by {args.called_ae} at {host}:{port}")
    return "done"


def _record_refusal(engine: Any, args: argparse.Namespace, study: Mapping[str, Any], reason: str) -> None:
    """A refusal for `--send`'s PACS at this finalisation, so `--pending` does not try it every run."""
    if args.send is not None:
        with engine.begin() as conn:
            db.record_report(conn, study["study_instance_uid"], destination(args), study["finalized_at"],
                             db.REPORT_REFUSED, reason=reason)


def _archived_header(spool_dir: Path, study_uid: str, sop_uid: str) -> Dataset:
    """The header of the image's newest archived copy (`spool.newest_archived_copy`: the first, or a re-send
    after the result, which carries the PACS's corrections), or ReportError saying why there is none: gone
    (pruned, retention `delete`) or not DICOM for good, unreadable here for now (permissions, I/O: transient)."""
    try:
        path = newest_archived_copy(spool_dir, study_uid, sop_uid)
    except OSError as exc:  # a study folder this host cannot search now (permissions, a stale mount)
        raise ReportError(f"the archive of scored image {sop_uid} cannot be read now ({type(exc).__name__})",
                          transient=True) from None
    if path is None:
        raise ReportError(f"no archived copy of scored image {sop_uid}")
    try:
        with quiet():  # pydicom's warnings on what it reads
            return read_dicom(str(path), stop_before_pixels=True)
    except ImageAccessError as exc:
        raise ReportError(f"the archived copy of scored image {sop_uid} cannot be read now ({exc})",
                          transient=True) from None
    except UnreadableImageError as exc:
        raise ReportError(f"the archived copy of scored image {sop_uid} cannot be read ({exc})") from None


COMMANDS: dict[str, tuple[Callable[[Connection, argparse.Namespace], Any], Callable[[Any, argparse.Namespace], int]]] = {
    "list": (fetch_list, render_list),
    "export": (fetch_export, render_list),
    "show": (fetch_show, render_show),
    "stats": (fetch_stats, render_stats),
}
"""Read commands: what each fetches inside one read transaction, and how it prints it afterwards."""

if __name__ == "__main__":
    sys.exit(main())
