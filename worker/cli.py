"""`pneumonia-worker`: run the Celery worker, migrate the database, or check the set-up.

    pneumonia-worker migrate          # alembic upgrade head on TRIAGE_DATABASE_URL
    pneumonia-worker check            # settings, model + card (sha256), execution provider, database reachability
    pneumonia-worker run [-c N]       # migrate (unless TRIAGE_MIGRATE_ON_START=false), check, serve
    pneumonia-worker downgrade REV    # alembic downgrade to REV (e.g. 0005) before deploying an older release;
                                      # run it with the release that migrated the database
    pneumonia-worker calibrate --cases local.csv --site NAME --out site.json
                                      # refit threshold + strata on local labelled studies
                                      # (use it with TRIAGE_SITE_CALIBRATION=site.json)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from worker import contract
from worker.arguments import int_in
from worker.config import WorkerSettings, load_worker_settings

if TYPE_CHECKING:
    from celery import Celery
    from pydicom.dataset import Dataset
    from sqlalchemy.engine import Connection

    from models.site_calibration import SiteCalibration

log = logging.getLogger("worker.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pneumonia-worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the Celery worker on the triage queue")
    run.add_argument("-c", "--concurrency", type=int_in(1), default=None,
                     help="pool processes, 1 or more (default TRIAGE_CONCURRENCY)")
    run.add_argument("--hostname", default=None, help="Celery node name (default triage@%%h)")
    sub.add_parser("migrate", help="apply database migrations (alembic upgrade head)")
    sub.add_parser("check", help="load the model and card and reach the database, then exit")
    down = sub.add_parser("downgrade", help="take the schema down to an older revision (a rollback to an older "
                                            "release; run it with the release that migrated the database)")
    down.add_argument("revision", help="the revision the older release needs, e.g. 0005")
    add_calibrate_parser(sub)
    args = parser.parse_args(argv)
    settings = load_worker_settings(parser.prog)
    if settings is None:
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "migrate":
        return migrate(settings)
    if args.command == "check":
        return check(settings)
    if args.command == "downgrade":
        return downgrade(settings, args.revision)
    if args.command == "calibrate":
        return calibrate_site(settings, args)
    return run_worker(settings, args.concurrency, args.hostname)


IN_MEMORY_DATABASE = ("TRIAGE_DATABASE_URL names an in-memory SQLite database (no file path): every process "
                      "would get its own empty one and no result would be kept; give a file, e.g. sqlite:///var/triage.db")


def usable_database_url(settings: WorkerSettings) -> int:
    """0, or 3 after one line saying why the URL cannot hold results (a malformed one is told by its kind only:
    its text may hold a password)."""
    from worker.db import in_memory_sqlite

    try:
        in_memory = in_memory_sqlite(settings.database_url)
    except Exception as exc:
        log.error("TRIAGE_DATABASE_URL cannot be used (%s)", type(exc).__name__)
        return 3
    if in_memory:  # `check` said "database ok" and `run` started a worker that could store nothing
        log.error(IN_MEMORY_DATABASE)
        return 3
    return 0


def database_error(exc: BaseException, database_url: str) -> str:
    """An error's kind and the first line of its text, with the URL's password masked should it appear there: what
    the server said (a database or role that does not exist, a password refused, TLS required, no privilege) is
    what an administrator must fix, and "unreachable" alone sent them to look at the network."""
    from urllib.parse import quote

    from sqlalchemy.engine import make_url

    text = (str(exc).strip().splitlines() or [""])[0]
    try:
        password = make_url(database_url).password
    except Exception:
        password = None
    if password:
        for secret in {str(password), quote(str(password), safe="")}:
            text = text.replace(secret, "***")
    return f"{type(exc).__name__}: {text[:300]}"


def migrate(settings: WorkerSettings) -> int:
    """Upgrade to head; a failure is one log line and exit 3, not a traceback (compose restarts the worker)."""
    from worker.migrate import upgrade

    if status := usable_database_url(settings):
        return status
    try:
        upgrade(settings.database_url)
    except Exception as exc:
        log.error("database migration failed: %s", database_error(exc, settings.database_url))
        return 3
    log.info("database schema is at head")
    return 0


def downgrade(settings: WorkerSettings, revision: str) -> int:
    """Take the schema down to `revision` for a rollback: exit 2 for a revision this worker does not ship (`base`,
    which would drop every result, included), 3 when the database refuses (one line, as `migrate`)."""
    from worker.migrate import current_revision, downgrade as schema_downgrade, is_known_revision

    if not is_known_revision(revision) or revision in ("base", "heads", "head") or not revision[:1].isalnum():
        log.error("downgrade refused: %r is not a revision of this worker (give one such as 0005; `base`, which "
                  "would drop every result, is not offered)", revision)
        return 2
    if status := usable_database_url(settings):
        return status
    try:
        schema_downgrade(settings.database_url, revision)
        schema = current_revision(settings.database_url)
    except Exception as exc:
        log.error("database downgrade failed: %s", database_error(exc, settings.database_url))
        return 3
    log.info("database schema is at %s", schema or "none (empty database)")
    return 0


def check(settings: WorkerSettings) -> int:
    """Fail fast with a clear message instead of starting a worker that can only fail tasks."""
    from sqlalchemy import text

    from models.card import card_path_for
    from models.detector import load_card
    from models.errors import ExecutionProviderError
    from worker.db import make_engine
    from worker.migrate import current_revision, head_revision, is_known_revision
    from worker.pipeline import check_card_fits_results

    path = settings.resolved_model_path()
    if not path.is_file():
        log.error("model file not found: %s", path)
        return 2
    try:
        card = load_card(path, site_calibration=settings.site_calibration)
        check_card_fits_results(card)
    except Exception as exc:
        log.error("model card problem: %s", exc)
        return 2
    if not card_has_decision_digest(path):
        log.warning("model card %s has no decision_sha256 (written before 2026-11-29, or stripped): an edit of its "
                    "temperature, threshold or strata cannot be told; re-save it with `pneumonia-train card`",
                    card_path_for(path).name)
    if status := usable_database_url(settings):
        return status
    try:
        engine = make_engine(settings.database_url)
    except Exception as exc:  # a malformed URL; its text may hold a password, so only the kind is told
        log.error("TRIAGE_DATABASE_URL cannot be used (%s)", type(exc).__name__)
        return 3
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            read_only = database_read_only(conn)
    except Exception as exc:
        log.error("database unreachable (%s)", database_error(exc, settings.database_url))
        return 3
    finally:
        engine.dispose()
    if read_only:  # every claim would fail: a URL left on a standby after a failover, a read-only mount
        log.error("database is read-only (%s): the worker writes every result; point TRIAGE_DATABASE_URL at the "
                  "primary", read_only)
        return 3
    try:  # a role granted the application's tables only (a DBA migrates), or the server gone since the query above
        schema, expected = current_revision(settings.database_url), head_revision()
    except Exception as exc:
        reason = database_error(exc, settings.database_url)
        hint = ": grant the worker's role SELECT on alembic_version" if "permission denied" in reason else ""
        log.error("database schema revision cannot be read (%s)%s", reason, hint)
        return 3
    if schema is not None and not is_known_revision(schema):  # a newer worker migrated it: `migrate` cannot help
        log.error("database schema is at %s, newer than this worker's %s: deploy the worker release that "
                  "migrated it, or downgrade the schema with that release", schema, expected)
        return 3
    if schema != expected:
        if not settings.migrate_on_start:  # every task would fail on the old tables (or, on SQLite, retry for long)
            log.error("database schema is at %s, this worker needs %s: run `pneumonia-worker migrate` "
                      "(TRIAGE_MIGRATE_ON_START is off)", schema or "none (empty database)", expected)
            return 3
        log.info("database schema is at %s; `run` migrates it to %s first", schema or "none (empty database)", expected)
    try:
        providers = probe_providers(settings)
    except ExecutionProviderError as exc:
        log.error("execution provider (TRIAGE_EXECUTION_PROVIDER=%s): %s", settings.execution_provider, exc)
        return 2
    except Exception as exc:  # the session itself would not build: no task could run either
        log.error("onnxruntime session for %s failed: %s: %s", path.name, type(exc).__name__, exc)
        return 2
    site = card.extra.get("site_calibration")
    calibration = f"site calibration {site['site']!r} ({site['sha256'][:12]}...)" if site else "card calibration"
    for warning in (site or {}).get("warnings", ()):  # written once by `calibrate`; shown wherever it is deployed
        log.warning("site calibration %r: %s", site["site"], warning)
    if not site:  # every start says it: the cut-points a reader's URGENT and ROUTINE follow are not this site's
        population = (card.extra.get("data") or {}).get("population", "the training data's population")
        log.warning("no site calibration (TRIAGE_SITE_CALIBRATION): the strata are the card's, fitted on "
                    "PneumoniaMNIST validation (%s); fit them on this site's labelled studies with `pneumonia-worker "
                    "calibrate` before clinical use (README, Site calibration)", population)
    log.info("model %s %s (sha256 %s...) with %s ok on %s; database ok", card.name, card.version, card.sha256[:12],
             calibration, ",".join(providers))
    return 0


def card_has_decision_digest(model_path: Path) -> bool:
    """Whether the card beside the model carries `decision_sha256` (what `ModelCard.load` checks when present)."""
    import json

    from models.card import card_path_for

    try:
        return bool(json.loads(card_path_for(model_path).read_text()).get("decision_sha256"))
    except (OSError, ValueError, AttributeError):
        return False


def database_read_only(conn: Connection) -> str | None:
    """Why the database cannot take writes, or None: a PostgreSQL hot standby or read-only session,
    or an SQLite file (or its folder, where WAL writes its journal) that this process cannot write."""
    from sqlalchemy import text

    from worker.db import sqlite_path

    if conn.dialect.name == "postgresql":
        if conn.execute(text("SHOW transaction_read_only")).scalar() == "on":
            return "PostgreSQL transaction_read_only is on: a standby, or a read-only default"
        return None
    path = sqlite_path(str(conn.engine.url))
    if path is not None and path.is_file():
        for what, target in (("file", path), ("folder", path.parent)):
            if not os.access(target, os.W_OK):
                return f"the SQLite {what} is not writable"
    return None


def probe_providers(settings: WorkerSettings) -> list[str]:
    """The providers a task's session will run on, found in a spawned process.

    Spawned, not in this process: `run` forks the Celery pool after `check`, and a CUDA context
    created before a fork is unusable in the children.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from worker.pipeline import active_providers

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(active_providers, settings.model_dump(mode="json")).result()


