"""Interoperability with a real PACS: Orthanc pushes studies to the gateway, as a site's PACS does.

DCMTK's storescu stands in for a modality; a PACS behaves differently on the wire (it proposes
every transfer syntax it can transcode to, sends a whole study over one association, and reports
a refusal as a failed job that an administrator sees). Orthanc is started from Debian's package
with a private configuration (its own ports, storage in tmp_path, no plugins) and driven over its
REST API exactly as a PACS administrator would: register the gateway as a DICOM modality, echo
it, send a study to it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, generate_uid

from tests.dicom_gateway.helpers import dataset_bytes, free_port, pending_files, queued_tasks, wait_for
from worker.contract import FINALIZE_STUDY, PROCESS_INSTANCE

pytestmark = [pytest.mark.orthanc, pytest.mark.redis]

ORTHANC_BINARIES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")


class Orthanc:
    """A private Orthanc process and a minimal client for the REST calls a PACS admin makes."""

    def __init__(self, workdir: Path) -> None:
        binary = next((b for b in (shutil.which("Orthanc"), *ORTHANC_BINARIES) if b and Path(b).exists()), None)
        if binary is None:
            pytest.fail("Orthanc not installed: the PACS interop tests need a real PACS (apt-get install orthanc; .ci/run installs it)")
        self.http_port, self.dicom_port = free_port(), free_port()
        storage = workdir / "storage"
        storage.mkdir(parents=True)
        config = {
            "Name": "pytest-orthanc",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "Plugins": [],
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomScuTimeout": 60,
            "DicomModalities": {},
        }
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config))
        self.log_path = workdir / "orthanc.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([binary, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(self._answers, 60, interval=0.2, what=f"Orthanc to answer on HTTP port {self.http_port} (log: {self.log_path})")
        except BaseException:
            self.stop()  # not left running when it never answered
            raise

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
        try:
            return "Version" in self.get("/system")
        except (urllib.error.URLError, ConnectionError):
            return False

    def request(self, method: str, path: str, body: bytes | dict | None = None, timeout: float = 180) -> tuple[int, Any]:
        """One REST call; returns (HTTP status, decoded JSON body). Orthanc answers errors with JSON too."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as rsp:
                status, raw = rsp.status, rsp.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        return status, (json.loads(raw) if raw.strip() else None)

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return body

    def upload(self, path: Path) -> dict[str, Any]:
        status, body = self.request("POST", "/instances", path.read_bytes())
        assert status == 200 and body["Status"] == "Success", body
        return body

    def register(self, name: str, ae_title: str, port: int) -> None:
        status, body = self.request("PUT", f"/modalities/{name}", {"AET": ae_title, "Host": "127.0.0.1", "Port": port})
        assert status == 200, body

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture
def pacs_study(orthanc: Orthanc, make_study: Callable[..., list[Path]]) -> Callable[..., tuple[str, list[Path]]]:
    """Archive a new study in Orthanc; returns (Orthanc study ID, the files it was made from)."""

    def factory(n: int, **kw: object) -> tuple[str, list[Path]]:
        paths = make_study(n, size=(256, 256), study_uid=generate_uid(), **kw)
        studies = {orthanc.upload(path)["ParentStudy"] for path in paths}
        assert len(studies) == 1
        return studies.pop(), paths

    return factory


def _spooled_by_sop(spool: Path) -> dict[str, Path]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in pending_files(spool)}


def test_orthanc_echoes_the_gateway(orthanc: Orthanc, gateway) -> None:
    orthanc.register("triage", "TRIAGE", gateway.port)
    status, body = orthanc.request("POST", "/modalities/triage/echo", {})
    assert status == 200, body


def test_orthanc_echo_to_a_wrong_called_ae_is_refused(orthanc: Orthanc, gateway) -> None:
    """The gateway checks the called AE title by default; a PACS with a mistyped entry must see its echo fail."""
    orthanc.register("typo", "TRIAGEX", gateway.port)
    status, _ = orthanc.request("POST", "/modalities/typo/echo", {})
    assert status != 200


