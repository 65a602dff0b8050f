import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from models.dicom_io import dicom_to_grayscale
from models.errors import PHOTOMETRIC_INTERPRETATIONS, UnreadableImageError, quoted_orientation, quoted_term, quoted_uid
from models.preprocess import reduce_to_source
from worker.samples import encode, make_cxr_dataset


@pytest.fixture(scope="module")
def image(pneumoniamnist):
    return pneumoniamnist["test_images"][11]


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("bits", [12, 16])
def test_display_image_reduces_back_to_the_source(image, photometric, bits):
    ds = make_cxr_dataset(image, photometric=photometric, bits_stored=bits, size=(560, 560))
    display = dicom_to_grayscale(ds)
    assert display.dtype == np.float32 and display.min() >= 0 and display.max() <= 1
    assert np.abs(reduce_to_source(display).astype(int) - image.astype(int)).max() <= 2


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLossless])
def test_lossless_encodings_decode_to_the_same_pixels(image, syntax):
    reference = dicom_to_grayscale(make_cxr_dataset(image, size=(256, 256)))
    encoded = make_cxr_dataset(image, size=(256, 256), transfer_syntax=syntax)
    np.testing.assert_allclose(dicom_to_grayscale(encoded), reference, atol=1e-6)


def test_missing_pixel_data_is_refused(image):
    ds = make_cxr_dataset(image, size=(256, 256))
    del ds.PixelData
    with pytest.raises(UnreadableImageError, match="no PixelData"):
        dicom_to_grayscale(ds)


def test_multi_frame_is_refused(image):
    ds = make_cxr_dataset(image, size=(256, 256))
    ds.NumberOfFrames = 3
    with pytest.raises(UnreadableImageError, match="multi-frame"):
        dicom_to_grayscale(ds)


@pytest.mark.parametrize("rows,cols,reason", [(16, 16, "image size 16x16 outside"),
                                               (256, 2048, "aspect ratio of 256x2048")])
def test_absurd_dimensions_are_refused(image, rows, cols, reason):
    ds = make_cxr_dataset(image, size=(256, 256))
    ds.Rows, ds.Columns = rows, cols
    with pytest.raises(UnreadableImageError, match=reason):
        dicom_to_grayscale(ds)


def test_truncated_pixel_data_is_refused(image):
    ds = make_cxr_dataset(image, size=(256, 256))
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(UnreadableImageError, match="decoded"):
        dicom_to_grayscale(ds)


@pytest.mark.parametrize("header, reason", [
    ({"Columns": 250}, "native Pixel Data is 131072 bytes, 128000 expected for 256x250 pixels"),
    ({"Rows": 128}, "native Pixel Data is 131072 bytes, 65536 expected for 128x256 pixels"),
])
def test_native_pixel_data_longer_than_the_header_says_is_refused(image, header, reason):
    """pydicom cuts the excess with a warning only: a wrong Columns was scored as a sheared picture
    (p 0.98, URGENT), a Rows edited for a crop as the top of the plate."""
    ds = make_cxr_dataset(image, size=(256, 256))
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    with pytest.raises(UnreadableImageError, match=f"^{reason}"):
        dicom_to_grayscale(ds)


def test_two_frames_of_native_pixel_data_without_number_of_frames_are_refused_for_their_length(image):
    """Decoded as one 3-D array, they were refused for an "aspect ratio of 2x256", which names the wrong fault."""
    ds = make_cxr_dataset(image, size=(256, 256))
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(UnreadableImageError, match="^native Pixel Data is 262144 bytes, 131072 expected"):
        dicom_to_grayscale(ds)


def test_one_padding_byte_after_odd_length_native_pixel_data_is_accepted(image):
    ds = make_cxr_dataset(image, bits_stored=8, size=(255, 255))
    padded = make_cxr_dataset(image, bits_stored=8, size=(255, 255))
    padded.PixelData = padded.PixelData + b"\x00"
    np.testing.assert_array_equal(dicom_to_grayscale(padded), dicom_to_grayscale(ds))


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")  # the test writes the bad values on purpose
def test_reasons_repeat_coded_values_only(image):
    """With validation off a CS element can hold any text, a patient's name included."""
    ds = make_cxr_dataset(image, size=(256, 256))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(UnreadableImageError, match="PhotometricInterpretation PALETTE COLOR$"):
        dicom_to_grayscale(ds)
    ds.PhotometricInterpretation = "Doe^Jane"
    with pytest.raises(UnreadableImageError) as refused:
        dicom_to_grayscale(ds)
    assert "Doe" not in str(refused.value)  # pydicom's decoder refuses it first; either way it is not repeated


