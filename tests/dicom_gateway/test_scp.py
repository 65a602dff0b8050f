"""Header parsing of received datasets, without a network peer (DCMTK exchanges are in test_dcmtk_interop)."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from dicom_gateway.scp import HEADER_INFLATE_LIMIT, read_header

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
