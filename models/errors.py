"""Errors raised by the serving contract.

They carry a short, PHI-free reason that the worker stores in its result row,
so each message must name the problem without quoting patient data.
"""

import re

CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")
"""DICOM's Code String (CS) repertoire: capitals, digits, space and underscore, 16 characters at most."""
UID_STRING = re.compile(r"[0-9]{1,64}(\.[0-9]{1,64})*")


def quoted_code(value: object) -> str:
    """A coded value (Modality, ViewPosition...) as a reason may repeat it.

    With pydicom's validation off (the worker's setting) a CS element can hold any text, a
    patient's name included; a value outside the CS repertoire is described, not repeated.
    """
    text = str(value).strip()
    return text if CODE_STRING.fullmatch(text) else "(non-standard value)"


def quoted_uid(value: object) -> str:
    """A UID (a transfer syntax, say) as a reason may repeat it; anything else is described."""
    text = str(value).strip()
    return text if len(text) <= 64 and UID_STRING.fullmatch(text) else "(non-standard value)"


class UnreadableImageError(ValueError):
    """The input cannot be turned into a chest X-ray image (bad file, no pixels, absurd size...)."""


class ImageAccessError(UnreadableImageError):
    """The file could not be read from its storage (permission denied, an I/O error, a stale network
    mount, no file handles left): the host's problem, not the image's. Still an `UnreadableImageError`
    for callers of `PneumoniaDetector`; the worker retries it instead of failing the instance."""


class ModelIntegrityError(RuntimeError):
    """The ONNX file does not match its model card (wrong sha256, missing card)."""


class ExecutionProviderError(RuntimeError):
    """A required onnxruntime execution provider (CUDA) is not active in this process.

    onnxruntime falls back to the CPU by itself when CUDA cannot start (no GPU, a driver or
    cuDNN mismatch, the CPU-only wheel). A GPU deployment asks for CUDA explicitly so that this
    shows as an error at start-up instead of a worker running several times slower unnoticed.
    """
