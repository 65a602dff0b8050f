"""The inverted-image guard (`models.polarity`) on PneumoniaMNIST images, as stored and inverted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.errors import InvertedImageError, UnreadableImageError
from models.polarity import (MIN_COMPARED, POLARITY_FILE, REFUSE_BELOW, PolarityTemplate, centre, correlations,
                             standardised, template_from, unframed)
from models.preprocess import reduce_to_source


@pytest.fixture(scope="module")
def shipped() -> PolarityTemplate:
    return PolarityTemplate.load()


def upscaled(image: np.ndarray, factor: int = 40) -> np.ndarray:
    """A full-resolution 16-bit radiograph whose 28x28 reduction is `image` (each pixel a block)."""
    return np.kron(image.astype(np.uint16) * 257, np.ones((factor, factor), dtype=np.uint16))


def test_correlation_is_pearsons_on_the_centre_by_hand():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (28, 28)).astype(np.uint8)
    template = standardised(rng.normal(size=(16, 16))).reshape(16, 16)
    expected = np.corrcoef(small[6:22, 6:22].ravel().astype(float), template.ravel())[0, 1]
    assert correlations(small, template) == pytest.approx(expected, abs=1e-12)
    assert centre(small).shape == (16, 16)


def test_an_inverted_image_correlates_with_the_opposite_sign(shipped, pneumoniamnist):
    image = pneumoniamnist["test_images"][0]
    assert shipped.correlation(255 - image) == pytest.approx(-shipped.correlation(image), abs=1e-9)


def test_every_test_image_passes_as_stored_and_is_refused_inverted(shipped, pneumoniamnist):
    images = pneumoniamnist["test_images"]
    stored = correlations(images, shipped.template)
    inverted = correlations(255 - images, shipped.template)
    assert (stored >= REFUSE_BELOW).all()
    assert (inverted < REFUSE_BELOW).mean() >= 0.995


def test_a_full_resolution_radiograph_reads_as_its_thumbnail(shipped, pneumoniamnist):
    image = pneumoniamnist["test_images"][3]
    big = upscaled(image)
    assert np.array_equal(reduce_to_source(big), image)
    assert shipped.correlation(big) == pytest.approx(shipped.correlation(image), abs=1e-12)
    with pytest.raises(InvertedImageError):
        shipped.check(65535 - big)


def test_the_refusal_says_what_to_check_and_is_an_unreadable_image(shipped, pneumoniamnist):
    with pytest.raises(InvertedImageError, match="inverted.*Photometric Interpretation.*TRIAGE_POLARITY_CHECK=off") as info:
        shipped.check(255 - pneumoniamnist["test_images"][1])
    assert isinstance(info.value, UnreadableImageError)


def test_a_flat_picture_is_not_judged(shipped):
    assert shipped.check(np.full((64, 64), 128, dtype=np.uint8)) == 0.0


def test_bright_collimation_outside_the_centre_changes_nothing(shipped, pneumoniamnist):
    image = pneumoniamnist["test_images"][5].copy()
    framed = image.copy()
    framed[:5], framed[-5:], framed[:, :5], framed[:, -5:] = 255, 255, 255, 255
    assert shipped.correlation(framed) == pytest.approx(shipped.correlation(image), abs=1e-12)


def test_flat_edge_strips_and_the_mixed_line_after_them_are_left_out_whatever_the_polarity():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (28, 28)).astype(np.uint8)
    image[:, :9] = 250 + np.arange(28)[:, None] // 10  # a left border, brighter down the image (a heel effect)
    image[:3] = 12  # a dark strip along the top
    kept = unframed(image[None])[0]
    assert not kept[:, :10].any() and not kept[:4].any() and kept[4:, 10:].all()
    assert np.array_equal(unframed((255 - image)[None])[0], kept)


def test_collimation_on_one_side_does_not_decide_the_sign(shipped, pneumoniamnist):
    """A bright border of 8 of 28 pixels on the left refused a third of correct images while it was compared."""
    images = pneumoniamnist["test_images"][:200].copy()
    images[:, :, :9] = 255
    assert (correlations(images, shipped.template) >= REFUSE_BELOW).all()
    assert (correlations(255 - images, shipped.template) < REFUSE_BELOW).mean() >= 0.99


def test_a_border_brighter_mid_way_than_at_its_ends_is_still_a_border(shipped, pneumoniamnist):
    """Only a straight line was removed: a border dipping 5% at its ends refused 844 of 1,148 correct images."""
    images = pneumoniamnist["test_images"][:200].copy()
    images[:, :, :9] = np.rint(255 * (1 - 0.05 * np.linspace(-1, 1, 28) ** 2))[None, :, None]
    assert (correlations(images, shipped.template) >= REFUSE_BELOW).all()
    assert (correlations(255 - images, shipped.template) < REFUSE_BELOW).mean() >= 0.99


def test_too_little_left_inside_flat_edges_is_not_judged(shipped, pneumoniamnist):
    image = pneumoniamnist["test_images"][0].copy()
    image[:, :18] = 255  # leaves 3 of the centre's 16 columns past the mixed one
    assert (16 * 3 < MIN_COMPARED) and shipped.correlation(255 - image) == 0.0


def test_the_template_cannot_be_edited_in_place(shipped):
    with pytest.raises(ValueError, match="read-only"):
        shipped.template[0, 0] = 1.0


def test_the_shipped_template_is_the_train_splits_own(shipped, pneumoniamnist):
    """What `pneumonia-train polarity` writes from the data: the shipped file was not edited by hand."""
    assert np.abs(shipped.template - template_from(pneumoniamnist["train_images"])).max() < 1e-6
    assert shipped.provenance["data"]["md5"] == "28209eda62fecd6e6a2d98b1501bb15f"
    assert shipped.refuse_below == REFUSE_BELOW


@pytest.mark.parametrize("edit, reason", [
    (lambda d: d.update(template=[[0.0] * 16] * 16), "standardised"),
    (lambda d: d.update(template=[[0.0] * 14] * 14), "16x16 centre"),
    (lambda d: d.update(refuse_below=0.5), "refuse_below"),
    (lambda d: d.update(margin=-1), "margin"),
    (lambda d: d.update(margin=11, template=(np.eye(6) - 1 / 6).tolist()), "margin"),  # a 6x6 centre: never judged
])
def test_a_template_this_code_cannot_use_is_refused_at_load(tmp_path, edit, reason):
    data = json.loads(POLARITY_FILE.read_text())
    edit(data)
    path = tmp_path / "template.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=reason):
        PolarityTemplate.load(path)


def test_a_saved_template_loads_back_the_same(tmp_path, shipped):
    path = tmp_path / "template.json"
    shipped.save(path)
    again = PolarityTemplate.load(path)
    assert np.abs(again.template - shipped.template).max() < 1e-6
    assert (again.refuse_below, again.margin, again.provenance) == (shipped.refuse_below, shipped.margin, shipped.provenance)
