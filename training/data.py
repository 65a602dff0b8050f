"""PneumoniaMNIST loading (md5-checked, via medmnist) and batch-wise GPU/CPU augmentation.

Augmentation runs on the small (28x28) tensors of a whole batch at once and the
upscale to 224 happens in-batch afterwards: per-image PIL work at 224 would starve a
2-core machine. `to_network_input` is the torch twin of `models.preprocess.preprocess`
and is tested against it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.preprocess import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE
from training.config import DATA_ROOT_ENV, AugmentConfig
from training.errors import InputMissingError, RefusedError

FLAG = "pneumoniamnist"


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int64, 1 = pneumonia


def dataset_file(size: int) -> tuple[str, str]:
    """(file name, md5) of the official MedMNIST(+) file for this image size."""
    from medmnist import INFO

    info = INFO[FLAG]
    suffix = "" if size == 28 else f"_{size}"
    md5 = info["MD5"] if size == 28 else info[f"MD5_{size}"]
    return f"{FLAG}{suffix}.npz", md5


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_dataset(root: Path | None, size: int) -> tuple[Path, str]:
    """Find (or download) the file and verify its md5; errors say exactly what to do."""
    from medmnist.info import DEFAULT_ROOT

    root = Path(root) if root else Path(DEFAULT_ROOT)
    name, md5 = dataset_file(size)
    path = root / name
    if not path.is_file():
        created = not root.exists()
        try:
            root.mkdir(exist_ok=True)  # the leaf only: a mistyped --data-root made its whole path
            load_medmnist(root, "val", size, download=True)
        except Exception as exc:
            if created and root.is_dir() and not any(root.iterdir()):
                root.rmdir()  # leave no empty folder behind a failed download
            raise InputMissingError(
                f"PneumoniaMNIST file {name} (--image-size {size}, md5 {md5}) is not in {root} and could not be "
                f"downloaded ({type(exc).__name__}). Put it there, or point --data-root / "
                f"${DATA_ROOT_ENV} at the folder holding it."
            ) from exc
    actual = md5_of(path)
    if actual != md5:
        raise RefusedError(f"{path} has md5 {actual}, expected {md5} for {name} (--image-size {size}): corrupt or "
                           f"wrong file. Replace it, or point --data-root / ${DATA_ROOT_ENV} at the folder holding "
                           "the right one.")
    return path, md5


def load_medmnist(root: Path, split: str, size: int, download: bool = False) -> Split:
    from medmnist import PneumoniaMNIST

    dataset = PneumoniaMNIST(split=split, root=str(root), size=size, download=download)
    return Split(images=np.asarray(dataset.imgs, dtype=np.uint8), labels=dataset.labels.reshape(-1).astype(np.int64))


def load_split(root: Path | None, split: str, size: int, subset: int | None = None, seed: int = 0) -> Split:
    """One split; `subset` takes a stratified random sample for quick runs and tests.

    The sample depends on `seed` only, not on the training seed, so runs of different
    training seeds on a subset see the same images and can be compared or ensembled.
    """
    path, _ = ensure_dataset(root, size)
    data = load_medmnist(path.parent, split, size)
    if subset is None or subset >= len(data.labels):
        return data
    rng = np.random.default_rng(seed)
    picks = []
    for label in np.unique(data.labels):
        members = np.flatnonzero(data.labels == label)
        share = max(2, round(subset * len(members) / len(data.labels)))
        picks.append(rng.choice(members, size=min(share, len(members)), replace=False))
    index = np.sort(np.concatenate(picks))
    return Split(images=data.images[index], labels=data.labels[index])


def to_unit_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [0, 1]."""
    tensor = torch.as_tensor(images)
    return tensor.float().div_(255.0).unsqueeze(1)


def to_network_input(unit: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """(N, 1, h, w) in [0, 1] -> normalised (N, 3, size, size): bilinear upscale, RGB, ImageNet.
    Everything the model is scored or served on uses the contract's 224; a smaller `size` is only for
    the early epochs of progressive resizing (`TrainConfig.low_res_epochs`)."""
    large = F.interpolate(unit, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=unit.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=unit.device).view(1, 3, 1, 1)
    return (large.expand(-1, 3, -1, -1) - mean) / std


def augment_batch(unit: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random affine (rotation, translation, scale, shear, h-flip), brightness/contrast, erasing.

    All parameters are drawn per sample from `generator` so runs are reproducible.
    """
    if not config.enabled:
        return unit
    n = unit.shape[0]
    out = _random_affine(unit, config, generator)
    brightness = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * config.brightness
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * config.contrast
    mean = out.mean(dim=(2, 3), keepdim=True)
    out = ((out - mean) * contrast.to(out) + mean) * brightness.to(out)
    out = _photometric_shift(out.clamp_(0, 1), config, generator)
    out = _random_erase(out, config, generator)
    return out


def _photometric_shift(unit: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Gamma and sensor noise, for robustness to another site's processing (off by default).

    Draws from `generator` only when enabled, so the default recipe's random stream and
    therefore its results stay exactly reproducible.
    """
    n = unit.shape[0]
    if config.gamma > 0:
        log_gamma = (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * math.log1p(config.gamma)
        unit = unit.clamp(min=1e-6).pow(torch.exp(log_gamma).to(unit))
    if config.noise_std > 0:
        unit = unit + torch.randn(unit.shape, generator=generator).to(unit) * config.noise_std
    return unit.clamp_(0, 1)


def _random_affine(unit: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    n = unit.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-config.rotation_deg, config.rotation_deg) * math.pi / 180
    shear = uniform(-config.shear_deg, config.shear_deg) * math.pi / 180
    scale = uniform(config.scale_min, config.scale_max)
    tx, ty = uniform(-config.translate, config.translate) * 2, uniform(-config.translate, config.translate) * 2
    flip = torch.where(torch.rand(n, generator=generator) < config.hflip_p, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos / scale * flip
    theta[:, 0, 1] = (-sin + torch.tan(shear) * cos) / scale
    theta[:, 1, 0] = sin / scale * flip
    theta[:, 1, 1] = (cos + torch.tan(shear) * sin) / scale
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    grid = F.affine_grid(theta.to(unit), list(unit.shape), align_corners=False)
    return F.grid_sample(unit, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _random_erase(unit: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    n, _, h, w = unit.shape
    apply = torch.rand(n, generator=generator) < config.erase_p
    area = config.erase_area[0] + (config.erase_area[1] - config.erase_area[0]) * torch.rand(n, generator=generator)
    aspect = torch.exp((torch.rand(n, generator=generator) * 2 - 1) * math.log(3.0))
    eh = (torch.sqrt(area * aspect) * h).clamp(1, h).long()
    ew = (torch.sqrt(area / aspect) * w).clamp(1, w).long()
    top = (torch.rand(n, generator=generator) * (h - eh + 1).float()).long()
    left = (torch.rand(n, generator=generator) * (w - ew + 1).float()).long()
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    mask = (
        (rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1))
        & apply.view(n, 1, 1)
    )
    fill = float(np.mean(IMAGENET_MEAN))
    return torch.where(mask.unsqueeze(1).to(unit.device), torch.full_like(unit, fill), unit)