@pytest.mark.parametrize("value, shown", [
    ("MONOCHROME2", "MONOCHROME2"), ("RGB", "RGB"), ("PALETTE COLOR", "PALETTE COLOR"), (" ybr_full ", "YBR_FULL"),
    ("Doe^Jane", "(non-standard value)"), ("DOE JANE", "(non-standard value)"), ("1234567", "(non-standard value)"),
    ("MONOCHROME2 EXTRA LONG", "(non-standard value)"), ("", "(non-standard value)"),
])
def test_quoted_term_repeats_the_element_s_defined_terms_only(value, shown):
    """The CS repertoire alone (capitals, digits, 16 characters) let a record number or a short name through."""
    assert quoted_term(value, PHOTOMETRIC_INTERPRETATIONS) == shown


@pytest.mark.parametrize("value, shown", [("L", "L"), ("fl", "FL"), ("AFL", "AFL"), ("DOE", "(non-standard value)"),
                                          ("X", "(non-standard value)"), ("LFAP", "(non-standard value)")])
def test_quoted_orientation(value, shown):
    assert quoted_orientation(value) == shown


@pytest.mark.parametrize("value, shown", [
    ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.50"), ("1.2.x", "(non-standard value)"),
    ("1." + "2" * 70, "(non-standard value)"), ("unknown", "(non-standard value)"),
])
def test_quoted_uid(value, shown):
    assert quoted_uid(value) == shown


def raw_element(ds, keyword: str, vr: str, value: bytes) -> None:
    """Put `value` into `ds` as if read from a file, bypassing pydicom's validation on assignment."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement

    tag = tag_for_keyword(keyword)
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def test_empty_window_and_rescale_count_as_absent(image):
    """CR sends them as type 3 (optional); an empty one must not cost the study its result."""
    reference = make_cxr_dataset(image, size=(256, 256))
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
        if keyword in reference:
            del reference[keyword]
    ds = make_cxr_dataset(image, size=(256, 256))
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "NumberOfFrames"):
        raw_element(ds, keyword, "IS" if keyword == "NumberOfFrames" else "DS", b"")
    np.testing.assert_array_equal(dicom_to_grayscale(ds), dicom_to_grayscale(reference))


@pytest.mark.parametrize("value", [b"0,139\\0,139", b"0.139", b"Doe^Jane"])
def test_a_garbled_pixel_spacing_is_passed_over_not_refused(image, value):
    """Optional for CR and read only to find non-square pixels: comma decimals, one value or text
    leave the pixels square, as before the spacing was read, instead of failing the image."""
    reference = make_cxr_dataset(image, size=(256, 256))
    ds = make_cxr_dataset(image, size=(256, 256))
    raw_element(ds, "PixelSpacing", "DS", value)
    np.testing.assert_array_equal(dicom_to_grayscale(ds), dicom_to_grayscale(reference))


@pytest.mark.parametrize("keyword, vr", [("WindowCenter", "DS"), ("WindowWidth", "DS"), ("RescaleSlope", "DS"),
                                         ("RescaleIntercept", "DS"), ("NumberOfFrames", "IS")])
def test_garbled_numbers_are_refused_without_repeating_them(image, keyword, vr):
    ds = make_cxr_dataset(image, size=(256, 256))
    if keyword.startswith("Rescale"):
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    raw_element(ds, keyword, vr, b"Doe^Jane")
    with pytest.raises(UnreadableImageError, match=f"^invalid {keyword}$"):
        dicom_to_grayscale(ds)


def test_rescale_is_applied(image):
    """Slope 2, intercept -100 move the stored values; the default linear window sees the same picture."""
    plain = make_cxr_dataset(image, size=(256, 256))
    for keyword in ("WindowCenter", "WindowWidth"):
        del plain[keyword]
    rescaled = make_cxr_dataset(image, size=(256, 256))
    for keyword in ("WindowCenter", "WindowWidth"):
        del rescaled[keyword]
    rescaled.RescaleSlope, rescaled.RescaleIntercept = 2, -100
    np.testing.assert_allclose(dicom_to_grayscale(rescaled), dicom_to_grayscale(plain), atol=1e-6)


def test_window_of_width_one_is_a_threshold(image):
    """PS3.3 C.11.2.1.2: with width 1, x <= c - 0.5 is the minimum and anything above the maximum."""
    ds = make_cxr_dataset(image, size=(256, 256))
    stored = ds.pixel_array.astype(np.float64)
    ds.WindowCenter, ds.WindowWidth = float(np.median(stored)) + 0.5, 1
    display = dicom_to_grayscale(ds)
    assert np.isfinite(display).all()
    np.testing.assert_array_equal(display, (stored > np.median(stored)).astype(np.float32))


def voi_lut(ds, descriptor, data):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            del ds[keyword]
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.LUTData = [int(v) for v in data]
    ds.VOILUTSequence = Sequence([item])
    return ds


def test_voi_lut_clips_its_input_to_the_mapped_range_and_scales_by_its_bit_depth(image):
    """PS3.3 C.11.2.1.1: inputs below the first mapped value take the first entry, above the last
    the last one; 8-bit entries are divided by 255. 12-bit input, 2048 entries from 1024."""
    ds = voi_lut(make_cxr_dataset(image, size=(256, 256)), [2048, 1024, 8],
                 np.rint(np.arange(2048) / 2047 * 255))
    stored = ds.pixel_array.astype(np.float64)
    expected = np.rint(np.clip(stored - 1024, 0, 2047) / 2047 * 255) / 255
    np.testing.assert_allclose(dicom_to_grayscale(ds), expected, atol=1e-6)


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_whose_entries_exceed_its_declared_bits_is_scaled_by_their_real_depth(image, vr):
    """Descriptor 4096\\0\\8 with entries up to 4095: divided by 255 and clipped, 96% of the plate was white and
    a normal scored 0.999, URGENT; DCMTK (dcm2pnm) shows it as the descriptor 4096\\0\\12 that its entries fit."""
    ramp = np.clip(np.rint(np.linspace(-0.1, 1.1, 4096) * 4095), 0, 4095)
    as_declared = voi_lut(make_cxr_dataset(image, size=(256, 256)), [4096, 0, 12], ramp)
    understated = voi_lut(make_cxr_dataset(image, size=(256, 256)), [4096, 0, 8], ramp)
    if vr == "OW":
        understated.VOILUTSequence[0].LUTData = ramp.astype("<u2").tobytes()
        understated.VOILUTSequence[0]["LUTData"].VR = "OW"
    np.testing.assert_array_equal(dicom_to_grayscale(understated), dicom_to_grayscale(as_declared))


def test_voi_lut_whose_data_does_not_match_its_descriptor_is_refused(image):
    ds = voi_lut(make_cxr_dataset(image, size=(256, 256)), [4096, 0, 16], np.arange(100))
    with pytest.raises(UnreadableImageError, match=r"VOI LUT Data does not match its descriptor \(100 entries, 4096"):
        dicom_to_grayscale(ds)


def modality_lut(ds, descriptor, data: bytes | list[int]):
    """A Modality LUT Sequence of one item; bytes become OW (as a Part-10 file carries it), a list US."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.LUTDescriptor = descriptor
    item.ModalityLUTType = "US"
    item.add(DataElement(0x00283006, "OW" if isinstance(data, bytes) else "US", data))
    ds.ModalityLUTSequence = Sequence([item])
    for keyword in ("WindowCenter", "WindowWidth"):
        del ds[keyword]
    return ds


