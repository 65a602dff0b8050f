import numpy as np
import pytest

from models.preprocess import (INPUT_SIZE, area_weights, bilinear_weights, center_crop_square, preprocess,
                               preprocess_batch, reduce_to_source)


@pytest.mark.parametrize("src,dst", [(28, 224), (7, 3), (100, 28)])
def test_resampling_weights_are_partitions_of_unity(src, dst):
    weights = bilinear_weights(src, dst) if dst > src else area_weights(src, dst)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)


def test_area_weights_by_hand():
    # 3 -> 2: target pixel 0 covers source [0, 1.5): 2/3 of px0 + 1/3 of px1
    np.testing.assert_allclose(area_weights(3, 2), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])


def test_28px_image_is_unchanged_by_reduction(pneumoniamnist):
    image = pneumoniamnist["test_images"][0]
    np.testing.assert_array_equal(reduce_to_source(image), image)


def test_full_resolution_image_reduces_to_its_28px_source(pneumoniamnist):
    """A 2048x2048 X-ray made from a 28x28 image (and framed by extra rows) preprocesses identically."""
    small = pneumoniamnist["test_images"][5]
    big = np.kron(small, np.ones((73, 73), dtype=np.uint8))  # 2044 x 2044
    framed = np.vstack([np.zeros((100, big.shape[1]), np.uint8), big, np.zeros((100, big.shape[1]), np.uint8)])
    np.testing.assert_array_equal(reduce_to_source(framed), small)
    np.testing.assert_allclose(preprocess(framed), preprocess(small), atol=1e-6)


def test_sixteen_bit_input_matches_eight_bit(pneumoniamnist):
    small = pneumoniamnist["test_images"][9]
    np.testing.assert_allclose(preprocess(small.astype(np.uint16) * 257), preprocess(small), atol=1e-6)


def test_float_display_values_match_integer(pneumoniamnist):
    small = pneumoniamnist["test_images"][3]
    np.testing.assert_allclose(preprocess(small / 255.0), preprocess(small), atol=1e-6)


def test_rgb_is_reduced_to_luminance(pneumoniamnist):
    small = pneumoniamnist["test_images"][3]
    np.testing.assert_allclose(preprocess(np.stack([small] * 3, axis=-1)), preprocess(small), atol=1e-6)


def test_output_contract(pneumoniamnist):
    batch = preprocess_batch(pneumoniamnist["test_images"][:4])
    assert batch.shape == (4, 3, INPUT_SIZE, INPUT_SIZE) and batch.dtype == np.float32
    assert preprocess_batch([]).shape == (0, 3, INPUT_SIZE, INPUT_SIZE)


def test_center_crop_takes_the_middle():
    image = np.arange(6 * 10).reshape(6, 10)
    np.testing.assert_array_equal(center_crop_square(image), image[:, 2:8])


@pytest.mark.parametrize("bad,message", [
    (np.zeros((4, 4, 4, 4)), "2-D"),
    (np.full((8, 8), np.nan), "NaN"),
    (np.full((8, 8), 3.0), r"\[0, 1\]"),
    (np.zeros((8, 8), dtype=np.int16), "signed"),
    (np.zeros((0, 0), dtype=np.uint8), "empty"),
])
def test_bad_arrays_raise_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        preprocess(bad)


def test_larger_medmnist_sizes_use_their_own_source_size(pneumoniamnist):
    small = pneumoniamnist["test_images"][2]
    image64 = np.kron(small, np.ones((4, 4), dtype=np.uint8))[:, :]  # a 112x112 image
    assert reduce_to_source(image64, 64).shape == (64, 64)
    assert preprocess(image64, 64).shape == (3, INPUT_SIZE, INPUT_SIZE)
    with pytest.raises(ValueError, match="smaller than"):
        reduce_to_source(small, 64)


def test_a_float32_display_image_reduces_as_through_float64():
    """to_unit_range keeps float32 input float32 (a quarter of the worker's memory on big plates); the
    28x28 reduction must be the one the float64 path gave, to the bit."""
    from models.preprocess import reduce_to_source

    display = np.random.default_rng(1).uniform(-1e-7, 1 + 1e-7, (300, 420)).astype(np.float32)
    np.testing.assert_array_equal(reduce_to_source(display), reduce_to_source(display.astype(np.float64)))


def test_a_masked_array_is_refused_not_scored_with_its_mask_ignored(pneumoniamnist):
    """`np.asarray` drops a mask: the pixels under it (a burnt-in label blanked out, a collimator edge) were
    scored as if they were image. Nothing says what a masked pixel should read as, so masked input is refused;
    a masked array with nothing masked holds a plain picture and is read as one."""
    from models.errors import UnreadableImageError

    small = pneumoniamnist["test_images"][3]
    masked = np.ma.masked_array(small, mask=np.zeros(small.shape, bool))
    masked[:4, :] = np.ma.masked
    with pytest.raises(UnreadableImageError, match=r"masked array with 112 masked values.*\.filled\(value\)"):
        preprocess(masked)
    with pytest.raises(UnreadableImageError, match="masked array"):
        preprocess_batch([small, masked])
    np.testing.assert_array_equal(preprocess(np.ma.masked_array(small)), preprocess(small))
    assert preprocess(masked.filled(0)).shape == (3, INPUT_SIZE, INPUT_SIZE)  # filled as the caller chooses


@pytest.mark.parametrize("source_size", [28, 64])
def test_a_reduction_is_its_own_so_the_network_input_of_either_is_the_same_bit_for_bit(pneumoniamnist, source_size):
    """What `PneumoniaDetector.checked_input` and the worker rely on to shrink a full-resolution plate once."""
    rng = np.random.default_rng(source_size)
    plate = np.kron(pneumoniamnist["test_images"][7].astype(np.float32) / 255, np.ones((90, 73), np.float32))
    plate = np.clip(plate + rng.normal(0, 0.02, plate.shape).astype(np.float32), 0, 1)
    small = reduce_to_source(plate, source_size)
    assert np.array_equal(reduce_to_source(small, source_size), small)
    assert np.array_equal(preprocess(small, source_size), preprocess(plate, source_size))
