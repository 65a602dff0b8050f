"""`pneumonia-worker`: run the Celery worker, migrate the database, or check the set-up.

    pneumonia-worker migrate          # alembic upgrade head on TRIAGE_DATABASE_URL
    pneumonia-worker check            # settings, model + card (sha256), database reachability
    pneumonia-worker run [-c N]       # migrate (unless TRIAGE_MIGRATE_ON_START=false), check, serve
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from worker import contract
from worker.config import WorkerSettings

log = logging.getLogger("worker.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pneumonia-worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the Celery worker on the triage queue")
    run.add_argument("-c", "--concurrency", type=int, default=None, help="pool processes (default TRIAGE_CONCURRENCY)")
    run.add_argument("--hostname", default=None, help="Celery node name (default triage@%%h)")
    sub.add_parser("migrate", help="apply database migrations (alembic upgrade head)")
    sub.add_parser("check", help="load the model and card and reach the database, then exit")
    args = parser.parse_args(argv)
    settings = WorkerSettings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "migrate":
        return migrate(settings)
    if args.command == "check":
        return check(settings)
    return run_worker(settings, args.concurrency, args.hostname)


def migrate(settings: WorkerSettings) -> int:
    from worker.migrate import upgrade

    upgrade(settings.database_url)
    log.info("database schema is at head")
    return 0


def check(settings: WorkerSettings) -> int:
    """Fail fast with a clear message instead of starting a worker that can only fail tasks."""
    from sqlalchemy import text

    from models.detector import load_card
    from worker.db import make_engine

    path = settings.resolved_model_path()
    if not path.is_file():
        log.error("model file not found: %s", path)
        return 2
    try:
        card = load_card(path)
    except Exception as exc:
        log.error("model card problem: %s", exc)
        return 2
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        log.error("database unreachable (%s)", type(exc).__name__)
        return 3
    finally:
        engine.dispose()
    log.info("model %s %s (sha256 %s...) ok; database ok", card.name, card.version, card.sha256[:12])
    return 0


def run_worker(settings: WorkerSettings, concurrency: int | None, hostname: str | None) -> int:
    if settings.migrate_on_start:
        migrate(settings)
    status = check(settings)
    if status:
        return status
    from worker.celery_app import get_app

    argv = [
        "worker",
        "-Q", contract.QUEUE,
        "--pool", "prefork",
        "-c", str(concurrency or settings.concurrency),
        "--loglevel", settings.log_level,
        "-n", hostname or "triage@%h",
        "--without-gossip", "--without-mingle",
    ]
    get_app().worker_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