@pytest.mark.parametrize("packing", ["8-bit entries packed two to a word (OW)", "8-bit entries one to a word (OW)",
                                     "16-bit entries (US)"])
def test_modality_lut_clips_its_input_to_the_mapped_range(image, packing):
    """PS3.3 C.11.1.1.1: stored values below the first mapped one take the first entry, above the last
    the last one. 12-bit input, 2048 entries from 1024. pydicom 3.0 could not read the packed LUT
    (struct.error), so such a CR was failed."""
    ds = make_cxr_dataset(image, size=(256, 256))
    table = np.rint(np.arange(2048) / 2047 * 255).astype(np.uint8)
    data = {"8-bit entries packed two to a word (OW)": table.tobytes(),
            "8-bit entries one to a word (OW)": table.astype("<u2").tobytes(),
            "16-bit entries (US)": [int(v) for v in table]}[packing]
    stored = ds.pixel_array.astype(np.int64)
    modality_lut(ds, [2048, 1024, 8 if packing.startswith("8") else 16], data)
    expected = table[np.clip(stored - 1024, 0, 2047)].astype(np.float64)
    expected = (expected - expected.min()) / (expected.max() - expected.min())  # no window: the full range
    np.testing.assert_allclose(dicom_to_grayscale(ds), expected, atol=1e-6)


