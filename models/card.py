"""The model card: everything a consumer needs to use the ONNX file correctly.

It sits beside the ONNX artifact (``<name>.card.json``) and carries labels,
preprocessing id, temperature, thresholds, confidence strata, data hash, training
config and test metrics, like timm's ``pretrained_cfg`` or torchxrayvision's
``op_threshs``. Serving code reads only the typed fields; the rest is kept verbatim
for audit.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from models.atomic import write_text

MODEL_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_NAME = "pneumonia_resnet50"
STRATUM_NAMES = ("likely_normal", "indeterminate", "high_suspicion")
"""Ordered from least to most severe."""
LABELS = ("Normal", "Pneumonia")
"""The network's two outputs, in order: serving reads index 1 as pneumonia."""


def strict_json(data: Any, **dumps_options: Any) -> str:
    """JSON that every parser accepts (RFC 8259 has no NaN or Infinity): a non-finite number, such
    as the PPV of an empty stratum, is written as null. numpy scalars are written as numbers."""
    return json.dumps(_finite(data), allow_nan=False, **dumps_options)


def nan_for_null(value: Any) -> Any:
    """The inverse of `strict_json` for figures: null read back as NaN, as it was computed."""
    if isinstance(value, Mapping):
        return {key: nan_for_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [nan_for_null(item) for item in value]
    return float("nan") if value is None else value


def _finite(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalar -> Python number
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def default_model_path() -> Path:
    """The released ONNX model shipped in this package."""
    return MODEL_DIR / f"{DEFAULT_MODEL_NAME}.onnx"


def card_path_for(model_path: str | Path) -> Path:
    """`foo.onnx` -> `foo.card.json`."""
    path = Path(model_path)
    return path.with_name(path.stem + ".card.json")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Stratum:
    """A band of calibrated pneumonia probability: lower <= p < upper (the top band includes 1)."""

    name: str
    lower: float
    upper: float
    description: str = ""


DECISION_FIELDS = ("sha256", "labels", "preprocessing", "input_shape", "source_size", "temperature", "threshold",
                   "strata")
"""What turns the network's output into a stratum and a flag: the card's `decision_sha256` covers these."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    sha256: str
    labels: tuple[str, ...]
    preprocessing: str
    input_shape: tuple[int, ...]
    temperature: float
    threshold: float
    strata: tuple[Stratum, ...]
    source_size: int = 28
    """MedMNIST(+) image size the model was trained at; `preprocess` reduces inputs to it."""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse a card that would score every study wrong rather than fail loudly.

        The sha256 binds the card to the ONNX file, not the card's own numbers: an edited
        temperature of -2 turns every pneumonia into a routine read, swapped labels name the
        pneumonia output Normal, and reversed strata send clear pneumonias to likely_normal.
        """
        if tuple(self.labels) != LABELS:
            raise ValueError(f"labels must be {list(LABELS)} in the network's output order, not {list(self.labels)}")
        validate_calibration(self.temperature, self.threshold, self.strata)

    def stratum_for(self, probability: float) -> str:
        """Name of the stratum holding this calibrated pneumonia probability."""
        for stratum in self.strata:
            if stratum.lower <= probability < stratum.upper:
                return stratum.name
        if probability >= self.strata[-1].upper - 1e-12:
            return self.strata[-1].name
        raise ValueError(f"probability {probability} is outside every stratum")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        data["strata"] = [asdict(s) for s in self.strata]
        return {**data, **extra}

    @property
    def decision_sha256(self) -> str:
        """Identity of what this card decides with (`DECISION_FIELDS`), in one form whatever wrote the JSON: numbers
        as floats or ints by field (jq and JavaScript write 1.0 as 1), strata by name and bounds in order (their
        descriptions are words, not decisions)."""
        decision = {
            "sha256": self.sha256, "labels": list(self.labels), "preprocessing": self.preprocessing,
            "input_shape": [int(d) for d in self.input_shape], "source_size": int(self.source_size),
            "temperature": float(self.temperature), "threshold": float(self.threshold),
            "strata": sorted(([s.name, float(s.lower), float(s.upper)] for s in self.strata), key=lambda s: s[1:]),
        }
        assert set(decision) == set(DECISION_FIELDS)
        canonical = strict_json(decision, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def save(self, path: str | Path) -> None:
        """With its `decision_sha256` (what `load` checks), replaced whole (`models.atomic`): a worker loading
        the model while a card is re-written beside it must read the old card or the new one, never half."""
        data = {**self.to_dict(), "decision_sha256": self.decision_sha256}
        write_text(path, strict_json(data, indent=2, sort_keys=False) + "\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelCard":
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        strata = tuple(
            sorted((Stratum(**s) for s in data["strata"]), key=lambda s: s.lower)
        )
        validate_strata(strata)
        return cls(
            name=data["name"],
            version=data["version"],
            sha256=data["sha256"],
            labels=tuple(data["labels"]),
            preprocessing=data["preprocessing"],
            input_shape=tuple(data["input_shape"]),
            temperature=float(data["temperature"]),
            threshold=float(data["threshold"]),
            strata=strata,
            source_size=int(data.get("source_size", 28)),
            metrics=data.get("metrics", {}),
            extra={k: v for k, v in data.items() if k not in known and k != "decision_sha256"},  # derived: `save`
        )

    @classmethod
    def load(cls, path: str | Path) -> "ModelCard":
        """The card in `path`; ValueError for one whose temperature, threshold, strata or other decision field
        was edited after it was written. Why: the sha256 binds the card to the ONNX file, not to its own
        numbers, and a hand-moved cut-point (high_suspicion from 0.133 to 0.5, say) passed every plausibility
        check, changed which studies read URGENT, and left no trace in the results, which record the model's
        sha256 only. A site's own cut-points belong in a site calibration, whose sha256 each result records.
        A card written before 2026-11-29 has no `decision_sha256` and is read as before."""
        data = json.loads(Path(path).read_text())
        card = cls.from_dict(data)
        recorded = data.get("decision_sha256")
        if recorded is not None and recorded != card.decision_sha256:
            raise ValueError(f"{Path(path).name} was edited after it was written: its {', '.join(DECISION_FIELDS)} no "
                             "longer match its decision_sha256 (set a site's cut-points with a site calibration, "
                             "`pneumonia-worker calibrate`)")
        return card


def validate_calibration(temperature: float, threshold: float, strata: tuple[Stratum, ...]) -> None:
    """What serving needs of a card's or a site's calibration: a positive finite temperature, a
    threshold that is a probability, and the three named strata tiling [0, 1] from low to high."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, not {temperature!r}")
    if not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
        raise ValueError(f"threshold must be a probability in [0, 1], not {threshold!r}")
    validate_strata(strata)
    if tuple(s.name for s in strata) != STRATUM_NAMES:
        raise ValueError(f"strata must be {', '.join(STRATUM_NAMES)} from low to high probability, "
                         f"not {', '.join(s.name for s in strata)}")


def validate_strata(strata: tuple[Stratum, ...]) -> None:
    """Strata must tile [0, 1] without gaps or overlaps, each band inside it (one may be empty).

    Bands that met end to end were enough before: cut-points typed by hand as percentages (46.6
    for 0.466) passed, and every study fell in the lowest band, ROUTINE on the worklist."""
    if not strata or strata[0].lower != 0.0 or strata[-1].upper != 1.0:
        raise ValueError("strata must start at 0 and end at 1")
    for stratum in strata:
        if not 0.0 <= stratum.lower <= stratum.upper <= 1.0:  # nan fails too
            raise ValueError(f"stratum {stratum.name} is [{stratum.lower}, {stratum.upper}): cut-points must be "
                             "probabilities from 0 to 1, in increasing order")
    for below, above in zip(strata, strata[1:]):
        if below.upper != above.lower:
            raise ValueError(f"strata {below.name} and {above.name} do not meet")
