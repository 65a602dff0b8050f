"""`pneumonia-worker` sub-commands as subprocesses: migrate, and check refusing a broken set-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.migrate import current_revision, head_revision


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env={**base, **env},
                          capture_output=True, text=True, timeout=120)


def test_migrate_creates_sqlite_file_and_parents(tmp_path):
    url = f"sqlite:///{tmp_path / 'deep' / 'dir' / 'triage.db'}"
    assert run_cli("migrate", TRIAGE_DATABASE_URL=url).returncode == 0
    assert current_revision(url) == head_revision()


def test_default_database_is_relative_to_cwd(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    done = subprocess.run([sys.executable, "-m", "worker.cli", "migrate"], env=base, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "var" / "triage.db").is_file()


def test_check_refuses_missing_model_and_tampered_card(tmp_path, sqlite_url):
    missing = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_MODEL_PATH=str(tmp_path / "nope.onnx"))
    assert missing.returncode == 2 and "model file not found" in missing.stderr
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"not the model")
    from models.card import card_path_for, default_model_path

    card_path_for(fake).write_text(card_path_for(default_model_path()).read_text())
    tampered = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_MODEL_PATH=str(fake))
    assert tampered.returncode == 2 and "sha256" in tampered.stderr


def test_check_refuses_a_model_whose_session_cannot_be_built(tmp_path, sqlite_url):
    """A card that matches its file is not enough: the file must also load in onnxruntime."""
    import json

    from models.card import ModelCard, card_path_for, default_model_path, sha256_of

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx graph")
    card = json.loads(card_path_for(default_model_path()).read_text()) | {"sha256": sha256_of(broken)}
    ModelCard.from_dict(card).save(card_path_for(broken))  # carded for this file, as a writer would
    result = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_MODEL_PATH=str(broken))
    assert result.returncode == 2 and "onnxruntime session for broken.onnx failed" in result.stderr


def test_check_reports_the_execution_provider_and_refuses_a_missing_gpu(sqlite_url):
    import onnxruntime as ort

    cpu = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_EXECUTION_PROVIDER="cpu")
    assert cpu.returncode == 0 and "ok on CPUExecutionProvider" in cpu.stderr
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return  # a CUDA build: whether the GPU starts is this host's business, not the test's
    cuda = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_EXECUTION_PROVIDER="cuda")
    assert cuda.returncode == 2
    assert "CUDAExecutionProvider required but not active" in cuda.stderr and "gpu extra" in cuda.stderr


def test_check_reports_unreachable_database():
    down = run_cli("check", TRIAGE_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:1/none")
    assert down.returncode == 3 and "database unreachable" in down.stderr


def test_run_refuses_to_start_without_a_model(tmp_path, sqlite_url):
    result = run_cli("run", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_MODEL_PATH=str(tmp_path / "nope.onnx"),
                     TRIAGE_BROKER_URL="redis://127.0.0.1:1/0")
    assert result.returncode == 2


def test_check_refuses_a_site_calibration_of_another_model(tmp_path, sqlite_url):
    import json

    from models.card import default_model_path
    from models.detector import load_card
    from models.site_calibration import fit_site_calibration

    labels = [1] * 20 + [0] * 20
    logits = [[0.0, 1.0 * y + 0.1 * (i % 20)] for i, y in enumerate(labels)]
    site = fit_site_calibration(labels, logits, load_card(default_model_path()), "ward-7", folds=4)
    good = tmp_path / "good.json"
    site.save(good)
    ok = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_SITE_CALIBRATION=str(good))
    assert ok.returncode == 0 and "site calibration 'ward-7'" in ok.stderr and "no site calibration" not in ok.stderr
    bare = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url)  # the card's strata: fitted on children of one centre
    assert bare.returncode == 0 and "WARNING worker.cli: no site calibration" in bare.stderr
    assert "children aged one to five" in bare.stderr and "no decision_sha256" not in bare.stderr
    other = json.loads(good.read_text()) | {"model_sha256": "0" * 64}
    (tmp_path / "other.json").write_text(json.dumps(other))
    refused = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_SITE_CALIBRATION=str(tmp_path / "other.json"))
    assert refused.returncode == 2 and "fitted for model sha256" in refused.stderr


def test_check_warns_of_a_card_without_its_decision_digest(tmp_path, sqlite_url):
    """Deleting `decision_sha256` made any edited card load "as before", with nothing said."""
    import json

    from models.card import card_path_for, default_model_path

    model = tmp_path / "model.onnx"
    model.symlink_to(default_model_path())
    card = json.loads(card_path_for(default_model_path()).read_text())
    del card["decision_sha256"]
    card_path_for(model).write_text(json.dumps(card))
    result = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_MODEL_PATH=str(model))
    assert result.returncode == 0 and "model card model.card.json has no decision_sha256" in result.stderr


def test_calibrate_scores_dicom_cases_as_the_worker_would(tmp_path, test_split):
    """DICOM cases go through the worker's selection: a lateral view is left out and counted, not scored."""
    import numpy as np

    from models.site_calibration import SiteCalibration
    from worker.samples import make_cxr_dataset, save

    images, labels = test_split
    chosen = np.concatenate([np.flatnonzero(labels == 1)[:12], np.flatnonzero(labels == 0)[:12]])
    rows = ["path,label"]
    for i in chosen:
        save(make_cxr_dataset(images[i], size=(256, 256)), tmp_path / f"{i}.dcm")
        rows.append(f"{i}.dcm,{int(labels[i])}")
    for i in chosen[:2]:
        save(make_cxr_dataset(images[i], size=(256, 256), view="LL"), tmp_path / f"{i}-lat.dcm")
        rows.append(f"{i}-lat.dcm,{int(labels[i])}")
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    done = run_cli("calibrate", "--cases", str(tmp_path / "cases.csv"), "--site", "ward-7",
                   "--out", str(tmp_path / "var" / "site.json"), "--folds", "3")  # var/ made as needed
    assert done.returncode == 0, done.stderr
    assert "excluded (the worker would skip or fail them): 2 x view position LL" in done.stdout
    assert "sensitivity" in done.stdout and "95% bootstrap CI" in done.stdout
    site = SiteCalibration.load(tmp_path / "var" / "site.json")
    assert site.cases["n"] == 24 and site.cases["excluded"] == {"view position LL is not frontal (PA/AP)": 2}