def test_modality_lut_whose_data_does_not_match_its_descriptor_is_refused(image):
    ds = modality_lut(make_cxr_dataset(image, size=(256, 256)), [4096, 0, 16], list(range(100)))
    with pytest.raises(UnreadableImageError, match=r"Modality LUT Data does not match its descriptor \(100 entries"):
        dicom_to_grayscale(ds)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_padding_pixels_are_black_and_the_rest_uses_the_anatomy_range(image, photometric):
    """PS3.3 C.7.5.1.1.2, no window: the other pixels display as if the padding were not there."""
    ds = make_cxr_dataset(image, size=(256, 256), photometric=photometric)
    del ds.WindowCenter, ds.WindowWidth
    stored = ds.pixel_array.copy()
    rest = stored[20:].astype(np.float64)
    expected = (rest - rest.min()) / (rest.max() - rest.min())
    stored[:20] = 0xFFFF
    ds.BitsStored, ds.HighBit, ds.PixelPaddingValue, ds.PixelData = 16, 15, 0xFFFF, stored.tobytes()
    display = dicom_to_grayscale(ds)
    assert (display[:20] == 0).all()
    np.testing.assert_allclose(display[20:], 1 - expected if photometric == "MONOCHROME1" else expected, atol=1e-6)


def test_a_padding_value_written_in_whole_words_over_12_bit_pixels_is_recognised(image):
    """0xFFFF fills 16-bit words around 12-bit pixels, and the decoder cuts every pixel to Bits Stored
    (0x0FFF): the padding is found in the words as written, or the border joins the range and greys
    the image; a real pixel at 4095 (a lead marker) stays white, not taken for padding."""
    ds = make_cxr_dataset(image, size=(256, 256), bits_stored=12)
    del ds.WindowCenter, ds.WindowWidth
    stored = ds.pixel_array.copy()
    stored[100:110, 100:110] = 0x0FFF  # the marker: the brightest value 12 bits hold
    rest = stored[20:].astype(np.float64)
    expected = (rest - rest.min()) / (rest.max() - rest.min())
    stored[:20] = 0xFFFF
    ds.PixelPaddingValue, ds.PixelData = 0xFFFF, stored.tobytes()
    display = dicom_to_grayscale(ds)
    assert (display[:20] == 0).all() and (display[100:110, 100:110] == 1).all()
    np.testing.assert_allclose(display[20:], expected, atol=1e-6)


@pytest.mark.parametrize("window", [False, True])
def test_a_signed_padding_value_below_12_bit_pixels_is_recognised(image, window):
    """-32768 (0x8000) fills the 16-bit words around signed 12-bit pixels; the decoder cuts and sign-extends
    every pixel from High Bit, so the padding came back as 0, a mid-grey pixel: the border was shown grey
    instead of black (and counted in the range). As for unsigned whole-word padding, it is looked for in
    the words as written, and a real pixel at 0 stays image."""
    ds = make_cxr_dataset(image, size=(256, 256), bits_stored=12)
    if not window:
        del ds.WindowCenter, ds.WindowWidth
    else:
        ds.WindowCenter = 0
    stored = ds.pixel_array.astype(np.int32) - 2048  # signed 12-bit: -2048..2047
    stored[100:110, 100:110] = 0  # a real pixel at the value the cut padding would take
    stored[:20] = 0  # a border inside the anatomy's range: the picture the rest must show
    ds.PixelRepresentation = 1
    ds.PixelData = stored.astype("<i2").tobytes()
    expected = dicom_to_grayscale(ds)[20:]
    stored[:20] = -32768
    ds.add_new(0x00280120, "SS", -32768)  # Pixel Padding Value, in the pixels' own representation
    ds.PixelData = stored.astype("<i2").tobytes()
    display = dicom_to_grayscale(ds)
    assert (display[:20] == 0).all() and (display[100:110, 100:110] > 0).all()
    np.testing.assert_allclose(display[20:], expected, atol=1e-6)


@pytest.mark.dcmtk
@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEGLosslessSV1])
def test_whole_word_padding_is_recognised_in_lossless_compressed_pixels(image, syntax):
    """The same plate losslessly compressed displays as it does uncompressed. RLE and JPEG lossless
    give the padding back cut to Bits Stored (4095), JPEG-LS whole (65535); left in either way it
    stretched the range and dimmed the picture (a normal plate went from ROUTINE to URGENT)."""
    ds = make_cxr_dataset(image, size=(256, 256), bits_stored=12)
    del ds.WindowCenter, ds.WindowWidth
    stored = ds.pixel_array.copy()
    stored[:20] = 0xFFFF
    ds.PixelPaddingValue, ds.PixelData = 0xFFFF, stored.tobytes()
    native = dicom_to_grayscale(ds)
    display = dicom_to_grayscale(encode(ds, syntax))
    assert (display[:20] == 0).all()
    np.testing.assert_allclose(display, native, atol=1e-6)


