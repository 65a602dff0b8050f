"""Unlabeled site adaptation (AdaBN on a BN-fused ONNX): exact properties on a tiny graph, and the real model."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from models.adaptation import (FeatureStatistics, adapt, conv_nodes, fold_alignment, site_statistics, source_statistics,
                               statistics_graph)
from models.card import default_model_path
from models.preprocess import preprocess_batch


def tiny_network(with_bias: bool = True) -> onnx.ModelProto:
    """Conv(3->4, 3x3, no padding) -> Relu -> Conv(4->2, 1x1) -> global mean: two conv outputs to align."""
    rng = np.random.default_rng(0)
    first = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1")]
    if with_bias:
        first.append(numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b1"))
    second = [numpy_helper.from_array(rng.normal(size=(2, 4, 1, 1)).astype(np.float32), "w2"),
              numpy_helper.from_array(rng.normal(size=2).astype(np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["image", *(i.name for i in first)], ["c1"]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
             helper.make_node("GlobalAveragePool", ["c2"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [None, 2])],
                              initializer=first + second)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": images.astype(np.float32)})[0]


@pytest.fixture()
def source_images() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(40, 3, 8, 8)).astype(np.float32)


def test_adapting_to_the_source_itself_changes_nothing(source_images):
    model = tiny_network()
    source = source_statistics(model, [source_images[:15], source_images[15:]])
    assert np.abs(run(adapt(model, source, source_images), source_images) - run(model, source_images)).max() < 1e-4


def test_streamed_source_statistics_equal_the_whole_set_at_once(source_images):
    model = tiny_network()
    streamed = source_statistics(model, [source_images[:7], source_images[7:30], source_images[30:]])
    whole = source_statistics(model, [source_images])
    for name in streamed.mean:
        np.testing.assert_allclose(streamed.mean[name], whole.mean[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(streamed.std[name], whole.std[name], rtol=1e-5)
    # against numpy on the first convolution's output, hand-computed with a session that exposes it
    exposed = statistics_graph(model)
    c1 = ort.InferenceSession(exposed.SerializeToString()).run(["mean_c1"], {"image": source_images})[0]
    np.testing.assert_allclose(whole.mean["c1"], c1.reshape(-1), rtol=1e-5)


def test_an_affine_intensity_shift_is_undone_exactly(source_images):
    """Without padding, a*x + b at the input is a per-channel affine map of the first conv's
    output, so aligning its statistics recovers the source's activations and logits exactly."""
    model = tiny_network()
    source = source_statistics(model, [source_images])
    shifted = 1.7 * source_images + 0.4
    assert np.abs(run(model, shifted) - run(model, source_images)).max() > 0.1  # the shift matters
    adapted = adapt(model, source, shifted)
    np.testing.assert_allclose(run(adapted, shifted), run(model, source_images), atol=1e-4)


def test_adapted_model_has_the_source_statistics_on_the_site_progressively(source_images):
    """Every conv output of the folded model, measured on the site's images, matches the source:
    the second conv's statistics were taken after the first was adapted."""
    model = tiny_network(with_bias=False)
    source = source_statistics(model, [source_images])
    site_images = np.random.default_rng(2).gamma(2.0, size=(30, 3, 8, 8)).astype(np.float32)
    adapted = adapt(model, source, site_images)
    measured = source_statistics(adapted, [site_images])
    for name in ("c1", "c2"):
        np.testing.assert_allclose(measured.mean[name], source.mean[name], atol=1e-4)
        np.testing.assert_allclose(measured.std[name], source.std[name], rtol=1e-4)
    assert "adapted_bias_c1" in {i.name for i in adapted.graph.initializer}  # a bias-less conv gets one
    assert [n.op_type for n in adapted.graph.node] == [n.op_type for n in model.graph.node]  # same shape of graph


def test_a_weight_shared_by_two_convolutions_is_refused(source_images):
    model = tiny_network()
    source = source_statistics(model, [source_images])
    twin = copy.deepcopy(model)
    twin.graph.node.insert(1, helper.make_node("Conv", ["image", "w1", "b1"], ["c1_twin"]))
    twin.graph.node[2].input[0] = "c1_twin"  # the Relu now reads the twin; c1 stays in the graph, unused
    with pytest.raises(ValueError, match="more than one node"):
        fold_alignment(twin, source, source)


def test_statistics_round_trip(tmp_path, source_images):
    statistics = source_statistics(tiny_network(), [source_images])
    statistics.save(tmp_path / "stats.npz")
    loaded = FeatureStatistics.load(tmp_path / "stats.npz")
    assert loaded.images == 40 and set(loaded.mean) == {"c1", "c2"}
    np.testing.assert_array_equal(loaded.std["c2"], statistics.std["c2"])


def test_too_few_images_are_refused(source_images):
    model = tiny_network()
    source = source_statistics(model, [source_images])
    with pytest.raises(ValueError, match="at least 2 images"):
        site_statistics(model, source, source_images[:1])
    with pytest.raises(ValueError, match="at least one image"):
        source_statistics(model, [])


def test_released_model_adapted_to_its_own_source_is_unchanged(pneumoniamnist):
    """The real graph: 53 convolutions found, and adapting to the source images is the identity."""
    model = onnx.load(str(default_model_path()))
    assert len(conv_nodes(model)) == 53
    images = preprocess_batch(pneumoniamnist["train_images"][:12])
    source = source_statistics(model, [images])
    assert np.abs(run(adapt(model, source, images), images) - run(model, images)).max() < 1e-3
