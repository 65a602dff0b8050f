"""Header parsing of received datasets, without a network peer (DCMTK exchanges are in test_dcmtk_interop)."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from io import BytesIO

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from dicom_gateway.scp import (CANNOT_UNDERSTAND, DATASET_MISMATCH, HEADER_INFLATE_LIMIT, SEQUENCE_DELIMITER, BadDatasetError,
                               check_header, read_header)

INFLATED_BYTES = 256 << 20


def deflate_bomb(ds: Dataset) -> bytes:
    """`ds` followed by 256 MiB of zero PixelData, raw-deflated (about 250 KiB on the wire)."""
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, ds)
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, INFLATED_BYTES)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(encoded.getvalue() + pixel_header)]
    zeros = bytes(1 << 20)
    parts += [deflater.compress(zeros) for _ in range(INFLATED_BYTES >> 20)]
    return b"".join(parts) + deflater.flush()


def test_a_deflate_bomb_is_parsed_without_inflating_it():
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    wire = deflate_bomb(ds)
    assert len(wire) < INFLATED_BYTES // 100

    tracemalloc.start()
    try:
        header = read_header(BytesIO(wire), DeflatedExplicitVRLittleEndian)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert (header.sop_class, header.sop_uid, header.study_uid) == (ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID)
    assert peak < 4 * HEADER_INFLATE_LIMIT < INFLATED_BYTES // 8


def test_a_deflated_dataset_cut_short_is_refused():
    """Only the header is parsed from a Deflated dataset; the rest must still be a complete deflate
    stream, or the sender is told Success for an image the worker can never read."""
    ds = identified(BitsAllocated=8, PixelData=bytes(range(256)) * 64)
    encoded = plain_stream(ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    wire = deflater.compress(encoded) + deflater.flush()
    assert read_header(BytesIO(wire), DeflatedExplicitVRLittleEndian).sop_uid == ds.SOPInstanceUID
    for cut in (1, len(wire) // 3):
        with pytest.raises(BadDatasetError, match="truncated") as refused:
            read_header(BytesIO(wire[:-cut]), DeflatedExplicitVRLittleEndian)
        assert refused.value.status == CANNOT_UNDERSTAND


def test_a_deflated_header_beyond_the_inflate_limit_is_refused_for_what_it_is():
    """A private element before (0020,000D) can push it past the 4 MiB parsed: the sender was told
    "StudyInstanceUID is missing", which is false (the same instance uncompressed is accepted)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.add_new(0x00090010, "LO", "VENDOR")
    ds.add_new(0x00091001, "OB", bytes(HEADER_INFLATE_LIMIT + (1 << 20)))
    encoded = plain_stream(ds)
    assert read_header(BytesIO(encoded), ExplicitVRLittleEndian).study_uid == ds.StudyInstanceUID
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with pytest.raises(BadDatasetError, match="StudyInstanceUID not in first 4 MiB") as refused:
        read_header(BytesIO(deflater.compress(encoded) + deflater.flush()), DeflatedExplicitVRLittleEndian)
    assert refused.value.status == CANNOT_UNDERSTAND

    item = Dataset()  # the same length inside an undefined-length private sequence: the cut falls in it
    item.add_new(0x00091002, "OB", bytes(HEADER_INFLATE_LIMIT + (1 << 20)))
    del ds[0x00091001]
    ds.add_new(0x00091001, "SQ", [item])
    ds[0x00091001].is_undefined_length = True
    encoded = plain_stream(ds)
    assert encoded.count(SEQUENCE_DELIMITER) == 1
    assert read_header(BytesIO(encoded), ExplicitVRLittleEndian).study_uid == ds.StudyInstanceUID
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with pytest.raises(BadDatasetError, match="StudyInstanceUID not in first 4 MiB"):
        read_header(BytesIO(deflater.compress(encoded) + deflater.flush()), DeflatedExplicitVRLittleEndian)


def plain_stream(ds: Dataset) -> bytes:
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, ds)
    return encoded.getvalue()


def identified(**elements) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def test_a_dataset_cut_short_is_refused_not_acknowledged():
    """pydicom reads a value cut by the end of the stream without complaint; the gateway must not."""
    wire = plain_stream(identified(BitsAllocated=8, PixelData=bytes(4096)))
    assert read_header(BytesIO(wire), ExplicitVRLittleEndian).sop_class
    with pytest.raises(BadDatasetError, match="truncated") as refused:
        read_header(BytesIO(wire[:-100]), ExplicitVRLittleEndian)
    assert refused.value.status == CANNOT_UNDERSTAND


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("kept", range(1, 8))
def test_a_dataset_cut_inside_an_element_header_is_refused(implicit, kept):
    """pydicom stops without a word when fewer than 8 bytes are left, so a stream cut 1-7 bytes into
    the Pixel Data element's header parsed as a complete dataset without Pixel Data and was
    acknowledged; the worker found the image missing later."""
    from pydicom.uid import ImplicitVRLittleEndian

    ds = identified(BitsAllocated=8, PixelData=bytes(4096))
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, implicit
    write_dataset(encoded, ds)
    wire = encoded.getvalue()
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    assert read_header(BytesIO(wire), syntax).sop_uid == ds.SOPInstanceUID
    pixel_header = wire.rindex(b"\xe0\x7f\x10\x00")
    with pytest.raises(BadDatasetError, match="truncated") as refused:
        read_header(BytesIO(wire[: pixel_header + kept]), syntax)
    assert refused.value.status == CANNOT_UNDERSTAND


