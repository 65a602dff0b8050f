"""Stage 2: honest evaluation of the kept checkpoint.

Everything that is chosen (test-time flip averaging or not, temperature, operating
threshold, strata cut-points) is chosen on the validation split. The test split is
scored once, at the end, and only reported.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import classification_report

from models.atomic import write_text, write_whole
from models.calibration import (StrataTargets, binary_metrics, bootstrap_ci, calibrate, confusion, exact_rate_ci,
                                fit_temperature, nll, per_class_metrics, stratum_report, temperature_at_edge)
from models.card import LABELS, Stratum, sha256_of, strict_json
from training.config import TrainConfig
from training.errors import RefusedError
from training.data import Split, load_split
from training.engine import predict_logits
from training.metrics import (THRESHOLD_METRICS, brier, expected_calibration_error, reliability_curve, roc_auc,
                              sensitivity_at_specificity, softmax_pneumonia, specificity_at_sensitivity)
from training.model import build_model
from training.runtime import Runtime

log = logging.getLogger(__name__)
CLAIMED_SENSITIVITY, CLAIMED_SPECIFICITY = 0.9718, 0.8547
"""The original design's reported test operating point. Each run's test ROC is read at it
(sensitivity at that specificity, specificity at that sensitivity), so the claim can be
compared without choosing a threshold on test."""
ROC_POINTS = (f"sensitivity_at_specificity_{CLAIMED_SPECIFICITY}", f"specificity_at_sensitivity_{CLAIMED_SENSITIVITY}")


@dataclass(frozen=True)
class Evaluation:
    tta_hflip: bool
    temperature: float
    operating_threshold: float
    strata: tuple[Stratum, ...]
    metrics: dict


def load_trained(checkpoint: Path, config: TrainConfig, runtime: Runtime) -> torch.nn.Module:
    model = build_model("none", hidden=config.hidden, dropout=config.dropout, resnet_v1_strides=config.resnet_v1_strides)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return model.to(runtime.device, memory_format=runtime.memory_format).eval()


def logits_plain_and_flipped(model: torch.nn.Module, split: Split, config: TrainConfig, runtime: Runtime) -> dict:
    plain = predict_logits(model, split.images, runtime, config.eval_batch_size)
    mirrored = predict_logits(model, split.images[:, :, ::-1].copy(), runtime, config.eval_batch_size)
    return {False: plain, True: (plain + mirrored) / 2}


def full_report(labels: np.ndarray, probability: np.ndarray, threshold: float, rounds: int, seed: int) -> dict:
    """Point estimates and 95% bootstrap CIs of every threshold metric plus AUC, of the confusion counts and of
    the per-class report, all from the same resampled cases (the metrics' CIs are those they were before the
    other two were added: the draws depend on the seed and the number of cases only)."""
    def statistic(y: np.ndarray, p: np.ndarray) -> dict:
        predicted = p >= threshold
        return {**binary_metrics(y, p, threshold), "auc": roc_auc(y, p),
                **{f"confusion/{k}": float(v) for k, v in confusion(y, predicted).items()},
                **{f"per_class/{name}/{figure}": value for name, figures in per_class_metrics(y, predicted).items()
                   for figure, value in figures.items()}}

    point = statistic(labels, probability)
    ci = bootstrap_ci(labels, probability, statistic, rounds=rounds, seed=seed)
    predicted = (probability >= threshold).astype(int)
    return {
        "threshold": threshold,
        "point": {k: v for k, v in point.items() if "/" not in k},
        "ci95": {k: v for k, v in ci.items() if "/" not in k},
        "ci95_exact": exact_rate_ci(confusion(labels, predicted)),
        "confusion": confusion(labels, predicted),
        "confusion_ci95": {k.split("/")[1]: v for k, v in ci.items() if k.startswith("confusion/")},
        "per_class": classification_report(labels, predicted, target_names=list(LABELS), output_dict=True,
                                           zero_division=np.nan),  # undefined is null, as in `point`, not 0.0
        "per_class_ci95": nested_ci(ci, "per_class/"),
    }


def nested_ci(ci: dict, prefix: str) -> dict[str, dict[str, tuple[float, float]]]:
    """{'Normal': {'precision': (lo, hi), ...}, ...} from the flat keys 'per_class/Normal/precision'."""
    nested: dict[str, dict[str, tuple[float, float]]] = {}
    for key, value in ci.items():
        if key.startswith(prefix):
            name, figure = key[len(prefix):].split("/")
            nested.setdefault(name, {})[figure] = value
    return nested


def roc_points(labels: np.ndarray, probability: np.ndarray, rounds: int, seed: int) -> dict:
    """The ROC curve read at the claimed point, with 95% bootstrap CIs (threshold-free, like AUC)."""
    def statistic(y: np.ndarray, p: np.ndarray) -> dict:
        return dict(zip(ROC_POINTS, (sensitivity_at_specificity(y, p, CLAIMED_SPECIFICITY),
                                     specificity_at_sensitivity(y, p, CLAIMED_SENSITIVITY))))

    return {"point": statistic(labels, probability),
            "ci95": bootstrap_ci(labels, probability, statistic, rounds=rounds, seed=seed)}


CALIBRATION_DEFINITION = ("ECE: expected calibration error of P(pneumonia) over 10 equal-width bins, weighted by "
                          "the share of cases in each (not the top-label ECE); Brier: mean squared error of P(pneumonia)")


def calibration_report(labels: np.ndarray, logits: np.ndarray, temperature: float, rounds: int = 0,
                       seed: int = 0) -> dict:
    """ECE, Brier and NLL before and after temperature scaling; with `rounds`, 95% bootstrap CIs of the ECE
    and Brier figures (the test report's; validation, which fitted the temperature, gets none)."""
    def statistic(y: np.ndarray, z: np.ndarray) -> dict:
        before, after = softmax_pneumonia(z), softmax_pneumonia(z, temperature)
        return {"ece_before": expected_calibration_error(y, before), "ece_after": expected_calibration_error(y, after),
                "brier_before": brier(y, before), "brier_after": brier(y, after)}

    report = {
        **statistic(labels, logits),
        "nll_before": nll(labels, logits, 1.0), "nll_after": nll(labels, logits, temperature),
        "reliability_after": reliability_curve(labels, softmax_pneumonia(logits, temperature)),
        "definition": CALIBRATION_DEFINITION,
    }
    if rounds:
        report["ci95"] = bootstrap_ci(labels, logits, statistic, rounds=rounds, seed=seed)
    return report


def choose_on_validation(val: Split, val_logits: dict, config: TrainConfig) -> tuple[bool, float, float, tuple]:
    """TTA by calibrated validation NLL, then temperature, Youden threshold and strata."""
    scored = {tta: nll(val.labels, val_logits[tta], fit_temperature(val.labels, val_logits[tta]))
              for tta in ((False, True) if config.tta_hflip else (False,))}
    tta = min(scored, key=scored.get)
    fit = calibrate(val.labels, val_logits[tta], config.strata)
    if temperature_at_edge(fit.temperature):
        log.warning("temperature %.3g is at the edge of its search range: validation is (nearly) separable or the "
                    "logits are degenerate, so calibrated probabilities may be saturated", fit.temperature)
    return tta, fit.temperature, fit.threshold, fit.strata


def evaluate(checkpoint: Path, config: TrainConfig, runtime: Runtime) -> Evaluation:
    """Choose TTA, temperature, threshold and strata on validation, then score test once.

    Runs in fp32 whatever precision trained the model: the figures describe the artifact that
    ships (fp32 ONNX), and bf16 autocast moves single probabilities enough to flip a case.
    """
    scoring = serving_runtime(runtime)
    model = load_trained(checkpoint, config, scoring)
    val = load_split(config.data_root, "val", config.image_size, config.subset)
    val_logits = logits_plain_and_flipped(model, val, config, scoring)
    check_finite(val_logits, checkpoint)
    tta, temperature, threshold, strata = choose_on_validation(val, val_logits, config)
    log.info("chosen on validation: tta=%s T=%.3f threshold=%.3f", tta, temperature, threshold)
    test = load_split(config.data_root, "test", config.image_size, config.subset)
    test_logits = logits_plain_and_flipped(model, test, config, scoring)  # the single look at test
    check_finite(test_logits, checkpoint)
    metrics = test_metrics(val, val_logits, test, test_logits, tta, temperature, threshold, strata, config)
    write_predictions(config.out_dir, val, val_logits[tta], test, test_logits[tta])
    return Evaluation(tta, temperature, threshold, strata, metrics)


def check_finite(logits: dict, checkpoint: Path) -> None:
    """Refuse a diverged model: sklearn failed on NaN logits with a traceback, and the metrics at a
    threshold counted NaN probabilities as Normal."""
    if not all(np.isfinite(value).all() for value in logits.values()):
        raise RefusedError(f"{checkpoint} gives non-finite logits: its training diverged (train again with a lower --lr)")


def serving_runtime(runtime: Runtime) -> Runtime:
    """The same device at the released artifact's precision (fp32)."""
    return replace(runtime, precision="fp32")


def test_metrics(val: Split, val_logits: dict, test: Split, test_logits: dict, tta: bool, temperature: float,
                 threshold: float, strata: tuple, config: TrainConfig) -> dict:
    p_test = softmax_pneumonia(test_logits[tta], temperature)
    p_val = softmax_pneumonia(val_logits[tta], temperature)
    return {
        "selection": {"tta_hflip": tta, "temperature": temperature, "operating_threshold": threshold,
                      "rule": "all chosen on validation; test scored once", "precision": "fp32"},
        "test": {
            "n": int(len(test.labels)), "prevalence": float(test.labels.mean()),
            "at_0.5": full_report(test.labels, p_test, 0.5, config.bootstrap, config.seed),
            "at_operating_point": full_report(test.labels, p_test, threshold, config.bootstrap, config.seed),
            "roc_points": roc_points(test.labels, p_test, config.bootstrap, config.seed),
            "calibration": calibration_report(test.labels, test_logits[tta], temperature, config.bootstrap, config.seed),
            "strata": stratum_report(test.labels, p_test, strata),
        },
        "validation": {
            "n": int(len(val.labels)), "auc": roc_auc(val.labels, p_val),
            "at_0.5": binary_metrics(val.labels, p_val, 0.5),
            "at_operating_point": binary_metrics(val.labels, p_val, threshold),
            "calibration": calibration_report(val.labels, val_logits[tta], temperature),
            "strata": stratum_report(val.labels, p_val, strata),
        },
        "ablation_tta_on_test": {
            str(v).lower(): {"auc": roc_auc(test.labels, softmax_pneumonia(test_logits[v])),
                             **binary_metrics(test.labels, softmax_pneumonia(test_logits[v], temperature), 0.5)}
            for v in test_logits  # both for a trained run; an ensemble graph has no flip variant
        },
        "metric_names": list(THRESHOLD_METRICS) + ["auc"],
    }


def write_predictions(out: Path, val: Split, val_logits: np.ndarray, test: Split, test_logits: np.ndarray) -> None:
    write_whole(out / "predictions.npz", lambda handle: np.savez_compressed(
        handle, val_labels=val.labels, val_logits=val_logits, test_labels=test.labels, test_logits=test_logits),
        binary=True)


EVALUATION_SETTINGS = ("tta_hflip", "bootstrap", "strata")
"""The evaluation stage's own flags (a later `export` may be given others): recorded beside its figures, so
the card states the settings its temperature, strata and CIs were chosen with."""


def save_evaluation(evaluation: Evaluation, path: Path, config: TrainConfig | None = None,
                    checkpoint_sha256: str | None = None) -> None:
    """`evaluation.json`: the validation choices and figures, with the sha256 of the checkpoint they
    describe and the settings they were made with (`EVALUATION_SETTINGS` of `config`)."""
    payload = {"tta_hflip": evaluation.tta_hflip, "temperature": evaluation.temperature,
               "operating_threshold": evaluation.operating_threshold,
               "strata": [s.__dict__ for s in evaluation.strata], "metrics": evaluation.metrics,
               "checkpoint_sha256": checkpoint_sha256,
               "settings": None if config is None else {k: config.to_dict()[k] for k in EVALUATION_SETTINGS}}
    write_text(path, strict_json(payload, indent=2) + "\n")


def evaluation_of(path: Path, checkpoint: Path, config: TrainConfig) -> tuple[Evaluation, TrainConfig]:
    """The evaluation in `path`, refused unless it was made from `checkpoint`, and `config` with the
    evaluation's own settings. Why: `train` into a folder that held an evaluated run rewrote best.pt and
    left evaluation.json, and `export` then shipped the new weights with the old model's temperature,
    strata, TTA choice and test figures; and the card recorded the export command's strata targets and
    bootstrap, not the ones the cut-points and CIs came from. A file from before these fields is taken
    as it is."""
    data = json.loads(path.read_text())
    recorded = data.get("checkpoint_sha256")
    if recorded is not None and recorded != sha256_of(checkpoint):
        raise RefusedError(f"{path} was computed from another {checkpoint.name} (trained again into this folder?): "
                           "run `pneumonia-train evaluate` on it first")
    settings = data.get("settings") or {}
    if "strata" in settings:
        settings = {**settings, "strata": StrataTargets(**settings["strata"])}
    return load_evaluation(path), replace(config, **settings)


def load_evaluation(path: Path) -> Evaluation:
    data = json.loads(path.read_text())
    return Evaluation(data["tta_hflip"], data["temperature"], data["operating_threshold"],
                      tuple(Stratum(**s) for s in data["strata"]), data["metrics"])