def test_calibrate_reads_dicom_cases_with_the_worker_s_presentation_lut_setting(tmp_path, test_split):
    """A site whose modality writes MONOCHROME2 with INVERSE sets TRIAGE_PRESENTATION_LUT_CONFLICT and the worker
    scores its images; `calibrate` refused every such case, telling it to set the variable it had set."""
    import numpy as np

    from worker.samples import make_cxr_dataset, save

    images, labels = test_split
    chosen = np.concatenate([np.flatnonzero(labels == 1)[:10], np.flatnonzero(labels == 0)[:10]])
    rows = ["path,label"]
    for i in chosen:
        ds = make_cxr_dataset(images[i], size=(256, 256), modality="DX")
        ds.PresentationLUTShape = "INVERSE"  # contradicts MONOCHROME2
        save(ds, tmp_path / f"{i}.dcm")
        rows.append(f"{i}.dcm,{int(labels[i])}")
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    args = ("calibrate", "--cases", str(tmp_path / "cases.csv"), "--site", "dx-room", "--folds", "3")
    refused = run_cli(*args, "--out", str(tmp_path / "refused.json"))
    assert refused.returncode == 2 and "20 case(s) unreadable" in refused.stderr
    done = run_cli(*args, "--out", str(tmp_path / "site.json"), TRIAGE_PRESENTATION_LUT_CONFLICT="follow_photometric")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site.json").is_file() and not (tmp_path / "refused.json").exists()


