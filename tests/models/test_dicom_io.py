import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLossless, RLELossless

from models.dicom_io import dicom_to_grayscale
from models.errors import UnreadableImageError
from models.preprocess import reduce_to_source
from worker.samples import make_cxr_dataset


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


@pytest.mark.parametrize("rows,cols", [(16, 16), (256, 2048)])
def test_absurd_dimensions_are_refused(image, rows, cols):
    ds = make_cxr_dataset(image, size=(256, 256))
    ds.Rows, ds.Columns = rows, cols
    with pytest.raises(UnreadableImageError):
        dicom_to_grayscale(ds)


def test_truncated_pixel_data_is_refused(image):
    ds = make_cxr_dataset(image, size=(256, 256))
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(UnreadableImageError, match="decoded"):
        dicom_to_grayscale(ds)
