"""Forward passes shared by training, evaluation and export checks."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import nn

from models.preprocess import preprocess_batch
from training.runtime import Runtime


def batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, runtime: Runtime, batch_size: int = 128,
                   hflip_tta: bool = False) -> np.ndarray:
    """Logits (N, 2) in float32 for uint8 source images, optionally averaged with the h-flip.

    Evaluation scores exactly what serving feeds the network: the inputs come from the contract's
    numpy `preprocess` (the images are at their MedMNIST+ source size), not from its torch twin
    that the augmented training batches go through."""
    model.eval()
    outputs = []
    for chunk in batches(images, batch_size):
        served = torch.from_numpy(preprocess_batch(chunk, source_size=chunk.shape[-1]))
        x = served.to(runtime.device).contiguous(memory_format=runtime.memory_format)
        with runtime.autocast():
            logits = model(x).float()
            if hflip_tta:
                logits = (logits + model(torch.flip(x, dims=[3])).float()) / 2
        outputs.append(logits.cpu())
    return torch.cat(outputs).numpy().astype(np.float32) if outputs else np.zeros((0, 2), np.float32)


class FlipAveraged(nn.Module):
    """Wraps a classifier so it outputs the mean logits of the image and its mirror (TTA in-graph).

    The mirror rides on the batch axis (one forward pass over 2N images) rather than a second
    call of the network, so the exported graph uses each weight once. Static int8 quantisation
    keeps one quantised copy per use, so two calls would double an int8 variant's size.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = x.shape[0]
        both = self.model(torch.cat([x, torch.flip(x, dims=[3])]))
        return (both[:count] + both[count:]) / 2