def test_orthanc_sends_a_study_byte_exact_and_each_instance_is_queued(orthanc, start_gateway, broker, pacs_study) -> None:
    gateway = start_gateway(gateway_allowed_calling_aes=["ORTHANC"])
    orthanc.register("triage", "TRIAGE", gateway.port)
    study_id, paths = pacs_study(3)

    status, body = orthanc.request("POST", "/modalities/triage/store", {"Resources": [study_id], "Synchronous": True})

    assert status == 200, body
    assert body["FailedInstancesCount"] == 0 and body["InstancesCount"] == 3, body
    spooled = wait_for(lambda: (s := _spooled_by_sop(gateway.spool.root)) and len(s) == 3 and s, 30, what="3 spooled files")
    for path in paths:
        sent = pydicom.dcmread(path, stop_before_pixels=True)
        # Orthanc archived the file as it was uploaded and sends its dataset unchanged
        assert dataset_bytes(spooled[sent.SOPInstanceUID]) == dataset_bytes(path)
    wait_for(lambda: len(_instance_tasks(broker)) == 3, 30, what="3 queued tasks")
    assert {t["task"] for t in queued_tasks(broker)} <= {PROCESS_INSTANCE, FINALIZE_STUDY}


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1], ids=["jpeg-ls", "jpeg2000", "jpeg-lossless-70"])
def test_a_study_archived_compressed_arrives_as_archived(orthanc, gateway, broker, pacs_study, syntax) -> None:
    """A PACS archives compressed and sends as archived when the peer accepts it: the gateway must
    accept the compressed syntax (not force a transcode on the PACS) and keep the bytes as sent."""
    orthanc.register("triage", "TRIAGE", gateway.port)
    study_id, [path] = pacs_study(1, transfer_syntax=syntax)

    status, body = orthanc.request("POST", "/modalities/triage/store", {"Resources": [study_id], "Synchronous": True})

    assert status == 200, body
    [spooled] = wait_for(lambda: pending_files(gateway.spool.root), 30, what="a spooled file")
    assert pydicom.dcmread(spooled, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    assert dataset_bytes(spooled) == dataset_bytes(path)
    assert len(wait_for(lambda: _instance_tasks(broker), 30, what="a queued task")) == 1


def test_orthanc_from_an_unlisted_calling_ae_is_refused_and_nothing_is_spooled(orthanc, start_gateway, broker, pacs_study) -> None:
    """With an allow-list, a PACS not on it gets a rejected association: its job fails visibly
    (the administrator sees it in Orthanc) and the gateway spools and queues nothing."""
    gateway = start_gateway(gateway_allowed_calling_aes=["MODALITY1"])
    orthanc.register("triage", "TRIAGE", gateway.port)
    study_id, _ = pacs_study(1)

    status, body = orthanc.request("POST", "/modalities/triage/store", {"Resources": [study_id], "Synchronous": True})

    assert status != 200, body
    assert pending_files(gateway.spool.root) == []
    assert queued_tasks(broker) == []


def test_orthanc_sending_an_unaccepted_sop_class_fails_visibly(orthanc, gateway, broker, pacs_study) -> None:
    """A CT instance in the study: the gateway negotiates no CT storage context, so Orthanc's job
    fails with the reason instead of the instance vanishing; a permissive retry (Orthanc's
    "Permissive") delivers the chest radiograph beside it, and only that."""
    orthanc.register("triage", "TRIAGE", gateway.port)
    study_id, [cxr] = pacs_study(1)
    cxr_uid = pydicom.dcmread(cxr, stop_before_pixels=True).SOPInstanceUID
    ct_path = _ct_like(cxr, study_uid=pydicom.dcmread(cxr, stop_before_pixels=True).StudyInstanceUID)
    assert orthanc.upload(ct_path)["ParentStudy"] == study_id

    status, body = orthanc.request("POST", "/modalities/triage/store", {"Resources": [study_id], "Synchronous": True})

    assert status != 200, body  # the job failed (Orthanc 1.10: HTTP 500, "Cannot transcode ... to one of [ ]")
    assert set(_spooled_by_sop(gateway.spool.root)) <= {cxr_uid}

    status, body = orthanc.request(
        "POST", "/modalities/triage/store", {"Resources": [study_id], "Synchronous": True, "Permissive": True}
    )

    assert status == 200, body
    spooled = wait_for(lambda: _spooled_by_sop(gateway.spool.root), 30, what="the CXR spooled")
    assert list(spooled) == [cxr_uid]
    assert {t["args"][1] for t in _instance_tasks(broker)} == {cxr_uid}


def _instance_tasks(broker) -> list[dict]:
    """The queue's process_instance messages: a study's finalize joins them once it has been quiet a second."""
    return [t for t in queued_tasks(broker) if t["task"] == PROCESS_INSTANCE]


def _ct_like(template: Path, *, study_uid: str) -> Path:
    """The CXR file re-labelled as a CT Image Storage instance of the same study (new series)."""
    ds = pydicom.dcmread(template)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.Modality = "CT"
    out = template.with_name("ct.dcm")
    ds.save_as(out, enforce_file_format=True)
    return out
