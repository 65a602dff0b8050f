"""`pneumonia-admin sr`: a study's result as a DICOM SR, checked by DCMTK and stored by a real DCMTK peer."""

from __future__ import annotations

import contextlib
import hashlib
import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import insert

from tests.dicom_gateway.helpers import dcmtk_tool, free_port
from tests.worker.support import wait_for
from worker import admin, db
from worker.migrate import upgrade
from worker.report import SCHEME, ScoredImage, build_report, flag_code
from worker.samples import make_cxr_dataset
from worker.spool import archive_path

DSRDUMP = dcmtk_tool("dsrdump")
STORESCP = dcmtk_tool("storescp")
needs_dcmtk = pytest.mark.skipif(not (DSRDUMP and STORESCP), reason="DCMTK (dsrdump, storescp) is not installed")


def admin_sr(url: str, *args: str) -> tuple[int, str, str]:
    """`pneumonia-admin --database-url URL sr ARGS`: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = admin.main(["--database-url", url, "sr", *args])
    return code, out.getvalue(), err.getvalue()


def admin_sr_process(url: str, *args: str) -> tuple[int, str, str]:
    """The same through the console script's process, whose stderr gets what pytest would otherwise capture
    (Python's warnings, log records)."""
    done = subprocess.run([sys.executable, "-m", "worker.admin", "--database-url", url, "sr", *args],
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


def dsrdump(path: Path) -> str:
    """DCMTK's reading of an SR file; it exits non-zero on a document it cannot parse as SR."""
    done = subprocess.run([DSRDUMP, "+Pu", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@contextlib.contextmanager
def dcmtk_pacs(folder: Path, ae_title: str = "PACS"):
    """A DCMTK `storescp` storing what it receives in `folder`; yields its port."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    log = (folder.parent / f"storescp-{port}.log").open("w")
    proc = subprocess.Popen([STORESCP, "-od", str(folder), "-aet", ae_title, str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: subprocess.run(["echoscu", "-aec", ae_title, "127.0.0.1", str(port)],
                                        capture_output=True).returncode == 0, 15, 0.2, "storescp listening")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def stored_study(url: str, spool: Path, images: np.ndarray, outcomes: list[tuple[str, str | None]],
                 final: bool = True, edit=None) -> tuple[str, list[pydicom.Dataset]]:
    """A study as the worker leaves it: archived copies (PneumoniaMNIST images wrapped as DICOM) and their rows.
    `outcomes` holds each image's (status, stratum) in arrival order; `edit(ds, n)` changes a header first."""
    upgrade(url)
    study_uid = generate_uid()
    severity = {"likely_normal": 0, "indeterminate": 1, "high_suspicion": 2}
    flags = {"likely_normal": "ROUTINE", "indeterminate": "PRIORITY", "high_suspicion": "URGENT"}
    datasets = []
    engine = db.make_engine(url)
    with engine.begin() as conn:
        db.touch_study(conn, study_uid, "ACC-SR", db.utcnow())
        for n, ((status, stratum), image) in enumerate(zip(outcomes, images)):
            ds = make_cxr_dataset(image, study_uid=study_uid, accession="ACC-SR", size=(256, 256), instance_number=n + 1)
            ds.PatientName, ds.PatientID = "SECRETNAME^SR", "SECRET-ID-42"
            if edit is not None:
                edit(ds, n)
            path = archive_path(spool, study_uid, str(ds.SOPInstanceUID))
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            datasets.append(ds)
            result = {}
            if status == "done":
                result = {"probability": 0.2 + 0.3 * n, "stratum": stratum, "severity": severity[stratum],
                          "flag": flags[stratum], "model_name": "pneumonia_resnet50", "model_version": "1.1.0",
                          "model_sha256": "ab" * 32}
            conn.execute(insert(db.instances).values(
                sop_instance_uid=str(ds.SOPInstanceUID), study_instance_uid=study_uid, status=status, attempts=1,
                received_at=db.utcnow(), finished_at=db.utcnow(), reason=None if status == "done" else "truncated",
                **result))
            if status == "done":
                db.touch_study(conn, study_uid, "ACC-SR", db.utcnow(), result)
        if final:
            db.finalize_study(conn, study_uid, db.utcnow())
    engine.dispose()
    return study_uid, datasets


@pytest.fixture
def spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "spool"
    (folder / "pending").mkdir(parents=True)
    (folder / "archive").mkdir()
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(folder))
    return folder


@needs_dcmtk
def test_a_final_study_s_report_is_read_by_dcmtk_and_stored_by_a_dcmtk_pacs(database_url, spool, test_split, tmp_path):
    """A radiologist reads the study in the PACS viewer, which never saw the flag: the report carries each scored
    image's probability, stratum and flag, the study's worklist flag, and the study's patient module (copied from
    its images, so the PACS files it with them) without printing it. Sending the same result again sends the same
    object (one SOP Instance UID), so a PACS keeps one report per result."""
    images, labels = test_split
    picks = np.concatenate([images[labels == 1][:1], images[labels == 0][:1]])
    study_uid, sources = stored_study(database_url, spool, picks, [("done", "high_suspicion"), ("done", "likely_normal")])
    out = tmp_path / "report.dcm"
    with dcmtk_pacs(tmp_path / "pacs") as port:
        code, said, err = admin_sr(database_url, study_uid, "--out", str(out), "--send", f"127.0.0.1:{port}",
                                   "--called-ae", "PACS")
        assert code == 0, err
        again = admin_sr(database_url, study_uid, "--send", f"127.0.0.1:{port}", "--called-ae", "PACS")
        assert again[0] == 0, again[2]
    received = sorted((tmp_path / "pacs").iterdir())
    assert len(received) == 1, received  # the second send stored the same object over the first
    report = pydicom.dcmread(received[0])
    assert report.SOPInstanceUID == pydicom.dcmread(out).SOPInstanceUID
    assert report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert (report.StudyInstanceUID, report.PatientID, str(report.PatientName)) == (study_uid, "SECRET-ID-42",
                                                                                     "SECRETNAME^SR")
    assert (report.CompletionFlag, report.VerificationFlag, report.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED",
                                                                                        "PRELIMINARY")
    assert "not a diagnosis" in report.SeriesDescription
    assert "SECRET" not in said + err + again[1] + again[2]
    assert str(report.SOPInstanceUID) in said and "worklist flag URGENT" in said
    text = dsrdump(received[0])
    assert "Imaging Measurement Report" in text
    for source, (probability, stratum, flag) in zip(sources, [("0.2", "high_suspicion", "URGENT"),
                                                              ("0.5", "likely_normal", "ROUTINE")]):
        assert f'"Calibrated probability of pneumonia")="{probability}"' in text
        assert f"({stratum},{SCHEME}," in text and f'"{flag}")' in text
        assert str(source.SOPInstanceUID) in text  # the image each result was read from
    assert f'"Study worklist flag")=({flag_code("URGENT", 2).value},{SCHEME},"URGENT")' in text
    assert '"Triage complete")=(373066001,SCT,"Yes")' in text


@needs_dcmtk
def test_a_study_with_a_failed_image_is_reported_partial_and_not_triaged(database_url, spool, test_split, tmp_path):
    """A study whose second image failed reads ROUTINE from its first; its report must not: PARTIAL, the study
    group NOT_TRIAGED and "Triage complete: No", beside the one image that was scored."""
    images, _ = test_split
    study_uid, _ = stored_study(database_url, spool, images[:2], [("done", "likely_normal"), ("failed", None)])
    out = tmp_path / "report.dcm"
    code, said, err = admin_sr(database_url, study_uid, "--out", str(out))
    assert code == 0, err
    assert "worklist flag NOT_TRIAGED" in said
    report = pydicom.dcmread(out)
    assert report.CompletionFlag == "PARTIAL"
    text = dsrdump(out)
    assert f'"Study worklist flag")=(NOTTRIAGED,{SCHEME},"NOT_TRIAGED")' in text
    assert '"Triage complete")=(373067005,SCT,"No")' in text
    assert text.count('"Calibrated probability of pneumonia"') == 1


def test_no_report_for_a_study_not_final_unscored_unknown_or_without_its_archive(database_url, spool, test_split,
                                                                                tmp_path):
    """A report in the PACS stays there: none while images may still arrive, none with nothing scored, and none
    when a scored image's archived copy (its patient module) is gone. Each says why in one line, exit 1."""
    images, _ = test_split
    out = tmp_path / "report.dcm"
    open_study, _ = stored_study(database_url, spool, images[:1], [("done", "likely_normal")], final=False)
    code, _, err = admin_sr(database_url, open_study, "--out", str(out))
    assert (code, err) == (1, f"study {open_study} is not final (images may still arrive): no report until it is\n")
    unscored, _ = stored_study(database_url, spool, images[:1], [("failed", None)])
    code, _, err = admin_sr(database_url, unscored, "--out", str(out))
    assert (code, err) == (1, f"no report for study {unscored}: no image of the study was scored\n")
    pruned, sources = stored_study(database_url, spool, images[:2], [("done", "likely_normal")] * 2)
    archive_path(spool, pruned, str(sources[1].SOPInstanceUID)).unlink()
    code, _, err = admin_sr(database_url, pruned, "--out", str(out))
    assert (code, err) == (1, f"no report for study {pruned}: no archived copy of scored image "
                              f"{sources[1].SOPInstanceUID}\n")
    unreadable, sources = stored_study(database_url, spool, images[:1], [("done", "likely_normal")])
    archive_path(spool, unreadable, str(sources[0].SOPInstanceUID)).write_bytes(b"not DICOM" * 50)
    code, _, err = admin_sr(database_url, unreadable, "--out", str(out))
    assert code == 1 and err.startswith(f"no report for study {unreadable}: the archived copy of scored image "
                                        f"{sources[0].SOPInstanceUID} cannot be read ("), err
    code, _, err = admin_sr(database_url, "1.2.3.4", "--out", str(out))
    assert (code, err) == (1, "study 1.2.3.4 not found\n")
    assert not out.exists()
    code, _, err = admin_sr(database_url, pruned)
    assert code == 2 and "--out FILE and/or --send HOST:PORT" in err


def test_a_pacs_that_cannot_be_reached_is_one_line_exit_3(sqlite_url, spool, test_split):
    images, _ = test_split
    study_uid, _ = stored_study(sqlite_url, spool, images[:1], [("done", "likely_normal")])
    started = time.monotonic()
    code, said, err = admin_sr(sqlite_url, study_uid, "--send", f"127.0.0.1:{free_port()}", "--called-ae", "PACS")
    assert time.monotonic() - started < 30
    assert (code, said) == (3, "")
    assert len(err.splitlines()) == 1 and err.startswith("pneumonia-admin sr: not sent: PACS at 127.0.0.1:")
    assert err.endswith(" could not be reached or did not answer\n"), err


def test_a_long_site_flag_fits_the_report_and_the_uid_follows_what_it_says(test_split):
    """A TRIAGE_FLAG_MAP flag may have 32 characters, a Code Value 16: the code says the rank, the meaning the
    flag. The SOP Instance UID changes when the result does (a reprocessed image), not when it is built again."""
    images, _ = test_split
    study_uid = generate_uid()
    source = make_cxr_dataset(images[0], study_uid=study_uid, size=(64, 64))
    flag = "URGENT-READ-FIRST-CHEST-XR-AI-01"
    image = ScoredImage(str(source.SOPInstanceUID), 0.91, "high_suspicion", 2, flag, "m", "1", "cd" * 32, None)
    study = {"study_instance_uid": study_uid, "worklist_flag": flag, "stratum": "high_suspicion",
             "triage_complete": True, "reopened_count": 0, "finalized_at": db.utcnow()}
    first, second = build_report(study, [image], [source]), build_report(study, [image], [source])
    assert first.SOPInstanceUID == second.SOPInstanceUID and first.SeriesInstanceUID == second.SeriesInstanceUID
    changed = build_report(study, [ScoredImage(**{**vars(image), "probability": 0.92})], [source])
    assert changed.SOPInstanceUID != first.SOPInstanceUID and changed.SeriesInstanceUID == first.SeriesInstanceUID
    codes = [item.ConceptCodeSequence[0] for group in first.ContentSequence[-1].ContentSequence
             for item in group.ContentSequence if "ConceptCodeSequence" in item]
    flag_codes = [(c.CodeValue, c.CodeMeaning) for c in codes if c.CodingSchemeDesignator == SCHEME
                  and c.CodeValue.startswith("S2-")]
    assert len(flag_codes) == 2 and set(flag_codes) == {flag_codes[0]} and flag_codes[0][1] == flag  # image, study
    assert len(flag_codes[0][0]) <= 16 and flag_code("URGENT", 2).value != flag_codes[0][0]


def measured_probabilities(report: pydicom.Dataset) -> dict[str, float]:
    """Each image group's probability by the SOP Instance UID of the image it was read from."""
    found = {}
    measurements = report.ContentSequence[-1].ContentSequence  # Imaging Measurements: the measurement groups
    for group in measurements:
        items = group.ContentSequence
        values = [float(i.MeasuredValueSequence[0].NumericValue) for i in items if i.ValueType == "NUM"]
        images = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items if i.ValueType == "IMAGE"]
        if values:
            found[str(images[0])] = values[0]
    return found


@pytest.mark.redis
@needs_dcmtk
def test_a_study_scored_by_a_real_worker_is_reported_as_stored(make_triage_env, sqlite_url, test_split, tmp_path,
                                                               monkeypatch):
    """Through the product: a real worker scores two frontals and skips a lateral, the study is finalised, and the
    report states the probabilities, model and flags the worker stored, each beside the image it came from."""
    images, labels = test_split
    env = make_triage_env(sqlite_url)
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(env.spool))
    study_uid = generate_uid()
    kw = {"study_uid": study_uid, "accession": "ACC-SR-E2E", "size": (512, 512)}
    staged = [env.stage(make_cxr_dataset(images[labels == 1][0], **kw)),
              env.stage(make_cxr_dataset(images[labels == 0][0], view="AP", **kw)),
              env.stage(make_cxr_dataset(images[labels == 0][1], view="LL", **kw))]
    env.start_worker()
    for relpath, sop in staged:
        env.send(relpath, sop)
    rows = env.wait_terminal([sop for _, sop in staged], timeout=120)
    env.finalize(study_uid)
    wait_for(lambda: (env.study(study_uid) or {}).get("final"), 60, 0.3, "the study final")
    out = tmp_path / "report.dcm"
    code, said, err = admin_sr(sqlite_url, study_uid, "--out", str(out))
    assert code == 0, err
    report = pydicom.dcmread(out)
    scored = {sop: rows[sop] for _, sop in staged if rows[sop]["status"] == "done"}
    assert len(scored) == 2 and rows[staged[2][1]]["status"] == "skipped"
    assert measured_probabilities(report) == pytest.approx({sop: row["probability"] for sop, row in scored.items()})
    assert report.CompletionFlag == "COMPLETE" and report.ManufacturerModelName == next(iter(scored.values()))["model_name"]
    text = dsrdump(out)
    for row in scored.values():
        assert f'({row["stratum"]},{SCHEME},' in text and f'"{row["flag"]}")' in text
        assert f'model_sha256={row["model_sha256"][:8]}' in text
    study = env.study(study_uid)
    assert f"worklist flag {study['flag']}" in said


def test_headers_as_modalities_write_them_give_a_report_that_quotes_no_patient_data(sqlite_url, spool, test_split,
                                                                                   tmp_path):
    """A name without a caret made highdicom warn, quoting it on stderr (review); a study without Patient's Birth
    Date or Study ID (Type 2, often absent), a Patient's Sex of U or an impossible date raised a traceback. The
    report is made, those values left empty, and nothing but UIDs is printed."""
    def modality_header(ds, n):
        ds.PatientName = "SECRETMUELLER"
        del ds.PatientBirthDate
        if "StudyID" in ds:
            del ds.StudyID
        ds.PatientSex = "U"
        ds.StudyDate = "19800230"

    images, _ = test_split
    study_uid, _ = stored_study(sqlite_url, spool, images[:1], [("done", "likely_normal")], edit=modality_header)
    out = tmp_path / "report.dcm"
    code, said, err = admin_sr_process(sqlite_url, study_uid, "--out", str(out))
    assert (code, err) == (0, "")
    assert "SECRET" not in said
    report = pydicom.dcmread(out)
    assert (str(report.PatientName), report.PatientBirthDate, report.PatientSex, report.StudyDate,
            report.StudyID) == ("SECRETMUELLER", "", "", "", "")


def test_the_same_result_is_the_same_object_and_any_change_a_new_one(sqlite_url, spool, test_split, tmp_path):
    """A PACS keeps one object per SOP Instance UID: the same UID with other bytes (a content time of now, another
    instance number after a reopening, another qualification) kept the stale one, or was refused (review). The
    UID is now a digest of the encoding, whose times are the study's finalisation."""
    images, _ = test_split
    study_uid, sources = stored_study(sqlite_url, spool, images[:1], [("done", "likely_normal")])
    first, second, research = tmp_path / "1.dcm", tmp_path / "2.dcm", tmp_path / "3.dcm"
    assert admin_sr(sqlite_url, study_uid, "--out", str(first))[0] == 0
    time.sleep(1.1)
    assert admin_sr(sqlite_url, study_uid, "--out", str(second))[0] == 0
    assert first.read_bytes() == second.read_bytes()
    assert admin_sr(sqlite_url, study_uid, "--out", str(research), "--content-qualification", "PRODUCT")[0] == 0
    assert pydicom.dcmread(research).SOPInstanceUID != pydicom.dcmread(first).SOPInstanceUID
    engine = db.make_engine(sqlite_url)
    with engine.begin() as conn:  # a late image reopened the study, which went final again unchanged
        db.reopen_study(conn, study_uid)
        db.finalize_study(conn, study_uid, db.utcnow())
    engine.dispose()
    assert admin_sr(sqlite_url, study_uid, "--out", str(second))[0] == 0
    reopened = pydicom.dcmread(second)
    assert reopened.InstanceNumber == 2 and reopened.SOPInstanceUID != pydicom.dcmread(first).SOPInstanceUID


def test_the_newest_copy_s_patient_module_and_one_patient_per_report(sqlite_url, spool, test_split, tmp_path):
    """A re-send after the result (a patient merge in the PACS) is archived as <SOP>.dup-*.dcm: the report copied
    the first copy's Patient ID. And highdicom copies the first image's patient module: images of two Patient
    IDs made a report filed under one of them. The newest copy is read, and two patients are refused."""
    images, _ = test_split
    study_uid, sources = stored_study(sqlite_url, spool, images[:1], [("done", "likely_normal")])
    merged = sources[0].copy()
    merged.PatientID = "MERGED-PID"
    dup = archive_path(spool, study_uid, str(merged.SOPInstanceUID)).with_suffix(".dup-1.dcm")
    merged.save_as(dup, enforce_file_format=True)
    out = tmp_path / "report.dcm"
    assert admin_sr(sqlite_url, study_uid, "--out", str(out))[0] == 0
    assert pydicom.dcmread(out).PatientID == "MERGED-PID"
    two, _ = stored_study(sqlite_url, spool, images[:2], [("done", "likely_normal")] * 2,
                          edit=lambda ds, n: setattr(ds, "PatientID", f"PID-IMG{n}"))
    code, _, err = admin_sr(sqlite_url, two, "--out", str(out))
    assert (code, err) == (1, f"no report for study {two}: its images carry 2 different Patient IDs "
                              "(reconcile them in the PACS)\n")


def test_a_pacs_that_does_not_resolve_or_takes_no_sr_is_one_line_exit_3(sqlite_url, spool, test_split):
    """A host name that does not resolve was a socket.gaierror traceback; a PACS that takes images but not SR
    read "could not be reached" (review)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    images, _ = test_split
    study_uid, _ = stored_study(sqlite_url, spool, images[:1], [("done", "likely_normal")])
    code, said, err = admin_sr(sqlite_url, study_uid, "--send", "nosuchhost.invalid:104", "--called-ae", "PACS")
    assert (code, said) == (3, "") and err == "pneumonia-admin sr: not sent: PACS at nosuchhost.invalid:104 could " \
                                              "not be reached (gaierror)\n"
    ct_only = AE(ae_title="CTPACS")
    ct_only.add_supported_context(CTImageStorage)
    port = free_port()
    server = ct_only.start_server(("127.0.0.1", port), block=False)
    try:  # the console script itself: pynetdicom's own log lines would reach its stderr, not pytest's handlers
        done = subprocess.run([sys.executable, "-m", "worker.admin", "--database-url", sqlite_url, "sr", study_uid,
                               "--send", f"127.0.0.1:{port}", "--called-ae", "CTPACS"],
                              capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert (done.returncode, done.stdout, done.stderr) == (
        3, "", f"pneumonia-admin sr: not sent: CTPACS at 127.0.0.1:{port} does not accept Comprehensive SR Storage\n")


def test_a_study_uid_that_is_not_one_is_refused_without_echoing_it(sqlite_url, spool, capsys):
    with pytest.raises(SystemExit) as exit_:
        admin.main(["--database-url", sqlite_url, "sr", "1.2\x1b[31m", "--out", "x.dcm"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "not a DICOM UID" in err and "\x1b" not in err


@needs_dcmtk
def test_pending_sends_each_final_study_once_and_a_changed_result_names_the_report_it_replaces(
        database_url, spool, test_split, tmp_path):
    """A site's cron job: `sr --pending --send` sends every final study that has no report for that PACS at its
    current finalisation, records a refusal with its reason instead of trying it every run, and sends again a study
    whose result changed (reopened, final again), naming the earlier report as its predecessor. Before, a shell loop
    over `--final-since` lost what a PACS outage refused, and a new URGENT report stood beside the old ROUTINE one
    with nothing to say which is current."""
    images, _ = test_split
    first, _ = stored_study(database_url, spool, images[:1], [("done", "likely_normal")])
    second, _ = stored_study(database_url, spool, images[1:2], [("done", "high_suspicion")])
    two_patients, _ = stored_study(database_url, spool, images[2:4], [("done", "likely_normal")] * 2,
                                   edit=lambda ds, n: setattr(ds, "PatientID", f"PID-{n}"))
    stored_study(database_url, spool, images[4:5], [("done", "likely_normal")], final=False)  # not due yet
    pacs = tmp_path / "pacs"
    with dcmtk_pacs(pacs) as port:
        send = ("--pending", "--send", f"127.0.0.1:{port}", "--called-ae", "PACS")
        code, said, err = admin_sr(database_url, *send)
        assert code == 0, err
        assert said.splitlines()[-1] == (f"2 report(s) sent to PACS@127.0.0.1:{port}, 1 refused (reasons recorded), "
                                         "0 deferred to the next run, 0 no longer final or gone")
        assert err == (f"no report for study {two_patients}: its images carry 2 different Patient IDs "
                       "(reconcile them in the PACS)\n")
        assert len(list(pacs.iterdir())) == 2
        again = admin_sr(database_url, *send)
        assert again[1].splitlines() == [f"0 report(s) sent to PACS@127.0.0.1:{port}, 0 refused (reasons recorded), "
                                         "0 deferred to the next run, 0 no longer final or gone"] and again[2] == ""
        engine = db.make_engine(database_url)
        with engine.begin() as conn:  # reprocessed: the study reopened, its image scored again, final again
            db.reopen_study(conn, first)
            conn.execute(db.instances.update().where(db.instances.c.study_instance_uid == first)
                         .values(probability=0.95, stratum="high_suspicion", severity=2, flag="URGENT"))
            db.touch_study(conn, first, "ACC-SR", db.utcnow(), {"probability": 0.95, "stratum": "high_suspicion",
                                                                "severity": 2, "flag": "URGENT"})
            db.finalize_study(conn, first, db.utcnow())
            rows = {r.study_instance_uid: r for r in conn.execute(db.reports.select())}
        engine.dispose()
        code, said, err = admin_sr(database_url, *send)
        assert (code, err) == (0, "") and said.splitlines()[-1].startswith("1 report(s) sent")
    assert {uid: r.status for uid, r in rows.items()} == {first: "sent", second: "sent", two_patients: "refused"}
    assert "2 different Patient IDs" in rows[two_patients].reason
    replaced = rows[first].sop_instance_uid
    newest = [pydicom.dcmread(path) for path in pacs.iterdir()
              if pydicom.dcmread(path).StudyInstanceUID == first and pydicom.dcmread(path).SOPInstanceUID != replaced]
    assert len(newest) == 1
    predecessor = newest[0].PredecessorDocumentsSequence[0]
    assert predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == replaced
    dsrdump(next(p for p in pacs.iterdir() if pydicom.dcmread(p).SOPInstanceUID == newest[0].SOPInstanceUID))


def test_pending_stops_at_a_pacs_that_is_down_and_records_nothing(sqlite_url, spool, test_split, tmp_path,
                                                                   monkeypatch):
    """A PACS down stops the run and records nothing; so does a spool whose archive this host cannot see (the
    variable unset, the volume not mounted), where a refusal per study was recorded for good (review)."""
    images, _ = test_split
    stored_study(sqlite_url, spool, images[:1], [("done", "likely_normal")])
    port = free_port()
    code, said, err = admin_sr(sqlite_url, "--pending", "--send", f"127.0.0.1:{port}", "--called-ae", "PACS")
    assert code == 3 and said.endswith("stopped: the PACS is unavailable\n") and "could not be reached" in err
    monkeypatch.setenv("TRIAGE_SPOOL_DIR", str(tmp_path / "not-mounted"))
    code, said, err = admin_sr(sqlite_url, "--pending", "--send", f"127.0.0.1:{port}", "--called-ae", "PACS")
    assert (code, said) == (3, "") and "no archive/ in" in err and "volume not mounted" in err
    engine = db.make_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.execute(db.reports.select()).all() == []
        assert len(admin.pending_reports(conn, f"PACS@127.0.0.1:{port}")) == 1
    engine.dispose()
    for args in (("--pending",), ("--pending", "--send", "h:1", "--out", "x.dcm"), ("1.2.3", "--pending", "--send", "h:1"),
                 ("1.2.3", "--send", "h:1", "--final-since", "2026-01-01"), ("1.2.3", "--send", "h:1", "--limit", "5")):
        assert admin_sr(sqlite_url, *args)[0] == 2, args


def refusing_pacs(refused_study: str, status: int = 0xA900):
    """A pynetdicom PACS that stores SR, except for one study, which it answers `status` (0xA900: its refusal)."""
    from pynetdicom import AE, evt

    stored = []

    def on_store(event):
        ds = event.dataset
        if ds.StudyInstanceUID == refused_study:
            return status
        stored.append(str(ds.SOPInstanceUID))
        return 0x0000

    pacs = AE(ae_title="PACS")
    pacs.add_supported_context("1.2.840.10008.5.1.4.1.1.88.33")
    port = free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return server, port, stored


def test_a_report_the_pacs_refuses_is_recorded_and_does_not_block_the_others(database_url, spool, test_split):
    """A C-STORE failure for one report (a PACS refusing a patient mismatch, say) stopped `--pending` at that study,
    oldest first, every run: no later study was ever sent (review). It is recorded with the PACS's answer, the
    queue goes on, and `sr STUDY --send` can try it again by hand."""
    images, _ = test_split
    refused, _ = stored_study(database_url, spool, images[:1], [("done", "likely_normal")])
    later, _ = stored_study(database_url, spool, images[1:2], [("done", "likely_normal")])
    server, port, stored = refusing_pacs(refused)
    try:
        send = ("--send", f"127.0.0.1:{port}", "--called-ae", "PACS")
        code, said, err = admin_sr(database_url, "--pending", *send)
        assert (code, len(stored)) == (0, 1), err
        assert said.splitlines()[-1] == (f"1 report(s) sent to PACS@127.0.0.1:{port}, 1 refused (reasons recorded), "
                                         "0 deferred to the next run, 0 no longer final or gone")
        assert "did not store the report (C-STORE status 0xA900)" in err
        assert admin_sr(database_url, "--pending", *send)[1].startswith("0 report(s) sent")
        assert admin_sr(database_url, refused, *send)[0] == 1  # by hand: refused again, said again
    finally:
        server.shutdown()
    engine = db.make_engine(database_url)
    with engine.connect() as conn:
        rows = {r.study_instance_uid: (r.status, r.reason) for r in conn.execute(db.reports.select())}
    engine.dispose()
    assert rows[later] == ("sent", None) and rows[refused][0] == "refused" and "0xA900" in rows[refused][1]


@needs_dcmtk
def test_a_failed_resend_keeps_the_record_of_the_report_the_pacs_holds(sqlite_url, spool, test_split, tmp_path):
    """A study sent by `--pending`, then re-sent by hand after its archived copy was pruned: the refusal overwrote
    the sent row, and the study's next report named no predecessor though the PACS held one (review)."""
    images, _ = test_split
    study_uid, sources = stored_study(sqlite_url, spool, images[:1], [("done", "likely_normal")])
    with dcmtk_pacs(tmp_path / "pacs") as port:
        send = ("--send", f"127.0.0.1:{port}", "--called-ae", "PACS")
        assert admin_sr(sqlite_url, "--pending", *send)[0] == 0
        archive_path(spool, study_uid, str(sources[0].SOPInstanceUID)).rename(tmp_path / "kept.dcm")
        assert admin_sr(sqlite_url, study_uid, *send)[0] == 1
    engine = db.make_engine(sqlite_url)
    with engine.connect() as conn:
        assert [r.status for r in conn.execute(db.reports.select())] == ["sent"]
        assert len(db.sent_reports(conn, study_uid, f"PACS@127.0.0.1:{port}")) == 1
    engine.dispose()


def test_one_pending_run_per_pacs_and_final_since_bounds_the_first(sqlite_url, spool, test_split):
    """Cron started a run while the last one still sent: both sent every study (review). A run per PACS holds a
    lock in the spool; the other says so and does nothing. `--final-since` keeps a first run after upgrading to
    the studies final since then (the ones a loop over `--final-since` sent before are not sent again)."""
    import fcntl

    images, _ = test_split
    old, _ = stored_study(sqlite_url, spool, images[:1], [("done", "likely_normal")])
    cutoff = db.utcnow()
    new, _ = stored_study(sqlite_url, spool, images[1:2], [("done", "likely_normal")])
    server, port, stored = refusing_pacs("none")
    try:
        send = ("--pending", "--send", f"127.0.0.1:{port}", "--called-ae", "PACS")
        digest = hashlib.sha256(f"PACS@127.0.0.1:{port}".encode()).hexdigest()[:16]
        lock = spool / f".sr-pending-{digest}.lock"
        with open(lock, "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            code, said, _ = admin_sr(sqlite_url, *send)
            fcntl.flock(held, fcntl.LOCK_UN)
        assert (code, said, stored) == (0, f"another `sr --pending` to PACS@127.0.0.1:{port} is running: nothing done\n", [])
        assert admin_sr(sqlite_url, *send, "--final-since", cutoff.isoformat())[0] == 0
        engine = db.make_engine(sqlite_url)
        with engine.connect() as conn:
            assert [r.study_instance_uid for r in conn.execute(db.reports.select())] == [new]
            assert admin.pending_reports(conn, f"PACS@127.0.0.1:{port}") == [old]
        engine.dispose()
    finally:
        server.shutdown()


def test_every_minutes_keeps_sending_as_studies_go_final(sqlite_url, spool, test_split, tmp_path):
    """The compose service: `--pending --every-minutes` runs a round, sleeps, and sends what became final since,
    saying a PACS outage each round instead of exiting (a restart loop)."""
    images, _ = test_split
    stored_study(sqlite_url, spool, images[:1], [("done", "likely_normal")])
    server, port, stored = refusing_pacs("none")
    log = (tmp_path / "sender.log").open("w")
    sender = subprocess.Popen([sys.executable, "-m", "worker.admin", "--database-url", sqlite_url, "sr", "--pending",
                               "--send", f"127.0.0.1:{port}", "--called-ae", "PACS", "--every-minutes", "0.02"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(stored) == 1, 30, 0.2, "the first study's report")
        stored_study(sqlite_url, spool, images[1:2], [("done", "high_suspicion")])
        wait_for(lambda: len(stored) == 2, 30, 0.2, "the second study's report, a round later")
        server.shutdown()
        server = None
        stored_study(sqlite_url, spool, images[2:3], [("done", "likely_normal")])
        wait_for(lambda: "could not be reached" in (tmp_path / "sender.log").read_text(), 30, 0.2, "the outage said")
        time.sleep(2.5)
        assert sender.poll() is None  # still running through the outage
    finally:
        sender.terminate()
        sender.wait(10)
        log.close()
        if server is not None:
            server.shutdown()


@pytest.mark.parametrize("status,outcome", [(0xA700, "unavailable"), (0x0110, "unavailable"), (0x0124, "unavailable"),
                                            (0x0111, "sent")])
def test_a_pacs_out_of_resources_stops_the_run_and_a_duplicate_counts_as_stored(sqlite_url, spool, test_split, status,
                                                                               outcome):
    """Every C-STORE failure was recorded as a refusal for good: one round against a full PACS (0xA7xx) refused the
    whole backlog (review). Only failures about the object are refusals; Duplicate SOP Instance means the PACS holds
    this UID, which is a digest of these bytes."""
    images, _ = test_split
    first, _ = stored_study(sqlite_url, spool, images[:1], [("done", "likely_normal")])
    second, _ = stored_study(sqlite_url, spool, images[1:2], [("done", "likely_normal")])
    server, port, stored = refusing_pacs(first, status)
    try:
        code, said, err = admin_sr(sqlite_url, "--pending", "--send", f"127.0.0.1:{port}", "--called-ae", "PACS")
    finally:
        server.shutdown()
    engine = db.make_engine(sqlite_url)
    with engine.connect() as conn:
        rows = {r.study_instance_uid: r.status for r in conn.execute(db.reports.select())}
    engine.dispose()
    if outcome == "unavailable":
        assert (code, rows, stored) == (3, {}, []) and f"C-STORE status 0x{status:04X}" in err
        assert said.endswith("; stopped: the PACS is unavailable\n")
    else:
        assert (code, err, rows) == (0, "", {first: "sent", second: "sent"})


@pytest.mark.parametrize("where", ["folder", "file"])
def test_an_archive_unreadable_for_now_is_deferred_not_refused(sqlite_url, spool, test_split, monkeypatch, where):
    """A study folder or file this host cannot read now (permissions, a stale mount: simulated, as the tests run as
    root) was recorded as refused, for good (review): it is deferred, said, and tried again next run."""
    from models.errors import ImageAccessError

    images, _ = test_split
    study_uid, _ = stored_study(sqlite_url, spool, images[:1], [("done", "likely_normal")])

    def cannot(*args, **kwargs):
        if where == "folder":
            raise PermissionError(13, "Permission denied")
        raise ImageAccessError("file could not be read (PermissionError, EACCES)")

    monkeypatch.setattr(admin, "newest_archived_copy" if where == "folder" else "read_dicom", cannot)
    server, port, stored = refusing_pacs("none")
    try:
        code, said, err = admin_sr(sqlite_url, "--pending", "--send", f"127.0.0.1:{port}", "--called-ae", "PACS")
    finally:
        server.shutdown()
    assert code == 3 and "1 deferred to the next run" in said and "cannot be read now" in err and stored == []
    engine = db.make_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.execute(db.reports.select()).all() == []
        assert admin.pending_reports(conn, f"PACS@127.0.0.1:{port}") == [study_uid]
    engine.dispose()
