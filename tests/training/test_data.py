import numpy as np
import pytest
import torch

from models.preprocess import preprocess_batch
from training.config import AugmentConfig
from training.data import augment_batch, ensure_dataset, load_split, to_network_input, to_unit_tensor


def test_training_tensors_match_the_serving_preprocessing(pneumoniamnist):
    """The torch pipeline used in training/evaluation and models.preprocess agree (no train/serve skew)."""
    images = pneumoniamnist["val_images"][:8]
    torch_input = to_network_input(to_unit_tensor(images)).numpy()
    np.testing.assert_allclose(preprocess_batch(images), torch_input, atol=1e-5)


def test_augmentation_is_seeded_and_keeps_range(pneumoniamnist):
    unit = to_unit_tensor(pneumoniamnist["train_images"][:16])
    first = augment_batch(unit, AugmentConfig(), torch.Generator().manual_seed(3))
    again = augment_batch(unit, AugmentConfig(), torch.Generator().manual_seed(3))
    other = augment_batch(unit, AugmentConfig(), torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == unit.shape and first.min() >= 0 and first.max() <= 1
    assert torch.equal(augment_batch(unit, AugmentConfig(enabled=False), torch.Generator()), unit)


def test_gamma_shift_is_one_power_per_image_within_its_range(pneumoniamnist):
    unit = to_unit_tensor(pneumoniamnist["train_images"][:8])
    still = AugmentConfig(rotation_deg=0, hflip_p=0, translate=0, scale_min=1, scale_max=1, shear_deg=0,
                          brightness=0, contrast=0, erase_p=0)
    assert torch.allclose(augment_batch(unit, still, torch.Generator().manual_seed(0)), unit, atol=1e-5)
    shifted = augment_batch(unit, AugmentConfig(**{**still.__dict__, "gamma": 0.5}), torch.Generator().manual_seed(0))
    for before, after in zip(unit, shifted):
        inside = (before > 0.1) & (before < 0.9)
        gamma = torch.log(after[inside]) / torch.log(before[inside])
        assert gamma.max() - gamma.min() < 1e-3  # one gamma per image, so intensity order is kept
        assert 1 / 1.5 - 1e-4 <= gamma.mean() <= 1.5 + 1e-4
    noisy = augment_batch(unit, AugmentConfig(**{**still.__dict__, "noise_std": 0.05}), torch.Generator().manual_seed(0))
    assert 0.03 < (noisy - unit)[(unit > 0.2) & (unit < 0.8)].std() < 0.07 and noisy.min() >= 0 and noisy.max() <= 1


def test_split_sizes_and_stratified_subset(data_root):
    test = load_split(data_root, "test", 28)
    assert test.images.shape == (624, 28, 28) and int(test.labels.sum()) == 390
    small = load_split(data_root, "train", 28, subset=40, seed=1)
    assert 38 <= len(small.labels) <= 42 and 0 < small.labels.mean() < 1


def test_missing_file_error_names_file_md5_and_setting(tmp_path, monkeypatch):
    """The download is attempted and fails: offline here, and refused below on a networked host too
    (the test must not fetch 4 MB from zenodo.org, and must not pass only for want of a network)."""
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(FileNotFoundError) as error:
        ensure_dataset(tmp_path, 28)
    text = str(error.value)
    assert "pneumoniamnist.npz" in text and "28209eda62fecd6e6a2d98b1501bb15f" in text and "PNEUMONIA_DATA_ROOT" in text


def test_corrupt_file_is_rejected_by_md5(tmp_path):
    (tmp_path / "pneumoniamnist.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="md5"):
        ensure_dataset(tmp_path, 28)
