"""`pneumonia-admin` against a populated database, including speed on 100k rows."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import random
import subprocess
import sys
import time

import pytest
from sqlalchemy import insert

from worker import admin, db
from worker.migrate import upgrade

STRATA = [("likely_normal", 0, "ROUTINE"), ("indeterminate", 1, "PRIORITY"), ("high_suspicion", 2, "URGENT")]


def populate(url: str, n: int, seed: int = 0) -> list[dict]:
    """n instances over n/4 studies; ~10% skipped/failed; finished within the last hour."""
    rng = random.Random(seed)
    now = db.utcnow()
    rows = []
    for i in range(n):
        status = rng.choices(["done", "skipped", "failed"], [0.9, 0.07, 0.03])[0]
        received = now - dt.timedelta(seconds=rng.uniform(60, 3600))
        finished = received + dt.timedelta(seconds=rng.uniform(0.1, 5))
        row = {"sop_instance_uid": f"1.2.{i}", "study_instance_uid": f"1.3.{i // 4}", "accession_number": f"A{i // 4}",
               "modality": "CR", "status": status, "attempts": 1, "received_at": received,
               "started_at": received, "finished_at": finished, "processing_ms": rng.uniform(50, 500),
               "probability": None, "stratum": None, "severity": None, "flag": None, "reason": None}
        if status == "done":
            name, sev, flag = rng.choice(STRATA)
            row.update(probability=rng.random(), stratum=name, severity=sev, flag=flag)
        else:
            row["reason"] = "view position LL is not frontal (PA/AP)" if status == "skipped" else "no PixelData element"
        rows.append(row)
    upgrade(url)
    engine = db.make_engine(url)
    with engine.begin() as conn:
        for start in range(0, n, 5000):
            conn.execute(insert(db.instances), rows[start:start + 5000])
        studies: dict[str, dict] = {}
        for r in rows:
            study = studies.setdefault(r["study_instance_uid"], {
                "study_instance_uid": r["study_instance_uid"], "accession_number": r["accession_number"],
                "first_received_at": r["received_at"], "last_received_at": r["received_at"], "final": False,
                "severity": None, "flag": None, "stratum": None, "max_probability": None})
            study["last_received_at"] = max(study["last_received_at"], r["received_at"])
            study["first_received_at"] = min(study["first_received_at"], r["received_at"])
            if r["severity"] is not None and (r["severity"], r["probability"]) > (study["severity"] or -1,
                                                                                 study["max_probability"] or -1):
                study.update(severity=r["severity"], flag=r["flag"], stratum=r["stratum"],
                             max_probability=r["probability"])
        conn.execute(insert(db.studies), list(studies.values()))
    engine.dispose()
    return rows


def run_admin(url: str, *args: str) -> str:
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        assert admin.main(["--database-url", url, *args]) == 0
    return out.getvalue()


@pytest.fixture
def small_db(database_url):
    return database_url, populate(database_url, 200)


def test_list_filters_match_the_data(small_db):
    url, rows = small_db
    urgent = json.loads(run_admin(url, "list", "--flag", "URGENT", "--format", "json"))
    assert {r["sop_instance_uid"] for r in urgent} == {r["sop_instance_uid"] for r in rows if r["flag"] == "URGENT"}
    failed = json.loads(run_admin(url, "list", "--status", "failed", "--format", "json"))
    assert len(failed) == sum(r["status"] == "failed" for r in rows) and all(f["reason"] for f in failed)
    by_acc = json.loads(run_admin(url, "list", "--accession", "A3", "--format", "json"))
    assert sorted(r["sop_instance_uid"] for r in by_acc) == ["1.2.12", "1.2.13", "1.2.14", "1.2.15"]
    cutoff = sorted(r["received_at"] for r in rows)[100]
    recent = json.loads(run_admin(url, "list", "--since", cutoff.isoformat(), "--format", "json"))
    assert len(recent) == 100
    studies = json.loads(run_admin(url, "list", "--studies", "--flag", "URGENT", "--format", "json"))
    assert studies and all(s["flag"] == "URGENT" for s in studies)


def test_show_study_and_csv_export(small_db, tmp_path):
    url, rows = small_db
    shown = json.loads(run_admin(url, "show", "1.3.7", "--format", "json"))
    assert len(shown["instances"]) == 4
    severities = [r["severity"] for r in rows if r["study_instance_uid"] == "1.3.7" and r["status"] == "done"]
    if severities:
        assert shown["study"]["flag"] == STRATA[max(severities)][2]
    out = tmp_path / "export.csv"
    run_admin(url, "export", "--format", "csv", "--out", str(out), "--stratum", "indeterminate")
    exported = list(csv.DictReader(out.open()))
    assert len(exported) == sum(r["stratum"] == "indeterminate" for r in rows)
    assert "patient" not in ",".join(exported[0]).lower()
    assert {"model_version", "model_sha256", "site_calibration_sha256"} <= set(exported[0])


def test_stats_counts_and_percentiles(small_db):
    url, rows = small_db
    stats = json.loads(run_admin(url, "stats", "--window-hours", "2", "--format", "json"))
    assert sum(stats["by_status"].values()) == len(rows)
    assert stats["by_stratum"] == {s: sum(r["stratum"] == s for r in rows) for s, _, _ in STRATA
                                   if any(r["stratum"] == s for r in rows)}
    assert 0.1 <= stats["latency_s"]["p50"] <= stats["latency_s"]["p95"] <= 5
    assert stats["throughput_per_s"] > 0
    assert stats["top_reasons"][0]["count"] >= 1


@pytest.mark.slow
def test_queries_stay_fast_on_100k_rows(sqlite_url):
    populate(sqlite_url, 100_000, seed=1)
    timings = {}
    for name, args in {
        "list_flag": ("list", "--flag", "URGENT", "--limit", "50"),
        "list_accession": ("list", "--accession", "A777"),
        "studies_urgent": ("list", "--studies", "--flag", "URGENT", "--limit", "50"),
        "show": ("show", "1.3.123"),
        "stats": ("stats", "--window-hours", "2", "--format", "json"),
    }.items():
        start = time.perf_counter()
        run_admin(sqlite_url, *args)
        timings[name] = time.perf_counter() - start
    assert max(timings.values()) < 5.0, timings
    assert timings["list_accession"] < 0.5 and timings["show"] < 0.5, timings


def test_console_script_runs(sqlite_url):
    populate(sqlite_url, 8)
    out = subprocess.run([sys.executable, "-m", "worker.admin", "--database-url", sqlite_url, "stats"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "by_status" in out.stdout
