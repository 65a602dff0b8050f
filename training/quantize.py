"""Optional stage: an int8 (QDQ, static) variant of the released ONNX model.

Why: on CPUs with AVX512-VNNI int8 convolutions run several times faster than fp32,
which matters for a 2-core hospital VM. It is only a candidate: it ships with its own
parity figure (max |delta P| against the fp32 model) and test AUC next to the fp32 AUC,
and the fp32 model stays the default. Calibration uses validation images only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from models.atomic import written_whole
from models.card import ModelCard, card_path_for
from models.preprocess import preprocess_batch
from training.config import TrainConfig
from training.data import Split, load_split
from training.metrics import roc_auc, softmax_pneumonia

log = logging.getLogger(__name__)


class _ValidationReader:
    """onnxruntime CalibrationDataReader over preprocessed validation images."""

    def __init__(self, images: np.ndarray, source_size: int, batch_size: int = 16) -> None:
        self._batches = iter([preprocess_batch(images[i : i + batch_size], source_size)
                              for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {"image": batch}


def served_logits(session, images: np.ndarray, source_size: int) -> np.ndarray:
    """Logits of the serving path: the contract's numpy preprocessing, then an onnxruntime session."""
    return np.concatenate([session.run(None, {"image": preprocess_batch(images[i : i + 32], source_size)})[0]
                           for i in range(0, len(images), 32)])


def calibration_pick(available: int, wanted: int, seed: int) -> np.ndarray:
    """Sorted indices of the validation images whose activations set the int8 ranges."""
    return np.sort(np.random.default_rng(seed).choice(available, size=min(wanted, available), replace=False))


def quantize_onnx(fp32_path: Path, int8_path: Path, calibration: np.ndarray, source_size: int) -> None:
    """Static int8 (QDQ: uint8 activations, per-channel int8 weights) with ranges from `calibration` images."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with written_whole(int8_path) as staged:  # the prepared graph is made beside it, and goes with its folder
        prepared = staged.with_name(staged.stem + ".prep.onnx")
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(staged), _ValidationReader(calibration, source_size),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True)


def variant_card(path: Path, fp32_card: ModelCard, config: TrainConfig, val: Split, test: Split,
                 val_logits: np.ndarray, test_logits: np.ndarray, check: dict) -> ModelCard:
    """The variant's own card: int8 moves single probabilities, so its temperature, operating point and
    strata are refitted on validation from its own logits and test is scored with them, as `evaluate`
    does for a trained model. Nothing is inherited from the fp32 card's figures; its start weights are
    the fp32 card's (`config` names them by a path that may not lead anywhere here)."""
    from models.calibration import calibrate
    from training.evaluate import Evaluation, test_metrics
    from training.export import build_card

    tta_hflip = bool(fp32_card.extra.get("onnx", {}).get("tta_hflip_in_graph", False))  # inside the quantised graph
    fit = calibrate(val.labels, val_logits, config.strata)
    metrics = test_metrics(val, {False: val_logits}, test, {False: test_logits}, False, fit.temperature,
                           fit.threshold, fit.strata, config)
    evaluation = Evaluation(tta_hflip, fit.temperature, fit.threshold, fit.strata, metrics)
    parity = {"against": "the fp32 model it was quantised from (int8 is not expected to match to 1e-4)",
              "max_abs_delta_probability": check["max_abs_delta_probability_vs_fp32"]}
    return build_card(path, config, evaluation, parity, fp32_card.version, fp32_card.extra.get("timing", {}),
                      fp32_card.extra.get("weights_origin"))


def quantize(fp32_path: Path, config: TrainConfig, calibration_images: int = 256) -> Path:
    """Write `<name>.int8.onnx` + card beside the fp32 model and return its path."""
    import onnxruntime as ort

    val = load_split(config.data_root, "val", config.image_size, config.subset)
    test = load_split(config.data_root, "test", config.image_size, config.subset)
    int8_path = fp32_path.with_name(fp32_path.stem + ".int8.onnx")
    pick = calibration_pick(len(val.labels), calibration_images, config.seed)
    quantize_onnx(fp32_path, int8_path, val.images[pick], config.image_size)
    card = ModelCard.load(card_path_for(fp32_path))
    fp32 = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    timings = {}
    logits = {}
    for name, session in (("fp32", fp32), ("int8", int8)):
        start = time.perf_counter()
        logits[name] = served_logits(session, test.images, config.image_size)
        timings[name] = len(test.images) / (time.perf_counter() - start)
    p32, p8 = (softmax_pneumonia(logits[k], card.temperature) for k in ("fp32", "int8"))
    check = {"max_abs_delta_probability_vs_fp32": float(np.abs(p32 - p8).max()),
             "test_auc_fp32": roc_auc(test.labels, p32), "test_auc_int8": roc_auc(test.labels, p8),
             "test_images_per_s_fp32": timings["fp32"], "test_images_per_s_int8": timings["int8"],
             "calibration": f"{len(pick)} validation images"}
    log.info("int8 variant: %s", check)
    variant = variant_card(int8_path, card, config, val, test, served_logits(int8, val.images, config.image_size),
                           logits["int8"], check)
    variant = ModelCard.from_dict({**variant.to_dict(), "name": card.name + "-int8",
                                   "variant_of": {"file": fp32_path.name, "sha256": card.sha256}, "int8_check": check})
    variant.save(card_path_for(int8_path))
    return int8_path
