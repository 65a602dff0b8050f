"""Errors raised by the serving contract.

They carry a short, PHI-free reason that the worker stores in its result row,
so each message must name the problem without quoting patient data.
"""


class UnreadableImageError(ValueError):
    """The input cannot be turned into a chest X-ray image (bad file, no pixels, absurd size...)."""


class ModelIntegrityError(RuntimeError):
    """The ONNX file does not match its model card (wrong sha256, missing card)."""


class ExecutionProviderError(RuntimeError):
    """A required onnxruntime execution provider (CUDA) is not active in this process.

    onnxruntime falls back to the CPU by itself when CUDA cannot start (no GPU, a driver or
    cuDNN mismatch, the CPU-only wheel). A GPU deployment asks for CUDA explicitly so that this
    shows as an error at start-up instead of a worker running several times slower unnoticed.
    """
