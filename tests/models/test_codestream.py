"""Encapsulated frames checked against the dataset before a decoder sees them (`models.codestream`),
and the decoders' own failures turned into reasons (`models.dicom_io.decode_pixels`)."""

import copy
import struct

import numpy as np
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (JPEG2000Lossless, JPEGBaseline8Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
                         RLELossless)

from models.codestream import CodestreamError, check_frame, jpeg2000_frame_header, jpeg_frame_header
from models.dicom_io import dicom_to_grayscale
from models.errors import UnreadableImageError
from worker.samples import make_cxr_dataset

JPEG_FAMILY = [JPEGBaseline8Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless]


@pytest.fixture(scope="module")
def image(pneumoniamnist):
    return pneumoniamnist["test_images"][3]  # a normal study


@pytest.fixture(scope="module")
def encoded(image):
    """One 256 x 256 instance per compressed transfer syntax (DCMTK encodes the JPEG family)."""
    return {syntax: make_cxr_dataset(image, size=(256, 256), transfer_syntax=syntax)
            for syntax in [*JPEG_FAMILY, JPEG2000Lossless, RLELossless]}


def frame_of(ds) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def with_frame(ds, frame: bytes, **tags):
    copied = copy.deepcopy(ds)
    copied.PixelData = encapsulate([frame])
    for keyword, value in tags.items():
        setattr(copied, keyword, value)
    return copied


@pytest.mark.parametrize("syntax", JPEG_FAMILY)
def test_a_jpeg_codestream_cut_short_is_refused_not_scored(encoded, syntax):
    """pylibjpeg-libjpeg decodes a cut-off codestream without error and fills in the rest: a normal
    plate with 30% of its codestream kept scored 0.58-0.79, high_suspicion, URGENT."""
    ds = encoded[syntax]
    assert dicom_to_grayscale(ds).shape == (256, 256)  # the whole codestream decodes
    frame = frame_of(ds)
    cut = with_frame(ds, frame[: int(len(frame) * 0.3)])
    with pytest.raises(UnreadableImageError, match="JPEG codestream has no end-of-image marker: cut short"):
        dicom_to_grayscale(cut)


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEGLossless, JPEG2000Lossless])
def test_a_codestream_larger_than_the_dataset_says_is_refused(encoded, syntax):
    """GDCM decoded a 512 x 512 JPEG-LS stream in a 256 x 256 dataset into stripes, scored URGENT;
    one pixel off aborted the whole process in GDCM, past every Python handler."""
    ds = encoded[syntax]
    halved = with_frame(ds, frame_of(ds), Rows=128, Columns=128)
    with pytest.raises(UnreadableImageError, match="codestream is 256x256 pixels but the dataset says 128x128"):
        dicom_to_grayscale(halved)


def sof_offset(frame: bytes) -> int:
    for marker in (b"\xff\xc3", b"\xff\xc1", b"\xff\xc0", b"\xff\xf7"):
        at = frame.find(marker)
        if at > 0:
            return at
    raise AssertionError("no frame header")


@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, JPEGLossless, JPEGLSLossless])
def test_a_small_file_declaring_a_huge_codestream_is_refused_before_decoding(encoded, syntax):
    """A 50 kB file whose frame header says 30000 x 30000 took 5 GB in the decoder (the dataset's own
    size limits saw 256 x 256); checked on the bytes only, never decoded here."""
    frame = bytearray(frame_of(encoded[syntax]))
    at = sof_offset(bytes(frame))
    frame[at + 5:at + 9] = struct.pack(">HH", 30000, 30000)
    assert jpeg_frame_header(bytes(frame)).rows == 30000
    with pytest.raises(CodestreamError, match="codestream is 30000x30000 pixels but the dataset says 256x256"):
        check_frame(bytes(frame), syntax, 256, 256, 1)


def test_jpeg2000_siz_gives_the_image_size_less_its_origin(encoded):
    header = jpeg2000_frame_header(frame_of(encoded[JPEG2000Lossless]))
    assert (header.rows, header.columns, header.components) == (256, 256, 1)
    assert header.precision == encoded[JPEG2000Lossless].BitsStored


