"""A real worker's log holds no DICOM element value that pydicom complains about (worker/contract.py
quiet_pydicom): a Specific Character Set can hold any text, a name and a record number included."""

from __future__ import annotations

import pytest

from pydicom.uid import JPEGExtended12Bit

from worker.samples import make_cxr_dataset

pytestmark = [pytest.mark.redis]


@pytest.mark.filterwarnings("ignore::UserWarning")  # this process writes the bad values: its own warnings
def test_a_character_set_holding_patient_text_never_reaches_the_worker_log(make_triage_env, sqlite_url, test_split):
    """pydicom logged `Unknown encoding 'DOE^JOHN MRN12345' - using default encoding instead` through its
    own logger, which the warnings filter did not cover (review reproduction: mkcharset.py)."""
    env = make_triage_env(sqlite_url)
    worker = env.start_worker()
    cases = [("DOE^JOHN MRN12345", "ÄKTE".encode()), ("ISO_IR100 SMITH^JANE", "MÜLLER".encode("latin-1"))]
    sops = []
    for index, (charset, accession) in enumerate(cases):
        ds = make_cxr_dataset(test_split[0][20 + index], size=(256, 256), accession="X")
        ds.SpecificCharacterSet = charset
        ds.AccessionNumber = accession
        relpath, sop = env.stage(ds)
        env.send(relpath, sop)
        sops.append(sop)
    env.wait_terminal(sops)
    log = worker.log()
    assert " ready." in log  # the log is the worker's, and it was read after the instances were done
    for secret in ("MRN12345", "DOE^JOHN", "SMITH", "MÜLLER", "ÄKTE"):
        assert secret not in log, secret


def test_a_decoding_plugin_that_declines_before_another_succeeds_logs_no_error(make_triage_env, sqlite_url, test_split):
    """GDCM refuses 12-bit JPEG Extended and pylibjpeg decodes it; pydicom logged the refusal at ERROR with
    a traceback for every such image (common from CR systems and Orthanc's transcoding), a false alarm for
    log-based alerting."""
    env = make_triage_env(sqlite_url)
    worker = env.start_worker()
    ds = make_cxr_dataset(test_split[0][30], size=(256, 256), transfer_syntax=JPEGExtended12Bit)
    assert ds.BitsStored == 12
    relpath, sop = env.stage(ds)
    env.send(relpath, sop)
    rows = env.wait_terminal([sop])
    assert rows[sop]["status"] == "done", rows[sop]
    log = worker.log()
    assert " ready." in log
    assert "GDCM does not support" not in log
    assert "ERROR" not in log
