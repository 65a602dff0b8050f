"""`PneumoniaDetector`: the original design's inference API, served by onnxruntime.

    detector = PneumoniaDetector()
    detector.predict("chest_xray.jpg")
    # {'prediction': 'Pneumonia', 'confidence': 0.94,
    #  'probabilities': {'Normal': 0.06, 'Pneumonia': 0.94},
    #  'clinical_note': '...', 'stratum': 'high_suspicion'}

Probabilities are calibrated: the card's temperature divides the logits before the
softmax. The decision uses the card's threshold and the stratum its cut-points. A site
calibration (`models/site_calibration.py`), when given, replaces those three.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from models.card import ModelCard, card_path_for, default_model_path, sha256_of
from models.errors import ExecutionProviderError, ModelIntegrityError, UnreadableImageError
from models.image_io import read_image
from models.dicom_io import LutShapeConflict, check_not_blank
from models.polarity import POLARITY_FILE, POLARITY_SOURCE, PolarityTemplate
from models.preprocess import (INPUT_SIZE, preprocess, preprocess_batch, preprocessing_id, reduce_to_source,
                               to_unit_range)

ImageLike = str | Path | np.ndarray

CLINICAL_NOTES = {
    "high_suspicion": "High suspicion of pneumonia: prioritise for radiologist review (triage aid, not a diagnosis).",
    "indeterminate": "Indeterminate: pneumonia possible; priority radiologist review advised (triage aid, not a "
                     "diagnosis).",
    "likely_normal": "Likely normal: low probability of pneumonia; routine reading order applies. It does not rule "
                     "pneumonia out (triage aid, not a diagnosis).",
}
"""Per stratum, in step with the worklist's default flags (URGENT, PRIORITY, ROUTINE). Why: the indeterminate note
advised routine-priority review beside a PRIORITY flag, and the likely-normal one read like a finding ("no
pneumonia pattern detected") for a band that holds some pneumonias (3 of 390 on the test source)."""


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """CUDA first when this onnxruntime build offers it, CPU always as the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = list(requested) if requested else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


CUDA_OPTIONS = {"use_tf32": "0"}
"""IEEE fp32 on CUDA. onnxruntime's CUDA provider runs fp32 convolutions in TF32 by default on
Ampere and later; on an H200 that moved the released model's probabilities by up to 0.0054 from
the CPU's over the 624 test images and changed one binary prediction, while the threshold and
strata were chosen on fp32 scores (README, "GPU hosts"; benchmarks/cuda_parity.py)."""


def session_providers(chosen: Sequence[str]) -> list[str | tuple[str, dict[str, str]]]:
    """`chosen` as onnxruntime's `providers` argument, with CUDA_OPTIONS on the CUDA provider."""
    return [(name, dict(CUDA_OPTIONS)) if name == "CUDAExecutionProvider" else name for name in chosen]


def load_cuda_libraries(ort: Any, providers: Sequence[str]) -> bool:
    """Load CUDA and cuDNN from the nvidia-* wheels before a CUDA session is made; True if tried.

    onnxruntime-gpu's CUDA provider opens libcudart, libcublas and libcudnn through the
    system loader, which does not search the site-packages where the `gpu` extra's nvidia-*
    wheels put them. `import torch` would load them first, but serving never imports torch,
    so without this a pip-only GPU host falls back to the CPU. `preload_dlls` (onnxruntime
    1.21+) loads them from those wheels when they are installed (the gpu extra installs them,
    so they are the ones used) and otherwise by name from the loader path (a CUDA base image).
    """
    if "CUDAExecutionProvider" not in providers or not hasattr(ort, "preload_dlls"):
        return False
    ort.preload_dlls()
    return True


def ensure_provider_active(required: str | None, active: Sequence[str], available: Sequence[str]) -> None:
    """Raise unless `required` is among the session's active providers; say why it is not."""
    if not required or required in active:
        return
    if required not in available:
        hint = " (install the gpu extra, onnxruntime-gpu, instead of onnxruntime)" if "CUDA" in required else ""
        why = f"this onnxruntime build offers only {', '.join(available)}{hint}"
    else:
        why = "onnxruntime could not start it (no visible GPU, or a CUDA/cuDNN/driver mismatch: see its log above)"
    raise ExecutionProviderError(f"{required} required but not active; running on {', '.join(active)}: {why}")


class PneumoniaDetector:
    """Loads the ONNX model and its card once; thread-safe for concurrent `predict` calls.

    `require_provider` ("CUDAExecutionProvider") turns onnxruntime's silent fallback to the
    CPU into an `ExecutionProviderError`. An image whose pixels look inverted (bright lungs) raises
    `InvertedImageError`, and one stored turned by 90 or 180 degrees `RotatedImageError`, unless
    `polarity_check=False` (`models.polarity`).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        providers: Sequence[str] | None = None,
        *,
        intra_op_threads: int = 0,
        verify_sha256: bool = True,
        site_calibration: str | Path | None = None,
        require_provider: str | None = None,
        lut_shape_conflict: LutShapeConflict = "refuse",
        polarity_check: bool = True,
    ) -> None:
        import onnxruntime as ort

        self.lut_shape_conflict = lut_shape_conflict  # as the worker's TRIAGE_PRESENTATION_LUT_CONFLICT
        self.polarity_check = polarity_check  # as the worker's TRIAGE_POLARITY_CHECK
        self.polarity = load_polarity_template()

        self.model_path = Path(model_path) if model_path else default_model_path()
        if not self.model_path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.model_path}")
        self.card = load_card(self.model_path, verify_sha256=verify_sha256, site_calibration=site_calibration)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        chosen = choose_providers(providers)
        load_cuda_libraries(ort, chosen)
        self.session = ort.InferenceSession(str(self.model_path), sess_options=options,
                                            providers=session_providers(chosen))
        check_graph_matches_card(self.session, self.card, self.model_path.name)
        ensure_provider_active(require_provider, self.session.get_providers(), ort.get_available_providers())
        self.input_name = self.session.get_inputs()[0].name

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits (N, 2) for preprocessed inputs (N, 3, 224, 224)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(self.card.input_shape[1:]):
            raise ValueError(f"expected (N, {', '.join(map(str, self.card.input_shape[1:]))}), got {batch.shape}")
        return self.session.run(None, {self.input_name: batch})[0]

    def pneumonia_probability(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated P(pneumonia) for preprocessed inputs: softmax(logits / T)[:, 1]."""
        if len(batch) == 0:
            return np.zeros(0, dtype=np.float64)
        return calibrated_probability(self.logits(batch), self.card.temperature)

    def predict(self, image: ImageLike) -> dict[str, Any]:
        return self.describe(float(self.pneumonia_probability(self.network_input(image)[None])[0]))

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """The contract's preprocessing at this model's source size -> (N, 3, 224, 224), and nothing more: no blank
        or polarity check (`network_input` and `checked_input` make them; studies and benchmarks use this)."""
        return preprocess_batch(images, self.card.source_size)

    def predict_batch(self, images: Iterable[ImageLike]) -> list[dict[str, Any]]:
        """One result per input, in order; one unreadable or missing input refuses the batch, naming its
        position (from 1). Read and scored `BATCH_CHUNK` at a time: the whole list in one session run held
        every input and its activations at once (about 7 MB an image: 1.3 GiB for 128, tens of GB for a
        folder of thousands), for no gain past a small batch on a CPU. Any iterable of inputs is taken (a
        generator such as `folder.glob("*.dcm")` too): its items are listed first, they are paths or arrays."""
        images = list(images)  # chunked by len() and slices, which a generator or a dict's values lack
        probabilities: list[float] = []
        for start in range(0, len(images), BATCH_CHUNK):
            inputs = []
            for index, image in enumerate(images[start:start + BATCH_CHUNK], start):
                try:
                    inputs.append(self.network_input(image))
                except (UnreadableImageError, FileNotFoundError) as exc:
                    raise type(exc)(f"input {index + 1} of {len(images)}: {exc}") from exc
            probabilities.extend(float(p) for p in self.pneumonia_probability(np.stack(inputs)))
        return [self.describe(p) for p in probabilities]

    def network_input(self, image: ImageLike) -> np.ndarray:
        """One path or array -> its (3, 224, 224) network input.

        A blank picture (99% of it one grey level) is refused, as a blank DICOM is: an all-black PNG
        was scored 0.73 pneumonia. The whole image is brought to display values (a subsample could
        miss the few bright pixels that make a 16-bit image full-range); the share is counted on a
        grid."""
        loaded = load_any(image, self.lut_shape_conflict)
        small = reduce_to_source(loaded, self.card.source_size)  # the contract's refusals (size, aspect) first,
        check_not_blank(to_unit_range(loaded))  # then a blank picture, before the polarity check reads it
        return self._from_reduction(loaded, small, self.polarity_check)

    def checked_input(self, image: np.ndarray, check_polarity: bool | None = None) -> np.ndarray:
        """A loaded image's network input (3, 224, 224): the contract's refusals (size, aspect), then the polarity
        check unless `check_polarity` (default: this detector's `polarity_check`) is False. The image is shrunk
        once: `preprocess` of its reduction equals `preprocess` of the image (a reduction is its own), and at the
        shipped size the polarity check reads the same reduction (a second shrink cost 12 ms on 2500x2048)."""
        small = reduce_to_source(image, self.card.source_size)
        return self._from_reduction(image, small, self.polarity_check if check_polarity is None else check_polarity)

    def _from_reduction(self, image: np.ndarray, small: np.ndarray, check_polarity: bool) -> np.ndarray:
        """`image`'s network input from `small`, its reduction made by the caller just before."""
        if check_polarity:
            self.check_polarity(small if self.card.source_size == POLARITY_SOURCE else image)
        return preprocess(small, self.card.source_size)

    def check_polarity(self, image: np.ndarray) -> float:
        """`InvertedImageError` for an image that looks shown the wrong way round, `RotatedImageError` for one that
        looks stored turned (`models.polarity`): scored as it is, an inverted normal reads like pneumonia and a
        sideways pneumonia often like a normal. Its correlation with a chest radiograph otherwise.
        `network_input` (so `predict` and `predict_batch`) calls it unless the detector was made with
        `polarity_check=False`."""
        return self.polarity.check(image)

    def describe(self, probability: float) -> dict[str, Any]:
        """Turn a calibrated probability into the original design's result dictionary."""
        normal, pneumonia = self.card.labels
        is_pneumonia = probability >= self.card.threshold
        stratum = self.card.stratum_for(probability)
        prediction = pneumonia if is_pneumonia else normal
        note = CLINICAL_NOTES.get(stratum, stratum)
        if (stratum == "high_suspicion" and not is_pneumonia) or (stratum == "likely_normal" and is_pneumonia):
            # the strata are cut for triage targets, the prediction at one threshold: say which one the note follows
            note += (f" (The probability {probability:.2f} is {'below' if not is_pneumonia else 'at or above'} the "
                     f"{self.card.threshold:g} threshold of the binary prediction, which reads {prediction}; "
                     "triage follows the stratum.)")
        return {
            "prediction": prediction,
            "confidence": probability if is_pneumonia else 1.0 - probability,
            "probabilities": {normal: 1.0 - probability, pneumonia: probability},
            "clinical_note": note,
            "stratum": stratum,
        }


BATCH_CHUNK = 16
"""Inputs per session run in `predict_batch`: past about 16, onnxruntime on a CPU gains nothing (README,
worker sizing) while memory grows with every image."""


def calibrated_probability(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Numerically stable two-class softmax of temperature-scaled logits."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    return 1.0 / (1.0 + np.exp(scaled[:, 0] - scaled[:, 1]))


def load_polarity_template() -> PolarityTemplate:
    """The shipped polarity template, or `ModelIntegrityError` naming it: a detector must not start with a check
    that would fail every image."""
    try:
        return PolarityTemplate.load(POLARITY_FILE)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelIntegrityError(f"polarity template {POLARITY_FILE.name} is unreadable or unusable "
                                  f"({type(exc).__name__}: {exc})") from exc


def load_card(model_path: Path, *, verify_sha256: bool = True,
              site_calibration: str | Path | None = None) -> ModelCard:
    """Load the card beside the model, check it describes this very file, apply a site calibration."""
    card_path = card_path_for(model_path)
    if not card_path.is_file():
        raise ModelIntegrityError(f"model card missing: {card_path}")
    try:
        card = ModelCard.load(card_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # truncated JSON, a field missing, mistyped or implausible
        raise ModelIntegrityError(f"model card {card_path.name} is unreadable, incomplete or implausible "
                                  f"({type(exc).__name__}: {exc})") from exc
    expected = preprocessing_id(card.source_size)
    if card.preprocessing != expected:
        raise ModelIntegrityError(f"card preprocessing {card.preprocessing!r} differs from this code's {expected!r}")
    network_input = (3, INPUT_SIZE, INPUT_SIZE)
    if len(card.input_shape) != 4 or tuple(card.input_shape[1:]) != network_input:
        raise ModelIntegrityError(f"card input_shape {list(card.input_shape)} differs from this code's network input "
                                  f"(N, {', '.join(map(str, network_input))})")
    if verify_sha256 and sha256_of(model_path) != card.sha256:
        raise ModelIntegrityError(f"sha256 of {model_path.name} does not match its card")
    if site_calibration is not None:
        from models.site_calibration import SiteCalibration

        card = SiteCalibration.load(site_calibration).apply(card)
    return card


def check_graph_matches_card(session: Any, card: ModelCard, model_name: str) -> None:
    """Refuse a graph whose interface is not the card's: its input (batch, 3, 224, 224) and its output
    (batch, one logit per label). The sha256 binds the card to a file, not to what the file computes: a graph
    taking 256x256 loaded and then failed every image at inference, and one with three outputs was scored on
    the first two. A dimension the graph leaves symbolic (the batch) matches any."""
    def differs(graph_dims: Sequence[Any] | None, card_dims: Sequence[Any]) -> bool:
        if graph_dims is None:  # a shape neither declared nor inferred: nothing to compare
            return False
        return len(graph_dims) != len(card_dims) or any(
            isinstance(g, int) and g >= 0 and isinstance(c, int) and c >= 0 and g != c
            for g, c in zip(graph_dims, card_dims))

    graph_input, graph_output = session.get_inputs()[0], session.get_outputs()[0]
    if differs(graph_input.shape, card.input_shape):
        raise ModelIntegrityError(f"{model_name}: graph input {graph_input.name} {list(graph_input.shape)} differs "
                                  f"from its card's input_shape {list(card.input_shape)}")
    if differs(graph_output.shape, [-1, len(card.labels)]):
        raise ModelIntegrityError(f"{model_name}: graph output {graph_output.name} {list(graph_output.shape)} differs "
                                  f"from its card's {len(card.labels)} labels (batch, {len(card.labels)})")


def load_any(image: ImageLike, lut_shape_conflict: LutShapeConflict = "refuse") -> np.ndarray:
    """Path or array -> grayscale array; arrays pass through unchanged."""
    if isinstance(image, np.ndarray):
        return image
    if isinstance(image, (str, Path)):
        return read_image(image, lut_shape_conflict)
    raise UnreadableImageError(f"unsupported input type {type(image).__name__}")
