"""How a stored radiograph is displayed before it reaches the model, through the worker's own path.

Each defective variant is built from a PneumoniaMNIST image (test[3], a normal study) as a Part-10
file and run through `worker.pipeline.analyse_file`: it must score like the clean file made from
the same image, or be refused with a recorded reason. Before these fixes every one of them was
scored silently, most as URGENT.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from worker.pipeline import analyse_file
from worker.samples import make_cxr_dataset, save

NORMAL = 3
"""PneumoniaMNIST test[3]: a normal study (28x28 probability about 0.002, ROUTINE)."""
TOLERANCE = 0.01
"""|probability - clean probability| allowed for a variant that must display like the clean file."""


@pytest.fixture(scope="module")
def normal(test_split) -> np.ndarray:
    images, labels = test_split
    assert labels[NORMAL] == 0
    return images[NORMAL]


def cr(image: np.ndarray, **kw) -> Dataset:
    """A 12-bit CR PA chest, 512x512 unless told otherwise."""
    return make_cxr_dataset(image, **{"size": (512, 512), "bits_stored": 12, **kw})


def outcome_of(ds: Dataset, tmp_path, settings, detectors, name: str = "x.dcm"):
    return analyse_file(save(ds, tmp_path / name), settings, detectors)


@pytest.fixture(scope="module")
def clean_probability(normal, settings, detectors, tmp_path_factory) -> float:
    outcome = outcome_of(cr(normal), tmp_path_factory.mktemp("clean"), settings, detectors)
    assert outcome.status == "done" and outcome.fields["flag"] == "ROUTINE"
    return outcome.fields["probability"]


def assert_scores_like_clean(outcome, clean_probability: float) -> None:
    assert outcome.status == "done", outcome.reason
    assert abs(outcome.fields["probability"] - clean_probability) < TOLERANCE, \
        (outcome.fields["probability"], clean_probability)
    assert outcome.fields["flag"] == "ROUTINE"


# --- 1. VOI LUT and Modality LUT Sequences ------------------------------------------------------

def with_voi_lut(ds: Dataset, descriptor: list[int], data: np.ndarray, vr: str = "US") -> Dataset:
    """Replace the window by a VOI LUT Sequence of one item."""
    del ds.WindowCenter, ds.WindowWidth
    item = Dataset()
    item.LUTDescriptor = descriptor
    values = np.asarray(data, dtype=np.uint16)
    item.add(DataElement(0x00283006, vr, values.astype("<u2").tobytes() if vr == "OW" else values.tolist()))
    ds.VOILUTSequence = Sequence([item])
    return ds


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_with_8_bit_entries_on_12_bit_data_scores_like_the_clean_file(
        tmp_path, normal, settings, detectors, clean_probability, vr):
    """Descriptor 4096\\0\\8: pydicom's apply_voi wrapped every input >= 256 (P 0.925, URGENT)."""
    ds = with_voi_lut(cr(normal), [4096, 0, 8], np.rint(np.arange(4096) / 4095 * 255), vr)
    assert_scores_like_clean(outcome_of(ds, tmp_path, settings, detectors), clean_probability)


def test_voi_lut_declaring_16_bits_with_12_bit_entries_is_scaled_by_its_real_depth(
        tmp_path, normal, settings, detectors, clean_probability):
    """Descriptor 4096\\0\\16 with entries 0..4095 (Agfa-style): read literally, the display's maximum
    was 0.06 (P 0.975, URGENT); Horos and Cornerstone scale it by the entries' 12 bits."""
    ds = with_voi_lut(cr(normal), [4096, 0, 16], np.arange(4096))
    assert_scores_like_clean(outcome_of(ds, tmp_path, settings, detectors), clean_probability)


@pytest.mark.parametrize("packed", [True, False])
def test_modality_lut_with_8_bit_entries_scores_like_the_clean_file(
        tmp_path, normal, settings, detectors, clean_probability, packed):
    """Descriptor 4096\\0\\8 as OW, the window scaled to the LUT's output. Packed two entries to a word
    (PS3.3 C.11.1.1.1), pydicom could not read it and the study was failed ("Modality LUT could not be
    applied"); one entry to a word it could."""
    ds = cr(normal)
    table = np.rint(np.arange(4096) / 4095 * 255).astype(np.uint8)
    item = Dataset()
    item.LUTDescriptor, item.ModalityLUTType = [4096, 0, 8], "US"
    item.add(DataElement(0x00283006, "OW", table.tobytes() if packed else table.astype("<u2").tobytes()))
    ds.ModalityLUTSequence = Sequence([item])
    ds.WindowCenter, ds.WindowWidth = 2048 * 255 / 4095, 4096 * 255 / 4095
    assert_scores_like_clean(outcome_of(ds, tmp_path, settings, detectors), clean_probability)