def test_calibrate_refuses_unreadable_cases_by_line(tmp_path, test_split):
    """Lines count in the CSV as written, even after the worker's selection left a case out."""
    import numpy as np

    from worker.samples import make_cxr_dataset, save, write_labelled_cases

    images, labels = test_split
    chosen = np.concatenate([np.flatnonzero(labels == 1)[:10], np.flatnonzero(labels == 0)[:10]])
    good = write_labelled_cases(tmp_path / "ok", images[chosen], labels[chosen]).read_text().splitlines()[1:]
    save(make_cxr_dataset(test_split[0][0], size=(64, 64), view="LL"), tmp_path / "lateral.dcm")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "cases.csv").write_text("path,label\nlateral.dcm,normal\nbroken.png,normal\nmissing.png,pneumonia\n"
                                        + "".join(f"ok/{row}\n" for row in good))  # enough studies to be scored
    done = run_cli("calibrate", "--cases", str(tmp_path / "cases.csv"), "--site", "x", "--out", str(tmp_path / "s.json"))
    assert done.returncode == 2 and not (tmp_path / "s.json").exists()
    assert "2 case(s) unreadable" in done.stderr and "line 3 (" in done.stderr and "line 4 (" in done.stderr
    assert "missing.png" not in done.stderr and "Traceback" not in done.stderr


def test_calibrate_io_errors_do_not_print_paths(tmp_path):
    """OSError texts carry the file name, and a site's case paths may be named after patients."""
    cases = tmp_path / "Doe_Jane" / "cases.csv"
    done = run_cli("calibrate", "--cases", str(cases), "--site", "x", "--out", str(tmp_path / "s.json"))
    assert done.returncode == 2 and "FileNotFoundError (No such file or directory)" in done.stderr
    assert "Doe_Jane" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("flags, reason", [
    (["--out", "{tmp}/cases.csv/s.json"], "--out folder cannot be made or is not writable"),
    (["--out", "{tmp}/s.json", "--rule-out-sensitivity", "98"], "must be a share in (0, 1]"),
    (["--out", "{tmp}"], "--out names a folder"),  # it failed with IsADirectoryError after scoring every case
    (["--out", "{tmp}/s.json", "--batch-size", "0"], "must be 1 or more"),
])
def test_calibrate_refuses_bad_arguments_before_scoring_any_case(tmp_path, flags, reason):
    (tmp_path / "cases.csv").write_text("path,label\n")
    done = run_cli("calibrate", "--cases", str(tmp_path / "cases.csv"), "--site", "x",
                   *[flag.format(tmp=tmp_path) for flag in flags])
    assert done.returncode == 2 and reason in done.stderr and "Traceback" not in done.stderr


def test_calibrate_refuses_cases_the_model_separates_unless_told(tmp_path, test_split, sqlite_url):
    """Clear-cut cases (every pneumonia above every normal) fit a rule-out cut just under the
    lowest pneumonia: on 10 + 10 such cases it sat at 0.999 and sent 78% of the test split's
    pneumonias to likely_normal (ROUTINE), written with exit 0 and deployed with `check` silent."""
    import numpy as np

    from models.detector import PneumoniaDetector
    from models.site_calibration import SiteCalibration
    from worker.samples import make_cxr_dataset, save

    images, labels = test_split
    chosen = np.concatenate([np.flatnonzero(labels == 1)[:40], np.flatnonzero(labels == 0)[:40]])
    p = np.array([row["probabilities"]["Pneumonia"] for row in PneumoniaDetector().predict_batch(list(images[chosen]))])
    positives, negatives = chosen[:40][np.argsort(-p[:40])[:10]], chosen[40:][np.argsort(p[40:])[:10]]
    rows = ["path,label"]
    for i in np.concatenate([positives, negatives]):
        save(make_cxr_dataset(images[i], size=(64, 64)), tmp_path / f"{i}.dcm")
        rows.append(f"{i}.dcm,{int(labels[i])}")
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    args = ["calibrate", "--cases", str(tmp_path / "cases.csv"), "--site", "clear-cut", "--out", str(tmp_path / "s.json")]
    refused = run_cli(*args)
    assert refused.returncode == 2 and "separated perfectly" in refused.stderr and "--allow-separated" in refused.stderr
    assert not (tmp_path / "s.json").exists()
    written = run_cli(*args, "--allow-separated")
    assert written.returncode == 0, written.stderr
    assert any("separated perfectly" in w for w in SiteCalibration.load(tmp_path / "s.json").warnings)
    checked = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_SITE_CALIBRATION=str(tmp_path / "s.json"))
    assert checked.returncode == 0 and "site calibration 'clear-cut': the local cases are separated" in checked.stderr