def _with_high_bits(ds):
    """Random values in bits 12-15 above 12 stored bits: not image (PS3.5 8.1.1), ignored by any receiver."""
    stored = ds.pixel_array.copy()
    noise = np.random.default_rng(0).integers(0, 16, stored.shape).astype(np.uint16) << 12
    ds.PixelData = (stored | noise).tobytes()
    return ds


def _jpeg2000_of_precision_16(ds):
    """A lossless JPEG 2000 codestream that keeps all 16 bits of each word, as some encoders write it."""
    import openjpeg
    from pydicom.encaps import encapsulate

    words = np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns)
    ds.PixelData = encapsulate([openjpeg.encode(words, bits_stored=16)])
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    return ds


@pytest.mark.dcmtk
@pytest.mark.parametrize("encoding", ["jpeg-ls", "jpeg2000"])
def test_bits_above_bits_stored_are_not_image_whatever_the_encoding(image, encoding):
    """DCMTK's dcmcjpls (raw mode) and a JPEG 2000 codestream of precision 16 keep the bits above Bits Stored,
    and the decoders gave them back: the plate displayed as noise (a normal image scored URGENT), while
    the same file sent native displays as its 12 bits."""
    ds = make_cxr_dataset(image, size=(256, 256), bits_stored=12)
    reference = dicom_to_grayscale(ds)
    dirty = _with_high_bits(ds)
    np.testing.assert_allclose(dicom_to_grayscale(dirty), reference, atol=1e-6)  # pydicom cuts native words itself
    encoded = encode(dirty, JPEGLSLossless) if encoding == "jpeg-ls" else _jpeg2000_of_precision_16(dirty)
    assert int(encoded.pixel_array.max()) > 4095, "not a test: the decoder cut the words itself"
    np.testing.assert_allclose(dicom_to_grayscale(encoded), reference, atol=1e-6)


@pytest.mark.dcmtk
def test_signed_pixels_from_jpeg_ls_keep_their_sign(image):
    """Signed 12-bit pixels written without sign extension (-5 as 0x0FFB: bits above High Bit are not part of
    the value) came back from JPEG-LS as 0 to 4095, the negative half wrapped to the top."""
    ds = make_cxr_dataset(image, size=(256, 256), bits_stored=12)
    del ds.WindowCenter, ds.WindowWidth
    signed = ds.pixel_array.astype(np.int32) - 2048
    ds.PixelRepresentation, ds.PixelData = 1, (signed & 0x0FFF).astype(np.uint16).tobytes()
    reference = dicom_to_grayscale(ds)
    encoded = encode(ds, JPEGLSLossless)
    assert int(encoded.pixel_array.min()) >= 0, "not a test: the decoder sign-extended the pixels itself"
    np.testing.assert_allclose(dicom_to_grayscale(encoded), reference, atol=1e-6)


@pytest.mark.parametrize("window", [False, True])
def test_an_image_that_is_all_padding_is_refused(image, window):
    ds = make_cxr_dataset(image, size=(256, 256))
    if not window:
        del ds.WindowCenter, ds.WindowWidth
    ds.PixelPaddingValue, ds.PixelPaddingRangeLimit = 0, 4095
    with pytest.raises(UnreadableImageError, match="every pixel is padding"):
        dicom_to_grayscale(ds)


def test_blank_share_counts_image_pixels_only(image):
    """99% padding around a real picture is not blank; the same picture 99.9% one level is."""
    from models.dicom_io import check_not_blank

    display = np.zeros((100, 100), np.float32)
    display[:5, :10] = np.linspace(0, 1, 50).reshape(5, 10)
    padding = np.ones_like(display, dtype=bool)
    padding[:5, :10] = False
    check_not_blank(display, padding)
    with pytest.raises(UnreadableImageError, match=r"blank as displayed \(99\.5% of pixels black\)"):
        check_not_blank(display)
    display[:] = 0.5
    display[0, :5] = 1.0
    with pytest.raises(UnreadableImageError, match=r"\(99\.9% of pixels grey level 128/255\)"):
        check_not_blank(display)


@pytest.mark.parametrize("orientation, stored", [(["F", "R"], lambda a: np.rot90(a)),
                                                 (["H", "L"], lambda a: np.rot90(a, -1)),
                                                 (["R", "H"], lambda a: np.rot90(a, 2))])
def test_patient_orientation_turns_a_non_square_picture_upright(image, orientation, stored):
    ds = make_cxr_dataset(image, size=(448, 512))
    upright = dicom_to_grayscale(ds)
    pixels = np.ascontiguousarray(stored(ds.pixel_array))
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData, ds.PatientOrientation = pixels.tobytes(), orientation
    np.testing.assert_array_equal(dicom_to_grayscale(ds), upright)