# --- 2. Pixel Padding Value ----------------------------------------------------------------------

BORDER = 40
"""Padded columns on each side of the 512-pixel-wide image."""


def bordered(image: np.ndarray, *, photometric: str = "MONOCHROME2", fill=0, signed: bool = False,
             window: bool = False, low: int = 1024, high: int = 4000) -> Dataset:
    """A 16-bit-stored CR whose anatomy spans stored values low..high and whose left and right
    BORDER columns hold `fill` (a value or an array), with or without its window."""
    from worker.samples import upscale

    ds = cr(image, photometric=photometric)
    values = np.rint(low + upscale(image / 255.0, (512, 512)) * (high - low))
    if photometric == "MONOCHROME1":
        values = low + high - values
    values[:, :BORDER] = np.asarray(fill)[..., :BORDER] if np.ndim(fill) else fill
    values[:, -BORDER:] = np.asarray(fill)[..., -BORDER:] if np.ndim(fill) else fill
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, int(signed)
    ds.PixelData = values.astype(np.int16 if signed else np.uint16).tobytes()
    if not window:
        del ds.WindowCenter, ds.WindowWidth
    return ds


def anatomy_black(ds: Dataset) -> int:
    """The stored value that the anatomy's own full range displays black."""
    anatomy = ds.pixel_array[:, BORDER:-BORDER]
    return int(anatomy.max() if ds.PhotometricInterpretation == "MONOCHROME1" else anatomy.min())


def assert_same_score(outcome, reference) -> None:
    assert outcome.status == reference.status == "done", (outcome.reason, reference.reason)
    assert abs(outcome.fields["probability"] - reference.fields["probability"]) < 1e-3, \
        (outcome.fields["probability"], reference.fields["probability"])
    assert outcome.fields["flag"] == reference.fields["flag"]


@pytest.mark.parametrize("photometric, padding, signed", [
    ("MONOCHROME1", 0xFFFF, False),  # the reviewer's case: P 1.0, URGENT
    ("MONOCHROME2", 0xFFFF, False),
    ("MONOCHROME2", -32768, True),
])
def test_padding_outside_the_image_range_takes_no_part_in_the_automatic_range(
        tmp_path, normal, settings, detectors, photometric, padding, signed):
    """No window (type 3 for CR): the full range must be the anatomy's; the padding shows black,
    exactly like the same picture whose border holds the anatomy's own black value."""
    padded = bordered(normal, photometric=photometric, fill=padding, signed=signed)
    padded.PixelPaddingValue = padding
    clean = bordered(normal, photometric=photometric, fill=0, signed=signed)
    clean = bordered(normal, photometric=photometric, fill=anatomy_black(clean), signed=signed)
    assert_same_score(outcome_of(padded, tmp_path, settings, detectors, "p.dcm"),
                      outcome_of(clean, tmp_path, settings, detectors, "c.dcm"))


def test_padding_range_limit_marks_every_value_between_the_two(tmp_path, normal, settings, detectors):
    """Pixel Padding Range Limit: the border holds assorted values 0..100, all padding, in a
    range below the anatomy's (1024..4000); left in, they stretched the range and greyed the chest."""
    fill = np.random.default_rng(0).integers(0, 101, size=(512, 512))
    padded = bordered(normal, fill=fill)
    padded.PixelPaddingValue, padded.PixelPaddingRangeLimit = 100, 0  # either order is allowed
    clean = bordered(normal, fill=anatomy_black(bordered(normal)))
    assert_same_score(outcome_of(padded, tmp_path, settings, detectors, "p.dcm"),
                      outcome_of(clean, tmp_path, settings, detectors, "c.dcm"))


def test_padding_is_shown_black_under_a_window(tmp_path, normal, settings, detectors):
    """With a window, a bright padding value (4095 in MONOCHROME2) would show white: it is black."""
    padded = bordered(normal, fill=4095, window=True)
    padded.PixelPaddingValue = 4095
    clean = bordered(normal, fill=0, window=True)
    assert_same_score(outcome_of(padded, tmp_path, settings, detectors, "p.dcm"),
                      outcome_of(clean, tmp_path, settings, detectors, "c.dcm"))


# --- 3. Blank after windowing --------------------------------------------------------------------

