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
        load_start_weights(model, weights)
    if resnet_v1_strides:
        use_v1_strides(model)
    model.fc = nn.Sequential(nn.Linear(2048, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, 2))
    freeze(model, frozen)
    return model


def load_backbone_state(weights: str) -> dict[str, torch.Tensor]:
    """State dict with torchvision key names, never unpickling arbitrary objects."""
    path = Path(weights).expanduser()
    if path.suffix in WEIGHT_FILE_SUFFIXES:
        return read_weight_file(path)
    enum = tv_models.ResNet50_Weights[weights]
    try:
        return enum.get_state_dict(progress=False)
    except OSError as exc:  # URLError: offline (no cache either)
        raise InputMissingError(f"torchvision's {weights} weights could not be downloaded ({type(exc).__name__}): "
                                "offline, pass a local file with --weights or PNEUMONIA_WEIGHTS") from exc


WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def check_weights(weights: str) -> None:
    """Refuse start weights that are not there, before a run writes anything: a missing file or an
    unknown name was a traceback from safetensors or an enum lookup, after config.json was written.
    A file that is there but unreadable, or another network's, is refused when `build_model` loads it
    strictly, which `fit` does before config.json is written."""
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


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a .safetensors or torch file; one that cannot be read is refused in one line
    (a corrupt file was a SafetensorError or UnpicklingError traceback)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, not that format, or holding more than tensors and plain values
        reason = (str(exc).strip().splitlines() or [""])[0][:160]
        raise RefusedError(f"weights file {path} cannot be read ({type(exc).__name__}: {reason}): pass a "
                           "torchvision ResNet-50 state dict (--weights or PNEUMONIA_WEIGHTS)") from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise RefusedError(f"weights file {path} holds a {type(state).__name__}, not a state dict "
                           "(--weights or PNEUMONIA_WEIGHTS)")
    return state


def load_start_weights(model: nn.Module, weights: str) -> None:
    """Load `weights` strictly into the fresh ResNet-50; weights of another network are refused in one line
    that counts and names the first missing, unexpected and mis-shaped keys (torch's message lists all
    320 keys, as a traceback, and it came after config.json was written)."""
    state = load_backbone_state(weights)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshaped = [key for key in state if key in expected
                 and (not isinstance(state[key], torch.Tensor) or state[key].shape != expected[key].shape)]
    if missing or unexpected or misshaped:
        raise RefusedError(f"weights {weights} are not a torchvision ResNet-50's: "
                           f"{key_summary(missing, unexpected, misshaped)} (--weights or PNEUMONIA_WEIGHTS)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # anything the key and shape comparison did not foresee
        raise RefusedError(f"weights {weights} do not load into a ResNet-50 "
                           f"({str(exc).strip().splitlines()[-1][:160]})") from exc


def key_summary(missing: list[str], unexpected: list[str], misshaped: list[str], shown: int = 3) -> str:
    """'320 missing (conv1.weight, bn1.weight, bn1.bias, ...); 1 unexpected (foo)': counts and the first keys."""
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", misshaped)):
        if keys:
            more = ", ..." if len(keys) > shown else ""
            parts.append(f"{len(keys)} {label} ({', '.join(keys[:shown])}{more})")
    return "; ".join(parts)


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