def test_detector_refuses_a_dicom_whose_orientation_is_not_frontal(tmp_path, image):
    """Outside the worker (which skips it first) the detector's DICOM path refuses it with the reason."""
    from models.detector import PneumoniaDetector
    from worker.samples import save

    ds = make_cxr_dataset(image, size=(256, 256))
    ds.PatientOrientation = ["A", "F"]
    with pytest.raises(UnreadableImageError, match=r"^patient orientation A\\F is not a frontal chest"):
        PneumoniaDetector().predict(save(ds, tmp_path / "lateral.dcm"))


@pytest.mark.parametrize("src, dst", [(512, 256), (100, 28), (97, 40)])
def test_area_resample_uses_the_contract_s_area_weights(src, dst):
    from models.dicom_io import area_resample
    from models.preprocess import area_weights

    rng = np.random.default_rng(src)
    image = rng.random((30, src)).astype(np.float32)
    np.testing.assert_allclose(area_resample(image, dst, axis=1), image @ area_weights(src, dst).T, atol=1e-6)
    np.testing.assert_allclose(area_resample(image.T, dst, axis=0), area_weights(src, dst) @ image.T, atol=1e-6)


@pytest.mark.parametrize("strip", [1, 7, 256])
def test_area_resample_does_not_depend_on_its_strip(strip):
    from models.dicom_io import area_resample

    image = np.random.default_rng(3).random((300, 97)).astype(np.float32)
    for axis, size in ((0, 151), (1, 40)):
        assert np.array_equal(area_resample(image, size, axis=axis, strip=strip), area_resample(image, size, axis=axis, strip=10**6))