def constant(image: np.ndarray, value: int, **kw) -> Dataset:
    ds = cr(image, **kw)
    ds.PixelData = np.full((512, 512), value, np.uint16).tobytes()
    return ds


@pytest.mark.parametrize("window, photometric, shown", [
    ((2048, 4096), "MONOCHROME2", "grey level"),  # the reviewer's case: P 0.668, URGENT
    ((2048, 4096), "MONOCHROME1", "grey level"),
    ((3000, 100), "MONOCHROME2", "black"),        # below the window
    ((100, 100), "MONOCHROME2", "white"),         # above it
])
def test_a_constant_image_is_refused_with_a_window_too(tmp_path, normal, settings, detectors,
                                                       window, photometric, shown):
    ds = constant(normal, 300, photometric=photometric)
    ds.WindowCenter, ds.WindowWidth = window
    outcome = outcome_of(ds, tmp_path, settings, detectors)
    assert outcome.status == "failed"
    assert outcome.reason.startswith("image is blank as displayed (100.0% of pixels") and shown in outcome.reason


def test_a_window_that_saturates_almost_every_pixel_is_refused(tmp_path, normal, settings, detectors):
    """A real image under a narrow window above 99.7% of its values: all but its brightest 0.3%
    shows black, nothing left to score."""
    ds = cr(normal)
    ds.WindowCenter, ds.WindowWidth = float(np.percentile(ds.pixel_array, 99.7)), 2
    outcome = outcome_of(ds, tmp_path, settings, detectors)
    assert outcome.status == "failed", outcome.fields.get("probability")
    assert outcome.reason.startswith("image is blank as displayed (99.") and outcome.reason.endswith("black)")


def test_a_constant_image_without_a_window_keeps_its_reason(tmp_path, normal, settings, detectors):
    ds = constant(normal, 300)
    del ds.WindowCenter, ds.WindowWidth
    assert (outcome_of(ds, tmp_path, settings, detectors).reason == "image is blank (all pixels equal)")


# --- 4. Patient Orientation ----------------------------------------------------------------------

STORED_AS = {  # how a picture displayed L\F was stored, and the Patient Orientation that says so
    "F\\R": lambda a: np.rot90(a, 1),   # turned 90 degrees anticlockwise
    "R\\H": lambda a: np.rot90(a, 2),   # upside down
    "H\\L": lambda a: np.rot90(a, -1),  # turned 90 degrees clockwise
    "F\\L": lambda a: a.T,              # transposed
    "L\\H": lambda a: a[::-1],          # flipped top to bottom
    "R\\F": lambda a: a[:, ::-1],       # mirrored
}


def stored_as(ds: Dataset, orientation: str) -> Dataset:
    pixels = np.ascontiguousarray(STORED_AS[orientation](ds.pixel_array))
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    ds.PatientOrientation = orientation.split("\\")
    return ds


@pytest.mark.parametrize("orientation", list(STORED_AS))
def test_a_frontal_chest_stored_turned_or_flipped_is_shown_upright(tmp_path, normal, settings, detectors,
                                                                    clean_probability, orientation):
    """The reviewer's case, a normal stored turned 90 degrees, scored 0.144 (URGENT); upside down
    and turned the other way the test split lost 20 to 60 of its calls. Each now scores exactly
    like the upright file."""
    outcome = outcome_of(stored_as(cr(normal), orientation), tmp_path, settings, detectors)
    assert outcome.status == "done", outcome.reason
    assert abs(outcome.fields["probability"] - clean_probability) < 1e-6


@pytest.mark.parametrize("orientation", [["L", "F"], ["LA", "FL"], "", None, ["L", ""], ["", "F"]])
def test_upright_or_absent_orientation_scores_as_before(tmp_path, normal, settings, detectors,
                                                        clean_probability, orientation):
    ds = cr(normal)
    if orientation is not None:
        ds.PatientOrientation = orientation
    outcome = outcome_of(ds, tmp_path, settings, detectors)
    assert outcome.status == "done" and outcome.fields["probability"] == clean_probability


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS:UserWarning")  # the patient's name, on purpose
@pytest.mark.parametrize("orientation, reason", [
    (["A", "F"], "patient orientation A\\F is not a frontal chest orientation"),  # a lateral
    (["P", "H"], "patient orientation P\\H is not a frontal chest orientation"),
    (["L", "R"], "patient orientation L\\R is not a frontal chest orientation"),
    (["F", "H"], "patient orientation F\\H is not a frontal chest orientation"),
    ("F", "patient orientation F has 1 value, 2 expected"),
    (["L", "F", "A"], "patient orientation L\\F\\A has 3 values, 2 expected"),
    (["Doe^Jane", "F"], "patient orientation (non-standard value)\\F is not a frontal chest orientation"),
    (["ZZPHINAME", "F"], "patient orientation (non-standard value)\\F is not a frontal chest orientation"),
])
def test_an_orientation_that_is_not_a_frontal_chest_is_skipped_with_its_reason(
        tmp_path, normal, settings, detectors, orientation, reason):
    ds = cr(normal)
    ds.PatientOrientation = orientation
    outcome = outcome_of(ds, tmp_path, settings, detectors)
    assert (outcome.status, outcome.reason) == ("skipped", reason)


