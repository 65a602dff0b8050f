"""The model contract shared by training and serving.

Serving side only (numpy, onnxruntime, pydicom, Pillow): never imports torch.
"""

from models.card import ModelCard, Stratum, default_model_path
from models.errors import (ExecutionProviderError, InvertedImageError, ModelIntegrityError, RotatedImageError,
                           UnreadableImageError)
from models.preprocess import preprocess, preprocess_batch

__all__ = [
    "ExecutionProviderError",
    "InvertedImageError",
    "ModelCard",
    "ModelIntegrityError",
    "PneumoniaDetector",
    "RotatedImageError",
    "Stratum",
    "UnreadableImageError",
    "default_model_path",
    "preprocess",
    "preprocess_batch",
]


def __getattr__(name: str):  # lazy: importing models must not load onnxruntime
    if name == "PneumoniaDetector":
        from models.detector import PneumoniaDetector

        return PneumoniaDetector
    raise AttributeError(name)
