"""What an encapsulated frame's own codestream says, read before any decoder sees it.

The decoders trust the codestream, not the dataset. A codestream whose frame header disagrees with
Rows/Columns is decoded at the codestream's size (a 50 kB file declaring 30000 x 30000 inside a
512 x 512 header took 5 GB), cut to the dataset's (stripes, scored as a chest), or aborts the whole
process inside GDCM, where no Python handler runs. A JPEG codestream cut short (a transfer that
stopped, a disk that filled) decodes without error in pylibjpeg-libjpeg, the missing part filled
in: a normal plate with 30% of its codestream kept scored 0.79 and went URGENT. Both are cheap to
see in the bytes: the frame header (JPEG SOFn, JPEG-LS SOF55, JPEG 2000 SIZ) and the JPEG end of
image marker. Only headers are parsed here; the pixels stay the decoders' business.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom import uid

JPEG_SYNTAXES = frozenset({uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
                           uid.JPEGLSLossless, uid.JPEGLSNearLossless})
"""Codestreams of ISO 10918 / 14495 (ITU T.81 / T.87): SOI ... SOFn ... SOS ... EOI."""
JPEG2000_SYNTAXES = frozenset({uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL,
                               uid.HTJ2K})
"""Codestreams of ISO 15444: SOC, then SIZ with the image and component sizes."""

SOI, EOI, SOS = 0xD8, 0xD9, 0xDA
FRAME_HEADERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF,
                           0xF7})  # SOF0..SOF15 without DHT (C4), JPG (C8), DAC (CC); F7 is JPEG-LS SOF55
STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn carry no length
J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
EOI_BYTES = b"\xff\xd9"


class CodestreamError(ValueError):
    """The frame's codestream is malformed or contradicts the dataset; the text is the reason."""


@dataclass(frozen=True)
class FrameHeader:
    rows: int
    columns: int
    components: int
    precision: int


def jpeg_frame_header(data: bytes) -> FrameHeader:
    """The first SOFn (or JPEG-LS SOF55) of a JPEG codestream, walking its marker segments."""
    if data[:2] != b"\xff\xd8":
        raise CodestreamError("JPEG codestream does not start with SOI")
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            raise CodestreamError(f"JPEG codestream has no marker at byte {at}")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in STANDALONE:
            at += 2
            continue
        if marker in (SOS, EOI):
            break
        (length,) = struct.unpack(">H", data[at + 2:at + 4])
        if marker in FRAME_HEADERS:
            if length < 8 or at + 10 > len(data):
                raise CodestreamError("JPEG frame header is cut short")
            precision, rows, columns, components = struct.unpack(">BHHB", data[at + 4:at + 10])
            return FrameHeader(rows, columns, components, precision)
        at += 2 + length
    raise CodestreamError("JPEG codestream has no frame header (SOF) before its scan")


def jpeg2000_frame_header(data: bytes) -> FrameHeader:
    """Image and component sizes from the SIZ segment (ISO 15444-1 A.5.1). A JP2 wrapper (not allowed in
    DICOM, but written by some encoders, and decoded by openjpeg) puts boxes of any size before it."""
    at = data.find(J2K_SOC_SIZ)
    if at < 0:
        raise CodestreamError("JPEG 2000 codestream has no SOC and SIZ marker")
    siz = data[at + 4:at + 4 + 38]
    if len(siz) < 38:
        raise CodestreamError("JPEG 2000 SIZ segment is cut short")
    _, _, width, height, x_origin, y_origin = struct.unpack(">HHIIII", siz[:20])
    (components,) = struct.unpack(">H", siz[36:38])
    depth = data[at + 42:at + 43]
    precision = (depth[0] & 0x7F) + 1 if depth else 0
    return FrameHeader(height - y_origin, width - x_origin, components, precision)


def ends_with_eoi(data: bytes) -> bool:
    """A complete JPEG codestream ends with EOI. DICOM pads an odd-length frame with one byte, which
    should be zero but is not always (DCMTK 3.6.7's JPEG-LS encoder, used by Orthanc to transcode, leaves
    whatever byte follows), and some writers pad to a fixed size with zeros or fill bytes, so any such
    tail is passed over. Entropy-coded data never holds 0xFF 0xD9 (JPEG stuffs a zero after 0xFF, JPEG-LS
    a zero bit), so a codestream cut short cannot pass for one followed by a padding byte."""
    return data.rstrip(b"\x00\xff").endswith(EOI_BYTES) or data[-3:-1] == EOI_BYTES


def check_frame(data: bytes, syntax: str, rows: int, columns: int, samples: int) -> FrameHeader | None:
    """Refuse a codestream that is cut short or whose frame header contradicts the dataset; return its frame
    header (None for a syntax without one, RLE).

    The sample precision is returned, not checked here: whether a precision below Bits Stored shows the image
    wrongly depends on the dataset's window (`models.dicom_io.check_precision`), which this module never reads."""
    if syntax in JPEG_SYNTAXES:
        header = jpeg_frame_header(data)
        if not ends_with_eoi(data):
            raise CodestreamError("JPEG codestream has no end-of-image marker: cut short, or written by an "
                                  "encoder that omits it")
    elif syntax in JPEG2000_SYNTAXES:
        header = jpeg2000_frame_header(data)
    else:
        return None
    if (header.rows or rows, header.columns) != (rows, columns):  # 0 lines: the height comes in a DNL segment
        raise CodestreamError(f"codestream is {header.rows}x{header.columns} pixels but the dataset says "
                              f"{rows}x{columns}")
    if header.components != samples:
        raise CodestreamError(f"codestream has {header.components} component(s) but Samples per Pixel is {samples}")
    return header