# --- 5. Non-square pixels ------------------------------------------------------------------------

def non_square(image: np.ndarray, size: tuple[int, int], keyword: str, pair) -> Dataset:
    """The picture of `cr(image)` (a 512x512 chest) stored on a grid of `size` with pixels `pair`."""
    ds = cr(image, size=size)
    del ds.PixelSpacing
    setattr(ds, keyword, pair)
    return ds


@pytest.mark.parametrize("size, keyword, pair", [
    ((256, 512), "PixelAspectRatio", [2, 1]),            # the reviewer's case: P 0.658, URGENT
    ((256, 512), "PixelSpacing", [0.278, 0.139]),
    ((256, 512), "ImagerPixelSpacing", [0.3, 0.15]),
    ((512, 256), "PixelSpacing", [0.139, 0.278]),        # pixels twice as wide as tall
    ((384, 512), "PixelAspectRatio", [4, 3]),
])
def test_non_square_pixels_are_resampled_to_the_physical_picture(tmp_path, normal, settings, detectors,
                                                                  clean_probability, size, keyword, pair):
    """Left as stored, the centre crop took half the chest and the model saw it squashed."""
    outcome = outcome_of(non_square(normal, size, keyword, pair), tmp_path, settings, detectors)
    assert_scores_like_clean(outcome, clean_probability)


def test_pixel_spacing_is_the_stored_grid_s_before_the_picture_is_turned(tmp_path, normal, settings, detectors,
                                                                          clean_probability):
    """Stored turned 90 degrees on a 512-row x 256-column grid of pixels twice as wide as tall."""
    ds = non_square(np.rot90(normal).copy(), (512, 256), "PixelSpacing", [0.139, 0.278])
    ds.PatientOrientation = ["F", "R"]
    assert_scores_like_clean(outcome_of(ds, tmp_path, settings, detectors), clean_probability)


def test_nearly_square_pixels_are_left_bit_for_bit(tmp_path, normal, settings, detectors, clean_probability):
    """Within 1% the display is untouched, so square-pixel images keep the contract exactly."""
    ds = cr(normal)
    ds.PixelSpacing = [0.139, 0.1395]
    outcome = outcome_of(ds, tmp_path, settings, detectors)
    assert outcome.status == "done" and outcome.fields["probability"] == clean_probability


@pytest.mark.parametrize("keyword, pair", [("PixelSpacing", [0, 0.139]), ("PixelAspectRatio", [1, -2]),
                                           ("ImagerPixelSpacing", [0.1, 0.1, 0.1])])
def test_an_unusable_pixel_size_alone_leaves_the_pixels_square(tmp_path, normal, settings, detectors,
                                                               clean_probability, keyword, pair):
    """Optional for CR and read only to find non-square pixels: an unusable one does not fail the image."""
    ds = cr(normal)
    del ds.PixelSpacing
    setattr(ds, keyword, pair)
    outcome = outcome_of(ds, tmp_path, settings, detectors)
    assert outcome.status == "done" and outcome.fields["probability"] == clean_probability


def test_an_unusable_pixel_spacing_gives_way_to_the_imager_pixel_spacing(tmp_path, normal, settings, detectors):
    """PixelSpacing 0\\0 with ImagerPixelSpacing 2:1 is the 2:1 picture, not a refusal nor a square one."""
    reference = outcome_of(non_square(normal, (512, 256), "ImagerPixelSpacing", [0.2, 0.1]), tmp_path / "a", settings, detectors)
    ds = non_square(normal, (512, 256), "ImagerPixelSpacing", [0.2, 0.1])
    ds.PixelSpacing = [0, 0]
    outcome = outcome_of(ds, tmp_path / "b", settings, detectors)
    assert outcome.status == reference.status == "done"
    assert outcome.fields["probability"] == reference.fields["probability"]