def test_a_one_sample_codestream_labelled_colour_is_refused(encoded):
    """A one-sample JPEG 2000 labelled YBR_FULL (Samples per Pixel 3) aborted the process in GDCM."""
    ds = encoded[JPEG2000Lossless]
    colour = with_frame(ds, frame_of(ds), PhotometricInterpretation="YBR_FULL", SamplesPerPixel=3)
    with pytest.raises(UnreadableImageError, match="codestream has 1 component"):
        dicom_to_grayscale(colour)
    mislabelled = with_frame(ds, frame_of(ds), PhotometricInterpretation="YBR_FULL")
    with pytest.raises(UnreadableImageError, match="Samples per Pixel 1 contradicts Photometric Interpretation "
                                                   "YBR_FULL"):
        dicom_to_grayscale(mislabelled)


def test_compressed_pixels_of_32_bits_allocated_are_refused(encoded):
    ds = encoded[JPEGLossless]
    with pytest.raises(UnreadableImageError, match="Bits Allocated 32 with compressed pixel data"):
        dicom_to_grayscale(with_frame(ds, frame_of(ds), BitsAllocated=32))


def test_a_panic_in_the_rle_decoder_becomes_a_reason(encoded):
    """pylibjpeg-rle's Rust code panics on a frame longer than the dataset says; the panic is a
    BaseException, which escaped every handler and left the instance `processing`."""
    ds = encoded[RLELossless]
    with pytest.raises(UnreadableImageError, match=r"pixel data could not be decoded \(transfer syntax "
                                                   r"1\.2\.840\.10008\.1\.2\.5: PanicException\)"):
        dicom_to_grayscale(with_frame(ds, frame_of(ds), Rows=128, Columns=128))


def test_a_rescale_beyond_single_precision_is_refused_with_its_reason(image):
    """A slope of 1e39 overflowed to infinity and was refused as "blank"; 1e308 gave an internal error."""
    for slope in ("1e39", "1e308"):
        ds = make_cxr_dataset(image, size=(256, 256))
        ds.RescaleSlope, ds.RescaleIntercept = slope, "0"
        for keyword in ("WindowCenter", "WindowWidth"):
            if keyword in ds:
                delattr(ds, keyword)
        with pytest.raises(UnreadableImageError, match="values beyond single precision"):
            dicom_to_grayscale(ds)


def test_a_plate_over_the_pixel_budget_is_refused_before_decoding(image):
    """16384 x 16384 is within the per-side limit but took 3.2 GB, past the worker's 3 GiB cap:
    killed three times, then recorded as lost instead of refused."""
    ds = make_cxr_dataset(image, size=(256, 256))
    ds.Rows = ds.Columns = 12500
    with pytest.raises(UnreadableImageError, match="image size 12500x12500 exceeds 144 megapixels"):
        dicom_to_grayscale(ds)


def test_padding_after_the_end_of_image_marker_is_accepted(encoded):
    """DICOM pads an odd-length frame with one zero byte, some writers with more."""
    ds = encoded[JPEGLSLossless]
    for padding in (b"\x00" * 4, b"\xff" * 2, b"\x00" * 31):
        padded = with_frame(ds, frame_of(ds).rstrip(b"\x00") + padding)
        np.testing.assert_array_equal(dicom_to_grayscale(padded), dicom_to_grayscale(ds))


def test_one_padding_byte_of_any_value_after_the_end_of_image_marker_is_accepted(encoded):
    """Orthanc's JPEG-LS transcoding (DCMTK 3.6.7) pads an odd-length frame with whatever byte follows
    (0x70, 0xFE seen): refused as cut short, 9 of 46 frames, and a pneumonia study went ROUTINE."""
    ds = encoded[JPEGLSLossless]
    codestream = frame_of(ds).rstrip(b"\x00")
    comment = b"\xff\xfe\x00\x03x" if len(codestream) % 2 == 0 else b"\xff\xfe\x00\x04xy"
    odd = codestream[:2] + comment + codestream[2:]  # SOI, a comment segment making the length odd, the rest
    assert len(odd) % 2 == 1
    for padding in (b"\x70", b"\xfe", b"\x01"):
        padded = with_frame(ds, odd + padding)
        np.testing.assert_array_equal(dicom_to_grayscale(padded), dicom_to_grayscale(ds))