def add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    from models.calibration import StrataTargets

    defaults = StrataTargets()
    p = sub.add_parser("calibrate", help="fit a site calibration on local labelled studies (counts only are kept)",
                       description="Refit temperature, operating threshold and strata on this site's own labelled "
                                   "studies, with a stratified k-fold estimate of how they perform on unseen ones.")
    p.add_argument("--cases", type=Path, required=True, help="CSV with columns path,label (normal/pneumonia or 0/1)")
    p.add_argument("--site", required=True, help="a name for this site or device group, kept in the file")
    p.add_argument("--out", type=Path, required=True,
                   help="where to write the site calibration JSON (a new file, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (written whole, then renamed over it: a worker reading it sees "
                        "the old file or the new one)")
    p.add_argument("--folds", type=int_in(2), default=5, help="k of the stratified k-fold estimate")
    p.add_argument("--seed", type=int_in(0), default=0, help="seed of the fold assignment")
    p.add_argument("--rule-out-sensitivity", type=float, default=defaults.rule_out_sensitivity)
    p.add_argument("--high-suspicion-specificity", type=float, default=defaults.high_suspicion_specificity)
    p.add_argument("--batch-size", type=int_in(1), default=16)
    p.add_argument("--allow-separated", action="store_true",
                   help="write the file even when the model separates the cases perfectly (clear-cut studies); "
                        "its cut-points are then optimistic and may send many pneumonias to likely_normal")


