"""Unlabeled site adaptation: refit the network's feature statistics to a site's own source.

Why: the model's BatchNorm statistics describe the training source. On another source (the
PneumoniaMNIST test split, or a hospital's scanners) the same layers see other statistics,
and the ranking suffers; a site has its own studies in volume but few labels. AdaBN (Li et
al. 2016) re-estimates those statistics on the new source without labels. The released
ONNX has its BatchNorms folded into the convolutions, so here the same thing is done at
every convolution output: the site's per-channel mean and standard deviation are mapped
onto the training source's, and the affine map folds back into the convolution's weights
and bias. The adapted model is an ONNX file of the same shape, made with numpy, onnx and
onnxruntime and no torch (onnx comes with the `train` extra; a site step would add it to `serve`).

The site's statistics are taken progressively, each layer's after the layers before it are
adapted (as BatchNorm in training mode sees them): one graph standardises every convolution
output with its own batch statistics, so the whole adaptation set goes through as one batch
(about 13 MB of memory per image).

Studied on the released model and not offered as a site step: on the shifted test split it
left AUC where it was (results/site_adaptation, declared before the runs). It stays so that a
future model can be checked with `benchmarks/site_adaptation_study.py`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from models.atomic import write_whole

EPSILON = 1e-5
"""Added to a variance before its square root, as PyTorch's BatchNorm does."""
_AXES = "adaptation_axes"


@dataclass(frozen=True)
class FeatureStatistics:
    """Per-channel mean and standard deviation of each convolution output over a set of images."""

    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]
    images: int

    def save(self, path: str | Path) -> None:
        arrays = {f"mean/{k}": v for k, v in self.mean.items()} | {f"std/{k}": v for k, v in self.std.items()}
        write_whole(path, lambda handle: np.savez_compressed(handle, images=np.int64(self.images), **arrays), binary=True)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStatistics":
        with np.load(path) as data:
            mean = {k[5:]: data[k] for k in data.files if k.startswith("mean/")}
            std = {k[4:]: data[k] for k in data.files if k.startswith("std/")}
            return cls(mean=mean, std=std, images=int(data["images"]))


def conv_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The graph's convolutions, in graph order (each had a BatchNorm after it in training)."""
    return [node for node in model.graph.node if node.op_type == "Conv"]


def _moment_nodes(name: str) -> list[onnx.NodeProto]:
    """mean_<y> and var_<y> (shape 1, C, 1, 1) of one convolution output over batch and space."""
    return [helper.make_node("ReduceMean", [name, _AXES], [f"mean_{name}"], keepdims=1),
            helper.make_node("Sub", [name, f"mean_{name}"], [f"centered_{name}"]),
            helper.make_node("Mul", [f"centered_{name}", f"centered_{name}"], [f"square_{name}"]),
            helper.make_node("ReduceMean", [f"square_{name}", _AXES], [f"var_{name}"], keepdims=1)]


def _alignment_nodes(name: str, source: FeatureStatistics) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """aligned_<y> = (y - batch mean) / batch std * source std + source mean."""
    constants = [numpy_helper.from_array(source.std[name].reshape(1, -1, 1, 1).astype(np.float32), f"source_std_{name}"),
                 numpy_helper.from_array(source.mean[name].reshape(1, -1, 1, 1).astype(np.float32), f"source_mean_{name}"),
                 numpy_helper.from_array(np.array(EPSILON, dtype=np.float32), f"epsilon_{name}")]
    nodes = [helper.make_node("Add", [f"var_{name}", f"epsilon_{name}"], [f"var_eps_{name}"]),
             helper.make_node("Sqrt", [f"var_eps_{name}"], [f"std_{name}"]),
             helper.make_node("Div", [f"source_std_{name}", f"std_{name}"], [f"scale_{name}"]),
             helper.make_node("Mul", [f"centered_{name}", f"scale_{name}"], [f"scaled_{name}"]),
             helper.make_node("Add", [f"scaled_{name}", f"source_mean_{name}"], [f"aligned_{name}"])]
    return nodes, constants


def statistics_graph(model: onnx.ModelProto, align_to: FeatureStatistics | None = None) -> onnx.ModelProto:
    """A copy of `model` that also outputs every convolution output's batch mean and variance.

    With `align_to`, each convolution output is replaced, for everything downstream, by its
    batch-standardised value rescaled to `align_to`'s statistics, so later layers' moments
    are those of the adapted network.
    """
    graph_model = copy.deepcopy(model)
    graph = graph_model.graph
    graph.initializer.append(numpy_helper.from_array(np.array([0, 2, 3], dtype=np.int64), _AXES))
    convs = {node.output[0] for node in conv_nodes(graph_model)}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        if node.output[0] not in convs:
            continue
        name = node.output[0]
        nodes += _moment_nodes(name)
        graph.output.extend([helper.make_tensor_value_info(f"{kind}_{name}", onnx.TensorProto.FLOAT, None)
                             for kind in ("mean", "var")])
        if align_to is not None:
            added, constants = _alignment_nodes(name, align_to)
            nodes += added
            graph.initializer.extend(constants)
    if align_to is not None:
        internal = {f"{kind}_{c}" for c in convs for kind in ("mean", "centered", "square", "var", "scaled")}
        for node in nodes:
            if node.output[0] in internal:
                continue
            for i, name in enumerate(node.input):
                if name in convs:
                    node.input[i] = f"aligned_{name}"
    del graph.node[:]
    graph.node.extend(nodes)
    return graph_model


