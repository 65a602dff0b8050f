"""ONNX export of the flip-averaged network: exact, and each weight used once (one int8 copy)."""

from collections import Counter

import numpy as np
import onnx
import pytest
import onnxruntime as ort
import torch
from torch import nn

from training.engine import FlipAveraged
from training.export import export_onnx
from training.quantize import quantize_onnx


def small_classifier() -> nn.Module:
    """A conv net with BatchNorm, most of its weights in convolutions (as in ResNet-50).

    Random kernels are left-right asymmetric, so flipping really changes its logits.
    """
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 64, 3, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2))
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return net.eval()


def weight_uses(path) -> Counter:
    """How many nodes read each of the network's parameters (exported under their module names)."""
    model = onnx.load(str(path))
    parameters = {init.name for init in model.graph.initializer if init.name.startswith("model.")}
    return Counter(name for node in model.graph.node for name in node.input if name in parameters)


def test_flip_averaged_export_is_exact_and_uses_each_weight_once(tmp_path):
    net = small_classifier()
    export_onnx(net, tmp_path / "tta.onnx", tta_hflip=True)
    images = np.random.default_rng(0).normal(size=(3, 3, 224, 224)).astype(np.float32)
    served = ort.InferenceSession(str(tmp_path / "tta.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]
    with torch.no_grad():
        x = torch.from_numpy(images)
        plain, mirrored = net(x).numpy(), net(torch.flip(x, dims=[3])).numpy()
    assert np.abs(plain - mirrored).max() > 1e-3  # the mirror matters for this net
    np.testing.assert_allclose(served, (plain + mirrored) / 2, atol=1e-5)
    np.testing.assert_allclose(FlipAveraged(net)(x).detach().numpy(), served, atol=1e-5)
    uses = weight_uses(tmp_path / "tta.onnx")
    assert len(uses) >= 4 and max(uses.values()) == 1


def int8_weight_bytes(path) -> int:
    return sum(len(init.raw_data) for init in onnx.load(str(path)).graph.initializer
               if init.data_type == onnx.TensorProto.INT8)


def test_int8_flip_averaged_model_keeps_one_copy_of_its_weights(tmp_path):
    """Two calls of the network would fuse each Conv+BatchNorm twice and quantise both copies."""
    net = small_classifier()
    export_onnx(net, tmp_path / "plain.onnx", tta_hflip=False)
    export_onnx(net, tmp_path / "tta.onnx", tta_hflip=True)
    calibration = np.random.default_rng(1).integers(0, 256, size=(8, 28, 28), dtype=np.uint8)
    for name in ("plain", "tta"):
        quantize_onnx(tmp_path / f"{name}.onnx", tmp_path / f"{name}.int8.onnx", calibration, 28)
    plain, tta = (int8_weight_bytes(tmp_path / f"{name}.int8.onnx") for name in ("plain", "tta"))
    assert plain > 19_000 and tta == plain


def test_evaluation_scores_the_contracts_numpy_input_bit_for_bit():
    """Training evaluation feeds the network exactly what serving feeds it: the output of
    `models.preprocess`, not its torch twin (equal only to about 1e-6)."""
    from models.preprocess import preprocess_batch
    from training.engine import predict_logits
    from training.runtime import Runtime

    from tests.training.conftest import TinyNet

    model = TinyNet(hidden=8, dropout=0.5)
    fed: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, args: fed.append(args[0].detach().clone()))
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    predict_logits(model, images, Runtime(torch.device("cpu"), "fp32"), batch_size=2)
    assert np.array_equal(torch.cat(fed).numpy(), preprocess_batch(images, 28))


def test_the_card_names_where_the_weights_came_from(weights_path, tmp_path):
    """A file name says little: the card records the offline weights' provenance and licence by sha256."""
    from training.config import TrainConfig
    from training.export import weights_origin

    assert weights_origin(TrainConfig(weights="none"))["source"].startswith("random initialisation")
    assert weights_origin(TrainConfig(weights="IMAGENET1K_V2"))["licence"] == "BSD-3-Clause"
    unknown = tmp_path / "mine.safetensors"
    unknown.write_bytes(b"not weights")
    assert weights_origin(TrainConfig(weights=str(unknown)))["source"] == "a local file of unknown provenance"
    if weights_path is None:
        pytest.skip("the offline ImageNet weights are not here (CI has them in ../shared/weights)")
    origin = weights_origin(TrainConfig(weights=str(weights_path), resnet_v1_strides=True))
    assert origin["licence"] == "MIT" and "He et al." in origin["source"] and origin["resnet_v1_strides"]