def calibrate_site(settings: WorkerSettings, args: argparse.Namespace) -> int:
    """Score the local cases with the configured model (its own card), fit, write, summarise.

    Everything that can be refused without the model (arguments, --out, the CSV, too few studies,
    duplicates) is refused before any case is scored: scoring hundreds of studies takes minutes."""
    from models.calibration import StrataTargets
    from models.detector import PneumoniaDetector
    from models.errors import ModelIntegrityError, UnreadableImageError
    from models.site_calibration import (SEPARATED, case_groups, case_logits, check_cases, fit_site_calibration,
                                         read_cases)
    from worker.contract import quiet_pydicom

    quiet_pydicom()  # as the worker does: a malformed element's warning would quote its value (a name, say)
    out_dir = Path(args.out).parent
    if Path(args.out).is_dir():
        log.error("site calibration not written: --out names a folder; give a file name such as site.json")
        return 2
    if (status := refuse_existing_out(args)) is not None:
        return status
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # refused just below, without the OSError's text (the path may name a patient)
    if not (out_dir.is_dir() and os.access(out_dir, os.W_OK)):  # found out now, not after scoring every case
        log.error("site calibration not written: the --out folder cannot be made or is not writable")
        return 2
    try:
        targets = StrataTargets(args.rule_out_sensitivity, args.high_suspicion_specificity)
        paths, labels, lines = read_cases(args.cases)
        check_cases(labels, args.folds)  # a CSV with too few studies fails now, not after scoring them
        headers = dicom_headers(paths)
        groups = case_groups(paths, labels, lines, headers, Path(args.cases).name)
        keep, excluded = cases_the_worker_would_score(headers, settings)
        check_cases(labels[keep], args.folds, groups[keep])  # again, counting studies, without those left out
        kept = np.flatnonzero(keep)
        detector = PneumoniaDetector(settings.resolved_model_path(), intra_op_threads=settings.intra_op_threads,
                                     lut_shape_conflict=settings.presentation_lut_conflict,
                                     polarity_check=settings.refuses_misoriented)  # read as the worker reads
        logits = case_logits(detector, [paths[i] for i in kept], args.batch_size, lines=[lines[i] for i in kept])
        site = fit_site_calibration(labels[keep], logits, detector.card, args.site, targets, args.folds, args.seed,
                                    groups=groups[keep])
    except OSError as exc:  # its text names the file, and case paths may carry patient identifiers
        log.error("site calibration not written: %s (%s)", type(exc).__name__, exc.strerror or "I/O error")
        return 2
    except (ValueError, UnreadableImageError, ModelIntegrityError) as exc:  # our own texts: CSV lines, no paths
        log.error("site calibration not written: %s", exc)
        return 2
    if SEPARATED in site.warnings and not args.allow_separated:
        log.error("site calibration not written: %s (--allow-separated writes it anyway)", SEPARATED)
        return 2
    if excluded:
        site = replace(site, cases={**site.cases, "excluded": excluded})
    if (status := refuse_existing_out(args)) is not None:  # made by someone else while the cases were scored
        return status
    try:
        site.save(args.out)
    except OSError as exc:  # its text names the file; the folder was writable a moment ago (disk full, say)
        log.error("site calibration not written: %s (%s)", type(exc).__name__, exc.strerror or "I/O error")
        return 2
    print(summary(site))
    return 0


