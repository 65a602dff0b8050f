"""Stage 1 alternative: a seed ensemble of finished runs, shipped as one ONNX graph.

The seed ensemble is the one method that has reached the original design's AUC here, but
three fp32 ResNet-50s break the 100 MB artifact budget and triple the worker's cost. With
int8 members (`--int8`, the `quantize` stage's static QDQ) three of them weigh about 75 MB
and run at 0.70-0.85x one fp32 model's worker throughput on a 2-core CPU (the low end when
members average the flip, which costs them two passes). The graph keeps the serving contract
(`image` N x 3 x 224 x 224 -> `logits` N x 2, the mean of the members' logits), so the
worker and `PneumoniaDetector` load it unchanged.

Like any run it is chosen on validation and scored on test once: the temperature, the
operating threshold and the strata are fitted on validation for the combined graph itself
(int8 moves single probabilities), from its served logits.

    pneumonia-train ensemble runs/base-42 runs/base-7 runs/base-2026 --int8 --data-root DATA --out-dir runs/ens-a
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import compose, helper

from models.atomic import write_text, write_whole
from models.calibration import calibrate
from models.card import DEFAULT_MODEL_NAME, ModelCard, card_path_for, sha256_of
from training.config import TrainConfig, trained_fields
from training.data import load_split
from training.errors import InputMissingError, RefusedError
from training.evaluate import Evaluation, test_metrics, write_predictions
from training.export import build_card
from training.metrics import softmax_pneumonia
from training.quantize import calibration_pick, quantize_onnx, served_logits
from training.train import check_combined_out_dir, check_distinct_runs, start_out_dir

log = logging.getLogger(__name__)
MEMBER_FILE = f"{DEFAULT_MODEL_NAME}.onnx"
PARITY_TOLERANCE = 1e-4


def combine(member_paths: list[Path], out_path: Path) -> None:
    """One graph: the members side by side on the shared input, `logits` = the mean of theirs."""
    members = [onnx.load(str(p)) for p in member_paths]
    prefixed = [compose.add_prefix(m, f"member{i}_", rename_inputs=False) for i, m in enumerate(members)]
    outputs = [m.graph.output[0].name for m in prefixed]
    opsets: dict[str, int] = {}
    for member in members:
        for opset in member.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    graph = helper.make_graph(
        [node for m in prefixed for node in m.graph.node] + [helper.make_node("Mean", outputs, ["logits"])],
        "seed_ensemble", [members[0].graph.input[0]],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 2])],
        initializer=[init for m in prefixed for init in m.graph.initializer])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              ir_version=members[0].ir_version)
    onnx.checker.check_model(model)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(out_path, lambda handle: handle.write(model.SerializeToString()), binary=True)  # < 2 GB: one protobuf


def member_files(run_dirs: list[Path]) -> list[Path]:
    if len(run_dirs) < 2:
        raise RefusedError("an ensemble needs at least two runs")
    paths = [d / MEMBER_FILE for d in run_dirs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputMissingError(f"exported model missing (run `pneumonia-train run` or `export` first): {', '.join(missing)}")
    check_distinct_runs(run_dirs, "ensemble")
    return paths


def build_ensemble(run_dirs: list[Path], config: TrainConfig, int8: bool, calibration_images: int = 256,
                   overwrite: bool = False) -> dict:
    """Write `config.out_dir/pneumonia_resnet50.onnx` from the runs' exported models; return the run_info.

    `overwrite` lets the ensemble replace a run already in `out_dir` (never one of its own members:
    `check_combined_out_dir`); config.json is written once those checks have passed."""
    started = time.perf_counter()
    fp32_members = member_files(run_dirs)
    check_combined_out_dir(config.out_dir, run_dirs, overwrite, "ensemble")
    out = config.out_dir
    start_out_dir(config, overwrite)
    members = fp32_members
    if int8:
        val = load_split(config.data_root, "val", config.image_size, config.subset)
        pick = calibration_pick(len(val.labels), calibration_images, config.seed)
        members = int8_member_files(config, len(fp32_members))
        for fp32, int8_member in zip(fp32_members, members):
            quantize_onnx(fp32, int8_member, val.images[pick], config.image_size)
    combine(members, out / MEMBER_FILE)
    write_text(out / "history.json", "[]\n")
    recipes = [json.loads((d / "config.json").read_text()) for d in run_dirs]
    log.info("ensemble of %d runs (seeds %s, %s) -> %s", len(run_dirs), [r["seed"] for r in recipes],
             "int8" if int8 else "fp32", out)
    return {"ensemble_of": [member_record(d, p, recipe) for d, p, recipe in zip(run_dirs, fp32_members, recipes)],
            "members": "int8" if int8 else "fp32", "calibration_images": calibration_images if int8 else 0,
            "best_epoch": None, "epochs_run": 0, "train_seconds": time.perf_counter() - started,
            "train_img_per_s": 0.0, "runtime": f"cpu/{'int8' if int8 else 'fp32'}", "select_metric": config.select_metric}


def member_record(run_dir: Path, fp32: Path, recipe: dict) -> dict:
    """One member as the ensemble's run_info and card name it: its model, and the recipe and start weights
    it was trained with (the card's `training` is the first member's; seeds and more may differ)."""
    card = ModelCard.load(card_path_for(fp32))
    return {"run": str(run_dir), "seed": recipe["seed"], "fp32_sha256": sha256_of(fp32), "card_version": card.version,
            "weights_origin": card.extra.get("weights_origin"), "training": trained_fields(recipe)}


def int8_member_files(config: TrainConfig, count: int) -> list[Path]:
    return [config.out_dir / f"member{i}.int8.onnx" for i in range(count)]


def evaluate_ensemble(run_dirs: list[Path], config: TrainConfig, int8: bool) -> tuple[Evaluation, dict]:
    """Choose temperature, threshold and strata on validation from the graph's served logits; score test once.

    Also returns the parity of the combined graph against the mean of the fp32 members'
    own served logits: exact (<= 1e-4) for fp32 members, the int8 error otherwise, with
    each int8 member's own error against its fp32 model.
    """
    import onnxruntime as ort

    def logits_of(path: Path, images: np.ndarray) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return served_logits(session, images, config.image_size)

    val = load_split(config.data_root, "val", config.image_size, config.subset)
    test = load_split(config.data_root, "test", config.image_size, config.subset)
    graph = config.out_dir / MEMBER_FILE
    val_logits, test_logits = logits_of(graph, val.images), logits_of(graph, test.images)
    fit = calibrate(val.labels, val_logits, config.strata)
    metrics = test_metrics(val, {False: val_logits}, test, {False: test_logits}, False, fit.temperature, fit.threshold,
                           fit.strata, config)
    write_predictions(config.out_dir, val, val_logits, test, test_logits)
    def max_delta(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(softmax_pneumonia(a, fit.temperature) - softmax_pneumonia(b, fit.temperature)).max())

    fp32_members = [logits_of(p, test.images) for p in member_files(run_dirs)]
    delta = max_delta(test_logits, np.mean(fp32_members, axis=0))
    parity = {"images": int(len(test.images)), "against": "mean of the fp32 members' served logits",
              "max_abs_delta_probability": delta, "tolerance": PARITY_TOLERANCE, "passed": delta <= PARITY_TOLERANCE}
    if int8:
        parity["members_int8_vs_fp32"] = [max_delta(logits_of(p, test.images), fp32)
                                          for p, fp32 in zip(int8_member_files(config, len(run_dirs)), fp32_members)]
    return Evaluation(False, fit.temperature, fit.threshold, fit.strata, metrics), parity


def write_card(config: TrainConfig, evaluation: Evaluation, parity: dict, version: str,
               run_info: dict) -> Path:
    """The model card of the combined graph, naming its members; fp32 members must pass parity."""
    path = config.out_dir / MEMBER_FILE
    if run_info["members"] == "fp32" and not parity["passed"]:
        raise RuntimeError(f"ensemble graph differs from its members' mean: {parity}")
    card = build_card(path, config, evaluation, parity, version, run_info, run_info["ensemble_of"][0].get("weights_origin"))
    card = ModelCard.from_dict({**card.to_dict(), "ensemble": {"members": run_info["ensemble_of"],
                                                               "precision": run_info["members"],
                                                               "combination": "mean of the members' logits"}})
    card.save(card_path_for(path))
    return path
