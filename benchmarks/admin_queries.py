"""`pneumonia-admin` query times on a large results table, with and without the schema's indexes.

Why: the worklist and audit queries must stay interactive as a site's table grows. The test suite
checks that each query's plan searches an index (`tests/worker/test_admin.py`); this measures what
that buys, against the same queries on the same rows with the secondary indexes dropped.

    python benchmarks/admin_queries.py --rows 100000 --out benchmarks/results/admin_queries.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, inspect

from worker import admin
from worker.samples import ADMIN_QUERIES as QUERIES, populate_results



def seconds_per_query(url: str, repeats: int) -> dict[str, float]:
    """Median wall time of each admin command as an operator runs it (engine and connection set-up,
    about 4 ms here, included); a command that fails or finds nothing is an error, not a time."""
    timings = {}
    for name, args in QUERIES.items():
        runs = []
        for _ in range(repeats):
            output = io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stdout(output):
                code = admin.main(["--database-url", url, *args])
            runs.append(time.perf_counter() - start)
            if code != 0 or len(output.getvalue().splitlines()) < 2:
                raise RuntimeError(f"{name} failed or found nothing (exit {code}); too few --rows?")
        timings[name] = statistics.median(runs)
    return timings


def leave_few_untriaged(url: str, count: int) -> None:
    """`--flag NOT_TRIAGED`'s worst case: every study triage-complete (final, each image scored) but the `count`
    oldest, so a newest-first read meets them last and `--limit` is never met before the table ends."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE instances SET status = 'done', reason = NULL, probability = 0.05, "
                             "stratum = 'likely_normal', severity = 0, flag = 'ROUTINE' WHERE status != 'done'")
        conn.exec_driver_sql("UPDATE studies SET final = 1, finalized_at = last_received_at, "
                             "first_finalized_at = last_received_at")
        conn.exec_driver_sql("UPDATE studies SET final = 0, finalized_at = NULL, first_finalized_at = NULL, "
                             "stratum = 'likely_normal', severity = 0, flag = 'ROUTINE' WHERE "  # nothing escalates
                             "study_instance_uid IN (SELECT study_instance_uid FROM studies ORDER BY last_received_at "
                             f"LIMIT {int(count)})")
    engine.dispose()


def drop_secondary_indexes(url: str) -> list[str]:
    """The baseline: the same tables without the indexes the migrations create."""
    engine = create_engine(url)
    names = [index["name"] for table in ("instances", "studies") for index in inspect(engine).get_indexes(table)]
    with engine.begin() as conn:
        for name in names:
            conn.exec_driver_sql(f"DROP INDEX {name}")
    engine.dispose()
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/admin_queries.json"))
    parser.add_argument("--untriaged-studies", type=int,
                        help="leave only this many (the oldest) studies not triaged: --flag NOT_TRIAGED's worst case")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{scratch}/results.db"
        populate_results(url, args.rows, seed=1)
        if args.untriaged_studies is not None:
            leave_few_untriaged(url, args.untriaged_studies)
        indexed = seconds_per_query(url, args.repeats)
        dropped = drop_secondary_indexes(url)
        baseline = seconds_per_query(url, args.repeats)
    result = {
        "machine": platform.processor() or platform.machine(), "database": "sqlite", "rows": args.rows,
        "untriaged_studies": args.untriaged_studies,
        "studies": args.rows // 4, "repeats": args.repeats, "seconds_indexed": indexed,
        "seconds_without_indexes": baseline, "indexes_dropped": dropped,
        "speedup_from_indexes": {name: baseline[name] / indexed[name] for name in QUERIES},
    }
    for name in QUERIES:
        print(f"{name:16s} {indexed[name] * 1000:8.1f} ms indexed   {baseline[name] * 1000:8.1f} ms without   "
              f"({result['speedup_from_indexes'][name]:.1f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
