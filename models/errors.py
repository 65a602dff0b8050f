"""Errors raised by the serving contract.

They carry a short, PHI-free reason that the worker stores in its result row,
so each message must name the problem without quoting patient data.
"""


class UnreadableImageError(ValueError):
    """The input cannot be turned into a chest X-ray image (bad file, no pixels, absurd size...)."""


class ModelIntegrityError(RuntimeError):
    """The ONNX file does not match its model card (wrong sha256, missing card)."""