def test_check_refuses_an_edited_card_that_would_score_every_study_wrong(tmp_path, sqlite_url):
    """`check` said ok for a card whose temperature was negated: every pneumonia became likely_normal."""
    import json

    from models.card import card_path_for, default_model_path

    model = tmp_path / "m.onnx"
    model.symlink_to(default_model_path())
    card = json.loads(card_path_for(default_model_path()).read_text())
    card_path_for(model).write_text(json.dumps(card | {"temperature": -card["temperature"]}))
    done = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_MODEL_PATH=str(model))
    assert done.returncode == 2 and "temperature must be a positive finite number" in done.stderr


def test_check_refuses_an_old_schema_that_run_would_not_migrate(sqlite_url):
    """With TRIAGE_MIGRATE_ON_START=false (a DBA migrates), a worker on a schema behind its code failed
    every task (PostgreSQL) or retried each for about 25 minutes (SQLite) after `check` said ok."""
    from worker.migrate import head_revision, upgrade

    upgrade(sqlite_url, "0002")
    behind = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_MIGRATE_ON_START="false")
    assert behind.returncode == 3
    assert f"schema is at 0002, this worker needs {head_revision()}" in behind.stderr
    will_migrate = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url)
    assert will_migrate.returncode == 0 and "`run` migrates it" in will_migrate.stderr
    upgrade(sqlite_url)
    assert run_cli("check", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_MIGRATE_ON_START="false").returncode == 0


def test_the_log_level_may_be_written_in_any_case(sqlite_url):
    """logging refused `debug`: every command, `run` included, died with a traceback (a restart loop)."""
    done = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_LOG_LEVEL="debug")
    assert done.returncode == 0, done.stderr[-2000:]
    refused = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_LOG_LEVEL="loud")
    assert refused.returncode == 2 and "TRIAGE_LOG_LEVEL" in refused.stderr and "Traceback" not in refused.stderr


def test_invalid_settings_are_one_line_each_naming_the_variable_not_its_value(sqlite_url):
    """A traceback per command (a compose restart loop with pydantic's dump), and pydantic quotes
    each input: a database URL would carry its password into the log."""
    secret = "postgresql+psycopg://triage:S3cret-pw@db/x"
    for args in (("check",), ("migrate",), ("run",)):
        out = run_cli(*args, TRIAGE_DATABASE_URL=secret, TRIAGE_MAX_ATTEMPTS="0", TRIAGE_FLAG_MAP="{bad")
        assert out.returncode == 2, out.stderr[-2000:]
        assert "TRIAGE_FLAG_MAP: cannot be parsed" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("check", TRIAGE_DATABASE_URL=secret, TRIAGE_MAX_ATTEMPTS="0", TRIAGE_SPOOL_RETENTION="S3cret-pw")
    assert out.returncode == 2
    assert out.stderr.splitlines()[1:] == [
        "  TRIAGE_SPOOL_RETENTION: Input should be 'archive' or 'delete'",
        "  TRIAGE_MAX_ATTEMPTS: Input should be greater than or equal to 1",
    ]
    assert "S3cret-pw" not in out.stderr


def test_a_malformed_database_url_is_refused_by_check_without_quoting_it():
    out = run_cli("check", TRIAGE_DATABASE_URL="postgres//triage:S3cret-pw@db/x")
    assert out.returncode == 3 and "TRIAGE_DATABASE_URL cannot be used" in out.stderr
    assert "S3cret-pw" not in out.stderr and "Traceback" not in out.stderr


def test_run_and_migrate_with_the_database_down_exit_3_without_a_traceback():
    """`run` migrated before checking, so a database still starting gave a psycopg traceback."""
    from tests.dicom_gateway.helpers import free_port

    down = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"
    for command in ("run", "migrate"):
        out = run_cli(command, TRIAGE_DATABASE_URL=down)
        assert out.returncode == 3, (command, out.stderr[-2000:])
        assert "Traceback" not in out.stderr
    assert "database unreachable" in run_cli("run", TRIAGE_DATABASE_URL=down).stderr


