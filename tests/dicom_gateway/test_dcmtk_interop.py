"""Interoperability with DCMTK echoscu/storescu: echo, single files, folders, compressed syntaxes, refusals."""

from __future__ import annotations

import re

import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from tests.dicom_gateway.helpers import dataset_bytes, pending_files, queued_tasks, run_storescu, storescu_config, wait_for
from worker.samples import CR_SOP_CLASS
from worker.contract import PROCESS_INSTANCE, pending_relpath

pytestmark = [pytest.mark.dcmtk, pytest.mark.redis]


def test_echoscu_gets_success(gateway, dcmtk):
    import subprocess

    out = subprocess.run([dcmtk("echoscu"), "-v", "-aec", "TRIAGE", "127.0.0.1", str(gateway.port)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "Received Echo Response (Success)" in out.stderr + out.stdout


def test_single_file_is_spooled_byte_exact_and_queued(gateway, dcmtk, make_study, broker):
    [path] = make_study(1)
    out = run_storescu(dcmtk("storescu"), gateway.port, [path])
    assert out.returncode == 0, out.stderr
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    relpath = pending_relpath(ds.StudyInstanceUID, ds.SOPInstanceUID)
    spooled = gateway.spool.root / relpath
    assert spooled.is_file()
    assert dataset_bytes(spooled) == dataset_bytes(path), "dataset must be written exactly as received"
    meta = pydicom.dcmread(spooled, stop_before_pixels=True).file_meta
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.SourceApplicationEntityTitle == "STORESCU"
    tasks = wait_for(lambda: _instance_tasks(broker), 5, what="process_instance message")
    assert [(t["task"], t["args"]) for t in tasks] == [(PROCESS_INSTANCE, [relpath, ds.SOPInstanceUID])]
    assert tasks[0]["kwargs"]["received_at"].endswith("+00:00")
    assert list(gateway.spool.incoming.iterdir()) == [], "no partial files may remain"


def test_whole_folder_recursive(gateway, dcmtk, make_study, tmp_path, broker):
    folder = tmp_path / "push"
    paths = make_study(4, out=folder / "a") + make_study(3, out=folder / "b" / "c")
    out = run_storescu(dcmtk("storescu"), gateway.port, [folder], "+sd", "+r")
    assert out.returncode == 0, out.stderr
    assert len(pending_files(gateway.spool.root)) == 7
    assert len({p.parent.name for p in pending_files(gateway.spool.root)}) == 2, "two studies"
    sops = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
    wait_for(lambda: {t["args"][1] for t in _instance_tasks(broker)} == sops, 5, what="7 messages")


def _instance_tasks(broker) -> list[dict]:
    """The queue's process_instance messages: a study's finalize joins them once it has been quiet a second."""
    return [t for t in queued_tasks(broker) if t["task"] == PROCESS_INSTANCE]


COMPRESSED = [
    pytest.param(JPEGBaseline8Bit, 8, id="jpeg-baseline"),
    pytest.param(JPEGLossless, 12, id="jpeg-lossless-57"),
    pytest.param(JPEGLosslessSV1, 12, id="jpeg-lossless-70"),
    pytest.param(JPEGLSLossless, 12, id="jpeg-ls"),
    pytest.param(JPEG2000Lossless, 12, id="jpeg2000"),
    pytest.param(RLELossless, 12, id="rle"),
]


@pytest.mark.parametrize(("syntax", "bits"), COMPRESSED)
def test_compressed_transfer_syntaxes_are_accepted_as_sent(gateway, dcmtk, make_study, tmp_path, syntax, bits):
    dcmtk("dcmcjpeg")  # the sample factory encodes JPEG/JPEG-LS with DCMTK
    [path] = make_study(1, size=(128, 128), bits_stored=bits, transfer_syntax=syntax)
    config = storescu_config(tmp_path / "storescu.cfg", [str(CR_SOP_CLASS)], [str(syntax)])
    out = run_storescu(dcmtk("storescu"), gateway.port, [path], "-xf", str(config), "CXR")
    assert out.returncode == 0, out.stderr
    [spooled] = pending_files(gateway.spool.root)
    assert pydicom.dcmread(spooled, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    assert dataset_bytes(spooled) == dataset_bytes(path)


@pytest.mark.parametrize(
    ("flag", "syntax"),
    [("-xi", ImplicitVRLittleEndian), ("-xd", DeflatedExplicitVRLittleEndian)],
    ids=["implicit", "deflated"],
)
def test_storescu_converted_syntaxes(gateway, dcmtk, make_study, flag, syntax):
    """storescu re-encodes on the fly; the header parse must cope (deflate is inflated to read UIDs)."""
    [path] = make_study(1)
    out = run_storescu(dcmtk("storescu"), gateway.port, [path], flag)
    assert out.returncode == 0, out.stderr
    [spooled] = pending_files(gateway.spool.root)
    stored = pydicom.dcmread(spooled)
    assert stored.file_meta.TransferSyntaxUID == syntax
    assert stored.SOPInstanceUID == spooled.stem
    assert stored.pixel_array.shape == (64, 64)


def test_unknown_calling_ae_is_rejected(start_gateway, dcmtk, make_study, broker):
    gateway = start_gateway(gateway_allowed_calling_aes=["MODALITY1", "PACS"])
    [path] = make_study(1)
    out = run_storescu(dcmtk("storescu"), gateway.port, [path], calling="INTRUDER")
    assert out.returncode != 0
    assert "Calling AE Title Not Recognized" in out.stderr + out.stdout
    ok = run_storescu(dcmtk("storescu"), gateway.port, [path], calling="PACS")
    assert ok.returncode == 0, ok.stderr
    assert len(pending_files(gateway.spool.root)) == 1
    assert gateway.status()["associations_rejected"] == {"calling_ae_not_allowed": 1}


def test_wrong_called_ae_is_rejected(gateway, dcmtk, make_study):
    [path] = make_study(1)
    out = run_storescu(dcmtk("storescu"), gateway.port, [path], called="SOMEONE")
    assert out.returncode != 0
    assert "Called AE Title Not Recognized" in out.stderr + out.stdout
    assert pending_files(gateway.spool.root) == []


def test_source_ip_not_allowed_is_rejected(start_gateway, dcmtk, make_study, broker):
    gateway = start_gateway(gateway_allowed_ips=["10.0.0.0/8"])
    [path] = make_study(1)
    out = run_storescu(dcmtk("storescu"), gateway.port, [path])
    assert out.returncode != 0
    assert "Association Rejected" in out.stderr + out.stdout
    assert pending_files(gateway.spool.root) == []
    allowed = start_gateway(gateway_allowed_ips=["10.0.0.0/8", "127.0.0.0/8"])
    assert run_storescu(dcmtk("storescu"), allowed.port, [path]).returncode == 0


def test_unsupported_sop_class_is_refused_in_negotiation(gateway, dcmtk, make_study, broker):
    [ct] = make_study(1, modality="CT")
    out = run_storescu(dcmtk("storescu"), gateway.port, [ct], "-R")
    assert out.returncode != 0
    assert re.search(r"(?i)no (acceptable )?presentation context", out.stderr + out.stdout)
    assert pending_files(gateway.spool.root) == []
    assert queued_tasks(broker) == []


def test_negotiation_rejects_only_the_unsupported_context(gateway):
    """A mixed proposal: CR accepted, CT rejected with 'abstract syntax not supported' (0x03)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="MIXED")
    ae.add_requested_context(CR_SOP_CLASS)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title="TRIAGE")
    try:
        assert assoc.is_established
        results = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts + assoc.accepted_contexts}
        assert results[str(CR_SOP_CLASS)] == 0x00
        assert results[str(CTImageStorage)] == 0x03
    finally:
        assoc.release()


def test_secondary_capture_only_when_enabled(start_gateway, dcmtk, tmp_path, images, broker):
    from pydicom.uid import SecondaryCaptureImageStorage

    from worker.samples import make_cxr_dataset, save

    ds = make_cxr_dataset(images[0], size=(64, 64))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    path = save(ds, tmp_path / "sc.dcm")
    off = start_gateway()
    assert run_storescu(dcmtk("storescu"), off.port, [path], "-R").returncode != 0
    on = start_gateway(gateway_accept_secondary_capture=True, spool_dir=tmp_path / "spool-sc")
    out = run_storescu(dcmtk("storescu"), on.port, [path], "-R")
    assert out.returncode == 0, out.stderr
    assert len(pending_files(on.spool.root)) == 1


def test_low_disk_refuses_new_associations(start_gateway, dcmtk, make_study, broker):
    gateway = start_gateway(gateway_min_free_bytes=1 << 62)
    [path] = make_study(1)
    out = run_storescu(dcmtk("storescu"), gateway.port, [path])
    assert out.returncode != 0
    assert "Rejected Transient" in out.stderr + out.stdout
    assert pending_files(gateway.spool.root) == []


def test_a_resent_instance_replaces_its_pending_copy_with_a_warning(gateway, dcmtk, make_study, tmp_path, caplog):
    """Last copy wins (a sender's retry after a timeout re-sends it), but a second copy of an
    acknowledged instance, the same or different, is logged for the PACS administrator."""
    import logging

    [path] = make_study(1)
    ds = pydicom.dcmread(path)
    changed = tmp_path / "changed.dcm"
    ds.PixelData = bytes(len(ds.PixelData))  # same SOP Instance UID, other pixels
    ds.save_as(changed)
    with caplog.at_level(logging.WARNING, logger="dicom_gateway"):
        assert run_storescu(dcmtk("storescu"), gateway.port, [path]).returncode == 0
        assert not [r for r in caplog.records if "replaced a pending copy" in r.getMessage()]
        assert run_storescu(dcmtk("storescu"), gateway.port, [changed]).returncode == 0
    [warning] = [r for r in caplog.records if "replaced a pending copy" in r.getMessage()]
    assert warning.sop_uid == ds.SOPInstanceUID and warning.counts["earlier_file_bytes"] > 0
    spooled = gateway.spool.root / pending_relpath(ds.StudyInstanceUID, ds.SOPInstanceUID)
    assert dataset_bytes(spooled) == dataset_bytes(changed)


def test_sop_classes_refused_in_negotiation_are_named_in_the_log(gateway, dcmtk, make_study, tmp_path, caplog):
    """A PACS pushing a whole study offered a CT among the X-rays: the gateway logged only the classes it
    accepted, so the admin could not tell from this side what was refused."""
    import logging

    from pydicom.uid import CTImageStorage

    [cr, ct] = make_study(2)
    ds = pydicom.dcmread(ct)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.save_as(ct)
    with caplog.at_level(logging.INFO, logger="dicom_gateway"):
        out = run_storescu(dcmtk("storescu"), gateway.port, [cr, ct], "--required")  # propose what it sends
    assert "Success" in out.stderr + out.stdout
    assert len(pending_files(gateway.spool.root)) == 1, "the CR is stored, the CT is not"
    [established] = [r for r in caplog.records if r.getMessage() == "association established"]
    assert established.counts["refused_classes"] == [f"CT Image Storage ({CTImageStorage})"]
    assert established.counts["refused_class_count"] == 1


def test_the_local_health_probe_does_not_fill_the_log(gateway, caplog):
    """The compose healthcheck echoes every 30 s: three INFO lines each (8,640 a day) buried the modalities'
    associations. The probe's lines go to DEBUG; a modality's echo still logs at INFO."""
    import logging

    from dicom_gateway.health import echo

    settings = gateway.settings.model_copy(update={"gateway_port": gateway.port})
    with caplog.at_level(logging.INFO, logger="dicom_gateway"):
        assert echo(settings, "127.0.0.1")["ok"] is True
        assert echo(settings, "127.0.0.1", calling_ae="MODALITY1")["ok"] is True
    association_lines = [r for r in caplog.records if r.getMessage().startswith("association ")]
    requested = [r for r in association_lines if r.getMessage() == "association requested"]
    assert [r.calling_ae for r in requested] == ["MODALITY1"]
    assert len(association_lines) == 3, [r.getMessage() for r in association_lines]