def _session(model: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = False  # one large batch: free each activation as soon as it is dead
    options.enable_mem_pattern = False
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


def _moments(session, batch: np.ndarray, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    wanted = [f"{kind}_{n}" for n in names for kind in ("mean", "var")]
    values = session.run(wanted, {session.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)})
    return {n: (values[2 * i].reshape(-1).astype(np.float64), values[2 * i + 1].reshape(-1).astype(np.float64))
            for i, n in enumerate(names)}


def source_statistics(model: onnx.ModelProto, batches: Iterable[np.ndarray], threads: int = 0) -> FeatureStatistics:
    """Statistics of each convolution output of the unadapted model, streamed over batches.

    Every image contributes the same number of pixels, so batches combine by their sizes
    (Chan et al.'s pooled variance), exact whatever the batch sizes.
    """
    names = [node.output[0] for node in conv_nodes(model)]
    session = _session(statistics_graph(model), threads)
    total, means, second = 0, {n: 0.0 for n in names}, {n: 0.0 for n in names}
    for batch in batches:
        for name, (mean, var) in _moments(session, batch, names).items():
            means[name] = means[name] + len(batch) * mean
            second[name] = second[name] + len(batch) * (var + mean ** 2)
        total += len(batch)
    if total == 0:
        raise ValueError("source statistics need at least one image")
    mean = {n: means[n] / total for n in names}
    std = {n: np.sqrt(np.maximum(second[n] / total - mean[n] ** 2, 0.0) + EPSILON) for n in names}
    return FeatureStatistics(mean=mean, std=std, images=total)


def site_statistics(model: onnx.ModelProto, source: FeatureStatistics, images: np.ndarray,
                    threads: int = 0) -> FeatureStatistics:
    """Progressive statistics of the site's images, one batch (AdaBN's estimate)."""
    if len(images) < 2:
        raise ValueError(f"site adaptation needs at least 2 images, got {len(images)}")
    names = [node.output[0] for node in conv_nodes(model)]
    moments = _moments(_session(statistics_graph(model, align_to=source), threads), images, names)
    return FeatureStatistics(mean={n: m for n, (m, _) in moments.items()},
                             std={n: np.sqrt(v + EPSILON) for n, (_, v) in moments.items()}, images=len(images))


def fold_alignment(model: onnx.ModelProto, source: FeatureStatistics, site: FeatureStatistics) -> onnx.ModelProto:
    """A copy of `model` whose convolutions map the site's statistics onto the source's.

    y -> a * y + b with a = source std / site std and b = source mean - a * site mean, per
    output channel: W' = a W, bias' = a bias + b.
    """
    adapted = copy.deepcopy(model)
    initializers = {init.name: init for init in adapted.graph.initializer}
    users: dict[str, int] = {}
    for node in adapted.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    shared = [n.input[1] for n in conv_nodes(adapted) if users[n.input[1]] > 1]
    if shared:  # scaling a shared weight for one convolution would change the others
        raise ValueError(f"convolution weights used by more than one node cannot be adapted: {shared[:3]}")
    for node in conv_nodes(adapted):
        name = node.output[0]
        scale = source.std[name] / site.std[name]
        shift = source.mean[name] - scale * site.mean[name]
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
        initializers[node.input[1]].CopyFrom(numpy_helper.from_array(
            (weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))).astype(np.float32), node.input[1]))
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
            initializers[node.input[2]].CopyFrom(numpy_helper.from_array(
                (scale * bias + shift).astype(np.float32), node.input[2]))
        else:
            bias_name = f"adapted_bias_{name}"
            adapted.graph.initializer.append(numpy_helper.from_array(shift.astype(np.float32), bias_name))
            if len(node.input) == 2:
                node.input.append(bias_name)
            else:
                node.input[2] = bias_name
    return adapted


def adapt(model: onnx.ModelProto, source: FeatureStatistics, images: np.ndarray, threads: int = 0) -> onnx.ModelProto:
    """The model adapted to the site of `images` (preprocessed, N x 3 x 224 x 224), no labels."""
    return fold_alignment(model, source, site_statistics(model, source, images, threads))
