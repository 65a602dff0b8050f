"""The network: an ImageNet-pretrained ResNet-50 with the original design's head (2048->512->2)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse
from torchvision import models as tv_models

RESNET_ORDER = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
"""torchvision ResNet's top-level modules in forward order (`ResNet._forward_impl`)."""
PARAMETER_FREE = frozenset({"relu", "maxpool", "avgpool"})


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
    return enum.get_state_dict(progress=False)


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


def fused_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every BatchNorm folded into its convolution, for scoring.

    Eval-mode BatchNorm is an affine map, so folding it changes results only by rounding
    (about 1e-5 in fp32 logits) and saves the memory-bound BN passes that dominate a 2-core
    CPU's inference (about 1.13x; onnxruntime does the same to the exported graph).
    The argument is left untouched.
    """
    return fuse(copy.deepcopy(model).eval(), inplace=True)


def frozen_stem_names(frozen: tuple[str, ...]) -> tuple[str, ...]:
    """The leading top-level modules of a ResNet whose parameters are all frozen (may be empty)."""
    stem: list[str] = []
    for name in RESNET_ORDER:
        if name not in PARAMETER_FREE and name not in frozen:
            break
        stem.append(name)
    while stem and stem[-1] in PARAMETER_FREE:
        stem.pop()
    return tuple(stem)


class FusedStemNetwork(nn.Module):
    """The training forward of a ResNet whose frozen stem runs as one BN-folded, gradient-free block.

    Why: the frozen stem's BatchNorms keep their ImageNet statistics (`set_train_mode`), so they
    can be folded into the convolutions; on a 2-core CPU that stem is over a third of a training
    step and its BN passes a quarter of the stem. The stem is a folded copy (its weights never
    change while training); everything after it is the network's own modules, so the optimizer,
    EMA and checkpoints keep working on `network` alone. Only for training steps: scoring uses
    `fused_for_inference`.
    """

    def __init__(self, network: nn.Module, frozen: tuple[str, ...]) -> None:
        super().__init__()
        names = frozen_stem_names(frozen)
        if not names:
            raise ValueError(f"no frozen stem to fuse: {frozen} does not start at conv1")
        stem = nn.Sequential(*(copy.deepcopy(getattr(network, name)) for name in names))
        self.stem = fuse(stem.eval(), inplace=True).requires_grad_(False)
        self.trainable_names = RESNET_ORDER[RESNET_ORDER.index(names[-1]) + 1:]
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.stem(x)
        for name in self.trainable_names:
            h = getattr(self.network, name)(h)
            if name == "avgpool":
                h = torch.flatten(h, 1)
        return h