def test_area_resample_peak_memory_stays_near_the_image_size():
    """Whole-plate float64 running sums took about 40 bytes a pixel (2.9 GiB for an 8192-square plate
    with 0.1 x 0.2 mm pixels, at the worker's 3 GiB cap); strips keep the extra to the output's size."""
    import tracemalloc

    from models.dicom_io import area_resample

    image = np.random.default_rng(4).random((2048, 2048)).astype(np.float32)
    tracemalloc.start()
    try:
        resampled = area_resample(image, 1024, axis=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert resampled.shape == (2048, 1024) and resampled.dtype == np.float32
    assert peak < 2 * image.nbytes, peak / image.nbytes  # the output is half the image; the old way took about 8 times


@pytest.mark.parametrize("photometric, shape", [("MONOCHROME2", "INVERSE"), ("MONOCHROME1", "IDENTITY")])
def test_a_presentation_lut_shape_that_contradicts_the_photometric_interpretation_is_refused(image, photometric, shape):
    """DCMTK follows the shape, pydicom and web viewers the photometric interpretation: the two pictures
    are negatives of each other, and scoring either one turned normal plates into high suspicion."""
    ds = make_cxr_dataset(image, photometric=photometric, size=(256, 256))
    ds.PresentationLUTShape = shape
    with pytest.raises(UnreadableImageError, match=f"^Photometric Interpretation {photometric} contradicts "
                                                   f"Presentation LUT Shape {shape}"):
        dicom_to_grayscale(ds)


@pytest.mark.parametrize("photometric, shape", [("MONOCHROME2", "INVERSE"), ("MONOCHROME1", "IDENTITY")])
def test_a_site_may_follow_either_side_of_a_contradicting_presentation_lut_shape(image, photometric, shape):
    """For a modality known to write one of the two wrongly: following the shape shows what DCMTK shows."""
    ds = make_cxr_dataset(image, photometric=photometric, size=(256, 256))
    as_photometric = dicom_to_grayscale(ds)
    ds.PresentationLUTShape = shape
    np.testing.assert_array_equal(dicom_to_grayscale(ds, lut_shape_conflict="follow_photometric"), as_photometric)
    np.testing.assert_allclose(dicom_to_grayscale(ds, lut_shape_conflict="follow_shape"), 1.0 - as_photometric, atol=1e-6)


@pytest.mark.parametrize("photometric, shape", [("MONOCHROME2", "IDENTITY"), ("MONOCHROME1", "INVERSE"), ("MONOCHROME1", "")])
def test_a_consistent_presentation_lut_shape_changes_nothing(image, photometric, shape):
    """MONOCHROME1 with INVERSE (the DX pair) is inverted once, by the photometric interpretation."""
    ds = make_cxr_dataset(image, photometric=photometric, size=(256, 256))
    reference = dicom_to_grayscale(ds)
    ds.PresentationLUTShape = shape
    np.testing.assert_array_equal(dicom_to_grayscale(ds), reference)


def test_a_high_bit_other_than_bits_stored_less_one_is_refused(image):
    """pydicom keeps the low Bits Stored bits: data in the high bits decoded as noise and was scored."""
    ds = make_cxr_dataset(image, bits_stored=12, size=(256, 256))
    ds.HighBit = 15
    with pytest.raises(UnreadableImageError, match="^High Bit 15 with Bits Stored 12"):
        dicom_to_grayscale(ds)


def test_non_square_pixels_give_the_physical_aspect(image):
    """256 rows x 512 columns of pixels twice as tall as wide is a square picture."""
    ds = make_cxr_dataset(image, size=(256, 512))
    ds.PixelSpacing = [0.278, 0.139]
    display = dicom_to_grayscale(ds)
    assert display.shape == (256, 256) and display.dtype == np.float32
    assert np.abs(reduce_to_source(display).astype(int) - image.astype(int)).max() <= 3


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_the_in_place_window_equals_its_formula_to_the_bit(function):
    """`_window` overwrites its input to save the worker a full-size temporary per step (8192^2: 256 MiB
    each); it must give exactly the values of the formulas of PS3.3 C.11.2.1.2 computed out of place."""
    from models.dicom_io import _window

    values = np.random.default_rng(0).uniform(-500, 5000, (64, 64)).astype(np.float32)
    c, w = np.float32(2047.3), np.float32(3001.7)
    expected = {
        "LINEAR": np.clip(((values - (c - np.float32(0.5))) / (w - np.float32(1.0))) + np.float32(0.5), 0.0, 1.0),
        "LINEAR_EXACT": np.clip((values - (c - w / 2)) / w, 0.0, 1.0),
        "SIGMOID": 1.0 / (1.0 + np.exp(np.float32(-4.0) * (values - c) / w)),
    }[function]
    got = _window(values.copy(), float(c), float(w), function)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_a_picture_too_long_once_its_pixels_are_square_is_refused_with_its_reason(image):
    """1024 x 256 stored (4:1, accepted) with pixels 0.15 mm tall and 0.139 mm wide is 4.3:1 as a
    picture: preprocessing refused it later, and the worker recorded an 'internal error'."""
    ds = make_cxr_dataset(image, size=(1024, 256))
    ds.PixelSpacing = [0.15, 0.139]
    with pytest.raises(UnreadableImageError, match=r"aspect ratio of 1024x237 \(square pixels\) exceeds 4"):
        dicom_to_grayscale(ds)


@pytest.mark.parametrize("sequence", ["VOILUTSequence", "ModalityLUTSequence"])
def test_an_empty_lut_sequence_counts_as_absent(image, sequence):
    """An empty VOI or Modality LUT Sequence is no LUT, as for pydicom and viewers (it was refused)."""
    from pydicom.sequence import Sequence

    ds = make_cxr_dataset(image, size=(256, 256))
    reference = dicom_to_grayscale(ds)
    setattr(ds, sequence, Sequence([]))
    np.testing.assert_array_equal(dicom_to_grayscale(ds), reference)


def corrupt_copy(image, tmp_path, tag: bytes, vr: bytes, name: str):
    from worker.samples import encode

    path = tmp_path / name
    ds = make_cxr_dataset(image, size=(256, 256))
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    encode(ds, "1.2.840.10008.1.2.1").save_as(path, enforce_file_format=True)
    raw = bytearray(path.read_bytes())
    at = raw.index(tag)  # explicit VR little endian: the VR follows the tag
    raw[at + 4:at + 6] = vr
    path.write_bytes(bytes(raw))
    return path


def test_a_corrupt_element_the_display_reads_is_refused_as_unreadable(image, tmp_path):
    """pydicom decodes values lazily: an unknown VR in Rescale Intercept raised NotImplementedError from
    inside the display chain, past the detector's promise that every refusal is UnreadableImageError."""
    from models.dicom_io import read_dicom

    path = corrupt_copy(image, tmp_path, b"\x28\x00\x52\x10", b"\x44\xa4", "corrupt.dcm")
    with pytest.raises(UnreadableImageError, match=r"a DICOM element could not be read \(NotImplementedError\)"):
        dicom_to_grayscale(read_dicom(str(path)))


def test_a_private_element_pydicom_misreads_does_not_refuse_the_plate(image, tmp_path):
    """A vendor's private element whose length pydicom's private dictionary does not expect (UN after
    an implicit-VR hop) is never read for display, so it must not refuse the image."""
    from pydicom.tag import Tag

    from models.dicom_io import read_dicom

    path = tmp_path / "private.dcm"
    ds = make_cxr_dataset(image, size=(256, 256))
    reference = dicom_to_grayscale(ds)
    ds.add_new(Tag(0x0027, 0x0010), "LO", "GEMS_IMAG_01")
    ds.add_new(Tag(0x0027, 0x1006), "UN", b"12")  # the dictionary says SL, 4 bytes
    encode(ds, "1.2.840.10008.1.2.1").save_as(path, enforce_file_format=True)
    np.testing.assert_array_equal(dicom_to_grayscale(read_dicom(str(path))), reference)


def test_a_padding_range_cut_apart_by_a_codec_masks_nothing(image):
    """0xF000-0xFFFF around 12-bit pixels, RLE-compressed: cut to 12 bits the range would be 0-4095,
    every pixel, and the plate was refused as all padding."""
    from models.dicom_io import padding_mask

    ds = encode(make_cxr_dataset(image, size=(256, 256), bits_stored=12), RLELossless)
    ds.PixelPaddingValue, ds.PixelPaddingRangeLimit = 0xFFFF, 0xF000
    assert padding_mask(ds.pixel_array, ds) is None


def _ten_bit_under_a_twelve_bit_window(image, photometric):
    """10-bit pixels declared and windowed as 12-bit ones, as a JPEG-LS or SV1 codestream of precision 16
    carries them from a 10-bit detector: nothing in the header tells the two depths apart."""
    ds = make_cxr_dataset(image, size=(256, 256), bits_stored=12, photometric=photometric)
    ds.PixelData = (ds.pixel_array >> 2).astype(np.uint16).tobytes()
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    return ds



DEPTH_REASON = r"image nearly (black|white) as displayed \(every pixel in the (darkest|brightest) quarter of the grey range\)"


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_every_normal_plate_shown_in_a_quarter_of_the_grey_range_is_refused(pneumoniamnist, photometric):
    """Shown in a quarter of the grey range (black, or white as MONOCHROME1), 40 of 40 normal plates scored
    URGENT; a radiologist sees no picture to read and no triage should be made of it."""
    labels = pneumoniamnist["test_labels"].reshape(-1)
    for picture in pneumoniamnist["test_images"][labels == 0][:40]:
        with pytest.raises(UnreadableImageError, match=DEPTH_REASON):
            dicom_to_grayscale(_ten_bit_under_a_twelve_bit_window(picture, photometric))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_pixels_one_bit_short_of_their_header_are_scored(pneumoniamnist, photometric):
    """11-bit pixels under a 12-bit window fill half the grey range: a percentile rule that refused them took
    266 of 390 pneumonias out of triage (a review's count); they over-call normals a little and are scored."""
    for picture in pneumoniamnist["test_images"][:80]:
        ds = make_cxr_dataset(picture, size=(128, 128), bits_stored=12, photometric=photometric)
        ds.PixelData = (ds.pixel_array >> 1).astype(np.uint16).tobytes()
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        dicom_to_grayscale(ds)


def test_pixels_a_quarter_of_their_depth_under_a_window_that_fits_them_are_scored(image):
    ds = _ten_bit_under_a_twelve_bit_window(image, "MONOCHROME2")
    ds.WindowCenter, ds.WindowWidth = 512, 1024
    assert dicom_to_grayscale(ds).max() > 0.5


def test_a_low_contrast_plate_is_scored(pneumoniamnist):
    """The PneumoniaMNIST image of least contrast (its values span 0.17 of the grey range) sent as it is."""
    images = pneumoniamnist["train_images"].reshape(len(pneumoniamnist["train_images"]), -1)
    flattest = pneumoniamnist["train_images"][int(np.argmin(images.max(1) - images.min(1)))]
    display = dicom_to_grayscale(make_cxr_dataset(flattest, size=(128, 128), bits_stored=12))
    assert display.max() - display.min() < 0.2


def test_no_pneumoniamnist_image_lies_in_an_end_quarter(pneumoniamnist):
    from models.dicom_io import check_not_in_an_end_quarter

    for split in ("train", "val", "test"):
        for picture in pneumoniamnist[f"{split}_images"]:
            check_not_in_an_end_quarter(picture.astype(np.float32) / 255)


def test_padding_takes_no_part_in_the_quarter(image):
    """Padding at the top of 12 bits around 10-bit MONOCHROME1 pixels is painted black: counted, it would let
    a picture wholly in the brightest quarter through."""
    ds = _ten_bit_under_a_twelve_bit_window(image, "MONOCHROME1")
    pixels = ds.pixel_array.copy()
    pixels[:, :8] = 4095
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.PixelPaddingValue = 4095
    with pytest.raises(UnreadableImageError, match=DEPTH_REASON):
        dicom_to_grayscale(ds)