def refuse_existing_out(args: argparse.Namespace) -> int | None:
    """2 when --out exists and --overwrite was not given: it may be the file the worker serves, and a re-fit
    (a tighter target, say) replaced it silently; None when the file may be written."""
    if args.overwrite or not os.path.lexists(args.out):
        return None
    log.error("site calibration not written: --out already exists (perhaps the deployed calibration); "
              "give another file name, or --overwrite to replace it")
    return 2


def dicom_headers(paths: list[Path]) -> list[Dataset | None]:
    """Each DICOM case's header (no pixels), None for a raster or an unreadable file (`case_logits` reports
    those by CSV line): read once for the worker's selection and for the cases' identities."""
    from models.dicom_io import read_dicom
    from models.errors import UnreadableImageError
    from models.image_io import is_dicom

    headers: list[Dataset | None] = []
    for path in paths:
        try:
            dicom = path.is_file() and is_dicom(path)
            headers.append(read_dicom(str(path), stop_before_pixels=True) if dicom else None)
        except (OSError, UnreadableImageError):
            headers.append(None)
    return headers


def cases_the_worker_would_score(headers: list[Dataset | None],
                                 settings: WorkerSettings) -> tuple[np.ndarray, dict[str, int]]:
    """Apply the worker's own selection to DICOM cases (`dicom_headers`), so the site is calibrated on what
    it will score.

    A lateral view or a non-chest image in the list would never reach the model in
    production; it is left out and counted by reason (kept in the file), not silently.
    """
    from models.errors import UnreadableImageError
    from worker.selection import skip_reason

    keep = np.ones(len(headers), dtype=bool)
    excluded: dict[str, int] = {}
    for index, header in enumerate(headers):
        if header is None:
            continue  # rasters carry no tags
        try:
            reason = skip_reason(header, settings.missing_tag_policy)
        except (OSError, UnreadableImageError):
            continue  # unreadable files are reported by case_logits, by CSV line
        except Exception as exc:  # an element of the wrong VR: pydicom's message quotes its bytes (a name, say)
            reason = f"header could not be read ({type(exc).__name__})"  # the worker fails such an image
        if reason is not None:
            keep[index] = False
            excluded[reason] = excluded.get(reason, 0) + 1
    return keep, excluded


THRESHOLD_ROWS = (("sensitivity", "sensitivity"), ("specificity", "specificity"), ("precision", "PPV"),
                  ("npv", "NPV"), ("accuracy", "accuracy"))