def test_a_schema_newer_than_the_worker_is_refused_not_migrated(sqlite_url):
    """After a rollback to an older worker: `migrate` cannot help (alembic does not know the
    revision), so check and run say what to do instead of advising it and crashing."""
    from sqlalchemy import text

    from worker.db import make_engine
    from worker.migrate import head_revision, upgrade

    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    for command in ("check", "run"):
        out = run_cli(command, TRIAGE_DATABASE_URL=sqlite_url)
        assert out.returncode == 3, (command, out.stderr[-2000:])
        assert f"schema is at 0099, newer than this worker's {head_revision()}" in out.stderr
        assert "Traceback" not in out.stderr


@pytest.mark.postgres
def test_check_refuses_a_read_only_database_and_its_refusal_is_retried(pg_url):
    """A URL left on a hot standby after a failover: `check` said "database ok" and every claim then
    failed unretried (InternalError, ReadOnlySqlTransaction), left to the gateway's sweep."""
    import psycopg
    from sqlalchemy import text

    from tests.worker.support import PG_ADMIN_DSN
    from worker.celery_app import is_transient
    from worker.db import make_engine
    from worker.migrate import upgrade

    upgrade(pg_url)
    name = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    result = run_cli("check", TRIAGE_DATABASE_URL=pg_url)
    assert result.returncode == 3 and "database is read-only (PostgreSQL transaction_read_only is on" in result.stderr
    engine = make_engine(pg_url)
    try:
        with pytest.raises(Exception) as refused, engine.begin() as conn:
            conn.execute(text("UPDATE studies SET final = final"))
    finally:
        engine.dispose()
    assert is_transient(refused.value)


def test_check_refuses_a_card_whose_fields_the_results_table_cannot_hold(tmp_path, sqlite_url):
    """PostgreSQL refuses a version longer than `model_version` (50): every image failed "result could
    not be stored" while `check` said ok; SQLite stored it. Refused up front, as a model problem."""
    import json

    from models.card import card_path_for, default_model_path
    model = tmp_path / "model.onnx"
    model.symlink_to(default_model_path())
    card = json.loads(card_path_for(default_model_path()).read_text())
    card_path_for(model).write_text(json.dumps(card | {"version": "1.2.0+g0123abcd.site-retrain-2026-11-28-northwing-hospital"}))
    result = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_MODEL_PATH=str(model))
    assert result.returncode == 2
    assert "the model card's version is 58 characters; the results table holds 50 (`model_version`)" in result.stderr