def test_a_dataset_ending_in_a_sequence_of_undefined_length_is_complete_only_with_its_delimiter():
    from pydicom.sequence import Sequence

    item = Dataset()
    item.ValueType = "TEXT"
    ds = identified()
    ds.ContentSequence = Sequence([item])  # (0040,A730): after the UIDs, the last element
    ds["ContentSequence"].is_undefined_length = True
    wire = plain_stream(ds)
    assert wire.endswith(SEQUENCE_DELIMITER)
    assert read_header(BytesIO(wire), ExplicitVRLittleEndian).sop_uid == ds.SOPInstanceUID
    for extra in (b"\x00", b"\xe0\x7f\x10\x00"):
        with pytest.raises(BadDatasetError, match="truncated"):
            read_header(BytesIO(wire + extra), ExplicitVRLittleEndian)


def encapsulated_stream() -> bytes:
    """A JPEG-lossless CR as the gateway receives it: encapsulated Pixel Data of undefined length,
    its fragments closed by the sequence delimiter (FFFE,E0DD) as the dataset's last 8 bytes."""
    from pydicom.uid import JPEGLosslessSV1

    from worker.samples import make_cxr_dataset

    image = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 251).astype(np.uint8)
    ds = make_cxr_dataset(image, size=(128, 128), transfer_syntax=JPEGLosslessSV1)
    return plain_stream(ds)


@pytest.mark.parametrize("cut", [1, 4, 7, 8, 9, 100, 1000])
def test_an_encapsulated_dataset_cut_short_is_refused(cut):
    """pydicom only warns when an undefined-length value runs into the end of the stream (a cut
    inside the last fragment or the delimiter); the gateway must refuse it, not acknowledge it."""
    from pydicom.uid import JPEGLosslessSV1

    wire = encapsulated_stream()
    assert wire.endswith(SEQUENCE_DELIMITER)
    assert read_header(BytesIO(wire), JPEGLosslessSV1).sop_uid
    with pytest.raises(BadDatasetError, match="truncated") as refused:
        read_header(BytesIO(wire[:-cut]), JPEGLosslessSV1)
    assert refused.value.status == CANNOT_UNDERSTAND


def test_a_dataset_without_sop_class_is_a_mismatch():
    ds = identified()
    del ds.SOPClassUID
    header = read_header(BytesIO(plain_stream(ds)), ExplicitVRLittleEndian)
    with pytest.raises(BadDatasetError) as refused:
        check_header(header, "1.2.840.10008.5.1.4.1.1.1", ds.SOPInstanceUID)
    assert refused.value.status == DATASET_MISMATCH


def test_every_store_fsyncs_pending_even_into_an_existing_study_folder(tmp_path, monkeypatch):
    """Another association may have made the study folder a moment ago without having fsynced
    pending/ yet; an acknowledged instance must not hang on that folder's entry."""
    from dicom_gateway import spool as spool_module

    synced: list[str] = []
    monkeypatch.setattr(spool_module, "fsync_dir", lambda path: synced.append(path.name))
    spool = spool_module.Spool(tmp_path / "spool")
    spool.ensure_layout()
    assert synced == ["spool", tmp_path.name], "a fresh layout is made durable"
    study = generate_uid()
    (spool.pending / study).mkdir()  # made by another association, pending/ not yet fsynced
    synced.clear()
    spool.store([b"x"], study, generate_uid())
    assert synced == ["pending", study]


def test_reading_the_header_does_not_copy_the_pixel_data():
    """pynetdicom already holds the whole dataset; reading three UIDs read Pixel Data too, another copy (64 MiB
    more at the peak for 64 MiB of pixels), which brings a large instance nearer the gateway's memory limit,
    where every association in flight dies with it, again at each re-send."""
    wire = plain_stream(identified(BitsAllocated=16, PixelData=bytes(64 << 20)))
    received = BytesIO()
    received.write(wire)  # as pynetdicom fills it, fragment by fragment: a buffer of its own
    tracemalloc.start()
    try:
        header = read_header(received, ExplicitVRLittleEndian)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert header.study_uid and peak < 4 << 20, peak
    with pytest.raises(BadDatasetError, match="truncated"):  # a value skipped, not read, is still measured
        read_header(BytesIO(wire[:-100]), ExplicitVRLittleEndian)


def test_running_out_of_memory_while_parsing_asks_the_sender_to_retry(monkeypatch):
    """0xC000 (cannot understand) tells a PACS the instance is bad for good; out of memory is 0xA700."""
    from dicom_gateway import scp

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(scp, "read_dataset", no_memory)
    with pytest.raises(BadDatasetError) as refused:
        read_header(BytesIO(plain_stream(identified())), ExplicitVRLittleEndian)
    assert refused.value.status == scp.OUT_OF_RESOURCES