def test_a_codestream_cut_short_is_still_refused_whatever_its_last_bytes(encoded):
    ds = encoded[JPEGLSLossless]
    codestream = frame_of(ds).rstrip(b"\x00")
    for cut in (0.3, 0.5, 0.9):
        with pytest.raises(UnreadableImageError, match="no end-of-image marker"):
            dicom_to_grayscale(with_frame(ds, codestream[:int(len(codestream) * cut)] + b"\x70\x00"))


def test_a_height_given_in_a_dnl_segment_is_not_a_contradiction(encoded):
    """T.81 allows a frame header of 0 lines, the height following the first scan in DNL."""
    frame = bytearray(frame_of(encoded[JPEGLossless]))
    at = sof_offset(bytes(frame))
    frame[at + 5:at + 7] = b"\x00\x00"
    check_frame(bytes(frame), JPEGLossless, 256, 256, 1)
    with pytest.raises(CodestreamError, match="dataset says 256x128"):
        check_frame(bytes(frame), JPEGLossless, 256, 128, 1)


def test_a_jp2_wrapper_with_large_boxes_before_the_codestream_is_read(encoded):
    frame = frame_of(encoded[JPEG2000Lossless])
    box = struct.pack(">I", 70_008) + b"xml " + b"\x20" * 70_000
    header = jpeg2000_frame_header(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + box + frame)
    assert (header.rows, header.columns) == (256, 256)


def test_rle_of_32_bits_allocated_is_not_refused_before_decoding(encoded):
    """pylibjpeg-rle decodes 32-bit RLE (its panics are caught as reasons); only GDCM's JPEG path aborted."""
    from models.dicom_io import check_encapsulated_frame

    ds = with_frame(encoded[RLELossless], frame_of(encoded[RLELossless]), BitsAllocated=32)
    check_encapsulated_frame(ds, 256, 256, 1)


def under_a_12_bit_header(ds, window: bool = True):
    """`ds` relabelled as the 12-bit plate it was transcoded from: Bits Stored and the window left as they were."""
    relabelled = with_frame(ds, frame_of(ds), BitsAllocated=16, BitsStored=12, HighBit=11)
    if window:
        relabelled.WindowCenter, relabelled.WindowWidth = 2048, 4096
    else:
        for keyword in ("WindowCenter", "WindowWidth"):
            if keyword in relabelled:
                delattr(relabelled, keyword)
    return relabelled


@pytest.mark.parametrize("syntax, bits", [(JPEG2000Lossless, 8), (JPEG2000Lossless, 10), (JPEGLSLossless, 8),
                                          (JPEGLosslessSV1, 8)])
def test_a_codestream_of_lower_precision_than_bits_stored_under_its_window_is_refused(image, syntax, bits):
    """A transcoder that rescaled a 12-bit plate to 8 or 10 bits but left Bits Stored 12 and the 12-bit
    window: shown at 0-0.05 grey, 40 of 40 normal plates were scored high_suspicion, URGENT."""
    transcoded = under_a_12_bit_header(make_cxr_dataset(image, size=(256, 256), bits_stored=bits,
                                                        transfer_syntax=syntax))
    with pytest.raises(UnreadableImageError, match=f"^codestream sample precision {bits} is below Bits Stored 12"):
        dicom_to_grayscale(transcoded)


def test_a_codestream_of_lower_precision_is_accepted_where_it_is_displayed_as_its_values_say(image):
    """J2K precision 12 under Bits Stored 16 (encoders that write the depth the data use: pydicom saw 14 under 16)
    with a window set for those values shows the plate as it is, and without a window the full range of the
    values is shown whatever Bits Stored says: neither is refused."""
    reference = make_cxr_dataset(image, size=(256, 256), transfer_syntax=JPEG2000Lossless)
    overstated = with_frame(reference, frame_of(reference), BitsStored=16, HighBit=15)
    np.testing.assert_array_equal(dicom_to_grayscale(overstated), dicom_to_grayscale(reference))
    eight_bit = make_cxr_dataset(image, size=(256, 256), bits_stored=8, transfer_syntax=JPEG2000Lossless)
    del eight_bit.WindowCenter, eight_bit.WindowWidth
    np.testing.assert_allclose(dicom_to_grayscale(under_a_12_bit_header(eight_bit, window=False)),
                               dicom_to_grayscale(eight_bit), atol=1e-6)