TARGET_ROWS = (("rule_out_sensitivity", "rule-out sensitivity"),
               ("high_suspicion_specificity", "high-suspicion specificity"))
LABEL_WIDTH = 26


def summary(site: SiteCalibration) -> str:
    """As shipped vs site-calibrated (k-fold), the figures a local acceptance test looks at: those at the
    threshold, then those the strata targets set (the worklist flags follow the strata), held out against
    the targets."""
    fit = site.calibration
    lines = [f"site calibration {site.site!r}: {cases_text(site.cases)}, sha256 {site.sha256[:12]}...",
             f"fitted: temperature {fit.temperature:.3f}, threshold {fit.threshold:.3f}, strata cuts "
             + ", ".join(f"{s.name} >= {s.lower:.3f}" for s in fit.strata[1:]),
             f"{'':{LABEL_WIDTH}}{'as shipped (card)':>24}{str(site.cross_validated['folds']) + '-fold held out':>24}"
             "   (95% bootstrap CI)"]
    parts = (site.as_shipped, site.cross_validated)
    for key, label in THRESHOLD_ROWS:
        lines.append(f"{label:{LABEL_WIDTH}}" + "".join(f"{figure_cell(p, 'at_threshold', key):>24}" for p in parts))
    for key, label in TARGET_ROWS:
        target, held_out = getattr(site.targets, key), site.cross_validated["at_targets"][key]
        verdict = "met" if held_out >= target else "MISSED"
        lines.append(f"{label:{LABEL_WIDTH}}" + "".join(f"{figure_cell(p, 'at_targets', key):>24}" for p in parts)
                     + f"   target {100 * target:.1f}: {verdict}")
    lines += [f"excluded (the worker would skip or fail them): {n} x {reason}"
              for reason, n in site.cases.get("excluded", {}).items()]
    lines += [f"warning: {w}" for w in site.warnings]
    return "\n".join(lines)


def cases_text(cases: Mapping[str, Any]) -> str:
    """Studies per class; the images too where a study has several (the minimum and the CIs count studies)."""
    studies = cases.get("studies", cases)
    text = f"{studies['n']} studies ({studies['pneumonia']} pneumonia, {studies['normal']} normal)"
    return text if studies["n"] == cases["n"] else f"{text} in {cases['n']} images"


def figure_cell(part: Mapping[str, Any], figures: str, key: str) -> str:
    """A percentage with its 95% CI, e.g. 94.4 (92.0-96.5)."""
    low, high = part[f"{figures}_ci95"][key]
    return f"{100 * part[figures][key]:.1f} ({100 * low:.1f}-{100 * high:.1f})"


def run_worker(settings: WorkerSettings, concurrency: int | None, hostname: str | None) -> int:
    """Check first (model, database reachable, schema not newer than this worker), then migrate."""
    status = check(settings)
    if status:
        return status
    if settings.migrate_on_start:
        status = migrate(settings)
        if status:
            return status
    from worker import watchdog
    from worker.celery_app import get_app

    app = get_app()
    guard = watchdog.install(app, contract.QUEUE, settings.stall_exit_s)
    argv = [
        "worker",
        "-Q", contract.QUEUE,
        "--pool", "prefork",
        "-c", str(concurrency if concurrency is not None else settings.concurrency),
        "--loglevel", settings.log_level,
        "-n", hostname or "triage@%h",
        "--without-gossip", "--without-mingle",
    ]
    status = celery_exit_status(app, argv)
    return watchdog.EXIT_STALLED if guard is not None and guard.fired else status


def celery_exit_status(app: "Celery", argv: list[str]) -> int:
    """Run Celery's command line for `app` and return its exit status, as the `celery` command would exit.

    Why not `app.worker_main`: it drops the status (and so does `app.start`, which runs click without its
    standalone mode, where the status is returned, not raised), so a worker that died of an unrecoverable
    error (a broker ACL refusing its commands, say) exited 0, and a supervisor that restarts on failure
    (compose `on-failure`, systemd `Restart=on-failure`) left it down. The app is handed over as
    `app.start` does it, as the default of the command's --app option."""
    from celery.bin.celery import celery as celery_command

    celery_command.params[0].default = app
    try:
        celery_command.main(args=argv, prog_name="celery", standalone_mode=True)
        status: object = 0  # click's standalone mode always exits; this is not reached
    except SystemExit as exc:
        status = exc.code
    finally:
        celery_command.params[0].default = None
    if status is None or isinstance(status, int):
        return status or 0
    return 1  # sys.exit("message") means failure


if __name__ == "__main__":
    sys.exit(main())