def test_workers_migrating_one_sqlite_file_at_once_all_succeed(tmp_path):
    """Workers started together each run `upgrade head`: on schema 0002 each rebuilt `instances` (0003),
    and one or two of three failed ("table _alembic_tmp_instances already exists"), leaving that table."""
    from sqlalchemy import inspect, text

    from worker.db import make_engine
    from worker.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'triage.db'}"
    upgrade(url, "0002")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO instances (sop_instance_uid, study_instance_uid, status, attempts) "
                          "VALUES (:s, :t, 'done', 1)"), [{"s": f"1.2.{i}", "t": f"1.3.{i // 4}"} for i in range(20000)])
    engine.dispose()
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    procs = [subprocess.Popen([sys.executable, "-m", "worker.cli", "migrate"], env={**base, "TRIAGE_DATABASE_URL": url},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(proc.wait(timeout=300), proc.stderr.read()) for proc in procs]
    assert all(code == 0 for code, _ in results), results
    assert current_revision(url) == head_revision()
    engine = make_engine(url)
    try:
        assert "_alembic_tmp_instances" not in inspect(engine).get_table_names()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM instances")).scalar() == 20000
    finally:
        engine.dispose()


def repeat_exposure_cases(folder: Path, test_split: tuple, per_class: int) -> Path:
    """`per_class` DICOM studies of each class, each with two frontal images (a repeat exposure: same picture
    with slight noise, a new SOP Instance UID, the same StudyInstanceUID), listed in folder/cases.csv. The
    lowest-scoring pneumonia of the split is among them, so the model does not separate the cases."""
    import numpy as np

    from models.detector import PneumoniaDetector
    from worker.samples import write_sample_study

    images, labels = test_split
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    detector = PneumoniaDetector()
    p = detector.pneumonia_probability(detector.preprocess(list(images[positives[:60]])))
    chosen = np.concatenate([[positives[int(np.argmin(p))]], positives[:per_class - 1], negatives[:per_class]])
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i in chosen:
        repeat = np.clip(images[i].astype(int) + rng.integers(-2, 3, images[i].shape), 0, 255).astype(np.uint8)
        for path in write_sample_study(folder, [images[i], repeat], size=(256, 256)):
            rows.append(f"{path.name},{int(labels[i])}")
    (folder / "cases.csv").write_text("\n".join(rows) + "\n")
    return folder / "cases.csv"


def test_calibrate_counts_a_study_s_images_once(tmp_path, test_split):
    """Five studies per class as ten images each passed the 10-per-class minimum; with enough studies
    the summary says how many studies and how many images, and the file keeps both counts."""
    from models.site_calibration import SiteCalibration

    def calibrate(cases: Path, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
        return run_cli("calibrate", "--cases", str(cases), "--site", "x", "--folds", "3", "--out", str(out), *flags)

    refused = calibrate(repeat_exposure_cases(tmp_path / "few", test_split, per_class=5), tmp_path / "s.json")
    assert refused.returncode == 2 and "the smaller class has 5" in refused.stderr
    assert not (tmp_path / "s.json").exists()
    (tmp_path / "s.json").write_text("a calibration deployed earlier")
    done = calibrate(repeat_exposure_cases(tmp_path / "more", test_split, per_class=10), tmp_path / "s.json",
                     "--overwrite")
    assert done.returncode == 0, done.stderr
    assert "20 studies (10 pneumonia, 10 normal) in 40 images" in done.stdout
    site = SiteCalibration.load(tmp_path / "s.json")
    assert site.cases["n"] == 40 and site.cases["studies"] == {"n": 20, "pneumonia": 10, "normal": 10}


def test_calibrate_refuses_a_copy_of_a_case_naming_both_lines(tmp_path, test_split):
    """A copy under another name counted as another study: six images per class, each listed under two names,
    passed the 10-per-class minimum as 24 studies. The copy's line and the original's are named."""
    import shutil

    import numpy as np

    from worker.samples import write_labelled_cases

    images, labels = test_split
    chosen = np.concatenate([np.flatnonzero(labels == 1)[:12], np.flatnonzero(labels == 0)[:12]])
    write_labelled_cases(tmp_path, images[chosen], labels[chosen])
    cases = (tmp_path / "cases.csv").read_text().splitlines()
    shutil.copy(tmp_path / "case_00003.png", tmp_path / "copy.png")
    (tmp_path / "cases.csv").write_text("\n".join([*cases, f"copy.png,{int(labels[chosen[3]])}"]) + "\n")
    done = run_cli("calibrate", "--cases", str(tmp_path / "cases.csv"), "--site", "x",
                   "--out", str(tmp_path / "s.json"))
    assert done.returncode == 2 and not (tmp_path / "s.json").exists()
    assert "cases.csv line 26: the same image content (a copy of the file) as line 5" in done.stderr


@pytest.mark.parametrize("pneumonia, normal, folds, reason", [
    (12, 5, 5, "the smaller class has 5"),
    (12, 12, 13, "folds must be between 2 and 12 (the smaller class), got 13"),
])
def test_calibrate_refuses_too_few_cases_or_folds_before_scoring_any(tmp_path, pneumonia, normal, folds, reason):
    """The case minimum and --folds were checked only after every case was scored (minutes for hundreds)."""
    rows = ["path,label"] + [f"p{i}.png,1" for i in range(pneumonia)] + [f"n{i}.png,0" for i in range(normal)]
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")  # files that do not exist: scoring would say so
    done = run_cli("calibrate", "--cases", str(tmp_path / "cases.csv"), "--site", "x",
                   "--out", str(tmp_path / "s.json"), "--folds", str(folds))
    assert done.returncode == 2 and reason in done.stderr and "unreadable" not in done.stderr


def test_calibrate_refuses_an_existing_out_unless_told(tmp_path):
    """A re-fit replaced the deployed file silently (README's example writes straight to it)."""
    (tmp_path / "cases.csv").write_text("path,label\n")
    (tmp_path / "site.json").write_text("the deployed calibration")
    args = ("calibrate", "--cases", str(tmp_path / "cases.csv"), "--site", "x", "--out", str(tmp_path / "site.json"))
    refused = run_cli(*args)
    assert refused.returncode == 2 and "--out already exists" in refused.stderr and "--overwrite" in refused.stderr
    told = run_cli(*args, "--overwrite")  # goes on, to refuse the empty CSV
    assert told.returncode == 2 and "the smaller class has 0" in told.stderr
    assert (tmp_path / "site.json").read_text() == "the deployed calibration"


def test_calibrate_summary_and_check_show_a_held_out_target_missed(tmp_path, sqlite_url):
    """The held-out strata figures were in the file only: a rule-out band missing its target went unsaid."""
    import numpy as np

    from models.card import default_model_path
    from models.detector import load_card
    from models.site_calibration import fit_site_calibration
    from worker.cli import summary

    rng = np.random.default_rng(6)
    labels = (rng.random(200) < 0.6).astype(np.int64)
    logits = np.stack([np.zeros(200), np.where(labels == 1, 3.0, 0.0) + rng.normal(0, 1.0, 200)], axis=1)
    site = fit_site_calibration(labels, logits, load_card(default_model_path()), "ward-9", folds=5)
    held_out = site.cross_validated["at_targets"]["rule_out_sensitivity"]
    low, high = site.cross_validated["at_targets_ci95"]["rule_out_sensitivity"]
    text = summary(site)
    row = next(line for line in text.splitlines() if line.startswith("rule-out sensitivity"))
    assert f"{100 * held_out:.1f} ({100 * low:.1f}-{100 * high:.1f})" in row and row.endswith("target 98.0: MISSED")
    assert any(line.startswith("high-suspicion specificity") and "target 95.0:" in line for line in text.splitlines())
    assert "warning: held out (5-fold)" in text and "under the rule-out sensitivity target of 98.0%" in text
    site.save(tmp_path / "site.json")
    checked = run_cli("check", TRIAGE_DATABASE_URL=sqlite_url, TRIAGE_SITE_CALIBRATION=str(tmp_path / "site.json"))
    assert checked.returncode == 0, checked.stderr
    assert "site calibration 'ward-9': held out (5-fold)" in checked.stderr


def test_calibrate_leaves_out_a_case_whose_header_the_worker_cannot_read_without_quoting_it(tmp_path, test_split):
    """A ViewPosition written with VR UL (14 bytes): pydicom's BytesLengthException, which quotes the element's
    bytes (here a name), escaped as a traceback. The worker records such an image as failed; calibrate leaves
    it out and counts it, as it does for images the worker would skip."""
    import numpy as np

    from worker.samples import make_cxr_dataset, save, write_labelled_cases

    images, labels = test_split
    chosen = np.concatenate([np.flatnonzero(labels == 1)[:10], np.flatnonzero(labels == 0)[:10]])
    good = write_labelled_cases(tmp_path / "ok", images[chosen], labels[chosen]).read_text().splitlines()[1:]
    ds = make_cxr_dataset(images[chosen[0]], size=(64, 64))
    ds.ViewPosition = "PHI-4711 DoeJ"  # 13 characters, padded to 14 bytes
    save(ds, tmp_path / "bad.dcm")
    raw = (tmp_path / "bad.dcm").read_bytes()
    element = b"\x18\x00\x01\x51CS\x0e\x00"
    assert raw.count(element) == 1
    (tmp_path / "bad.dcm").write_bytes(raw.replace(element, b"\x18\x00\x01\x51UL\x0e\x00"))
    (tmp_path / "cases.csv").write_text("path,label\nbad.dcm,normal\n" + "".join(f"ok/{row}\n" for row in good))
    done = run_cli("calibrate", "--cases", str(tmp_path / "cases.csv"), "--site", "x", "--out", str(tmp_path / "s.json"),
                   "--folds", "3", "--allow-separated")
    assert "PHI-4711" not in done.stdout + done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 0, done.stderr[-2000:]
    assert "excluded (the worker would skip or fail them): 1 x header could not be read (BytesLengthException)" in done.stdout
