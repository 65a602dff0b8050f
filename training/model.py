"""The network: an ImageNet-pretrained ResNet-50 with the original design's head (2048->512->2)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv_models

from training.errors import InputMissingError, RefusedError


def build_model(weights: str, *, hidden: int = 512, dropout: float = 0.5, frozen: tuple[str, ...] = (),
                resnet_v1_strides: bool = False) -> nn.Module:
    """ResNet-50 backbone from `weights`, new head, listed top-level modules frozen.

    `weights` is a torchvision enum name (e.g. IMAGENET1K_V2, downloaded or cached by
    torchvision), a local .safetensors / state-dict file, or "none" (random init).
    """
    model = tv_models.resnet50()
    if weights.lower() != "none":
        model.load_state_dict(load_backbone_state(weights), strict=True)
    if resnet_v1_strides:
        use_v1_strides(model)
    model.fc = nn.Sequential(nn.Linear(2048, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, 2))
    freeze(model, frozen)
    return model


def load_backbone_state(weights: str) -> dict[str, torch.Tensor]:
    """State dict with torchvision key names, never unpickling arbitrary objects."""
    path = Path(weights).expanduser()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pt", ".pth", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    enum = tv_models.ResNet50_Weights[weights]
    try:
        return enum.get_state_dict(progress=False)
    except OSError as exc:  # URLError: offline (no cache either)
        raise InputMissingError(f"torchvision's {weights} weights could not be downloaded ({type(exc).__name__}): "
                                "offline, pass a local file with --weights or PNEUMONIA_WEIGHTS") from exc


WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def check_weights(weights: str) -> None:
    """Refuse start weights that cannot be loaded, before a run writes anything: a missing file or an
    unknown name was a traceback from safetensors or an enum lookup, after config.json was written."""
    if weights.lower() == "none":
        return
    path = Path(weights).expanduser()
    if path.suffix in WEIGHT_FILE_SUFFIXES:
        if not path.is_file():
            raise InputMissingError(f"weights file {path} not found (--weights or PNEUMONIA_WEIGHTS)")
        return
    if weights not in tv_models.ResNet50_Weights.__members__:
        raise RefusedError(f"weights {weights!r}: neither 'none', a file ({', '.join(WEIGHT_FILE_SUFFIXES)}) nor one "
                           f"of torchvision's {', '.join(tv_models.ResNet50_Weights.__members__)}")


def use_v1_strides(model: nn.Module) -> None:
    """Original ResNet v1 puts the down-sampling stride in the first 1x1 convolution."""
    for layer in (model.layer2, model.layer3, model.layer4):
        layer[0].conv1.stride = (2, 2)
        layer[0].conv2.stride = (1, 1)


def freeze(model: nn.Module, names: tuple[str, ...]) -> None:
    """Stop gradients into the named modules; their BatchNorms stay in eval (see `set_train_mode`)."""
    for name in names:
        for parameter in getattr(model, name).parameters():
            parameter.requires_grad_(False)


def set_train_mode(model: nn.Module, frozen: tuple[str, ...]) -> None:
    """train() for the trainable part; frozen modules keep their ImageNet BN statistics."""
    model.train()
    for name in frozen:
        getattr(model, name).eval()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
