"""The ensemble graph: exactly the mean of its members' logits, on the serving contract's names."""

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from training.ensemble import combine, member_files
from training.errors import RefusedError


def linear_member(path, seed: int):
    """image (N, 3, 2, 2) -> Flatten -> Gemm -> logits (N, 2), with its own weights."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])],
        "member", [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", 3, 2, 2])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(rng.normal(size=(12, 2)).astype(np.float32), "w"),
                     numpy_helper.from_array(rng.normal(size=2).astype(np.float32), "b")])
    # IR 8 is what opset 18 needs; onnx's own default follows the onnx release and can be newer than
    # the installed onnxruntime reads (onnx 1.23 wrote IR 14, onnxruntime 1.30 reads up to 13)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))
    return path


def logits(path, images):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]


def test_combined_graph_is_the_mean_of_different_members(tmp_path):
    members = [linear_member(tmp_path / f"m{i}.onnx", i) for i in range(3)]
    combine(members, tmp_path / "ensemble.onnx")
    images = np.random.default_rng(9).normal(size=(5, 3, 2, 2)).astype(np.float32)
    each = [logits(m, images) for m in members]
    assert np.abs(each[0] - each[1]).max() > 0.1  # the members really differ
    np.testing.assert_allclose(logits(tmp_path / "ensemble.onnx", images), np.mean(each, axis=0), atol=1e-5)
    combined = onnx.load(str(tmp_path / "ensemble.onnx"))
    assert [i.name for i in combined.graph.input] == ["image"] and [o.name for o in combined.graph.output] == ["logits"]


def test_members_must_be_exported_runs(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="at least two"):
        member_files([tmp_path / "a"])
    with pytest.raises(FileNotFoundError, match="export"):
        member_files([tmp_path / "a", tmp_path / "a"])


def test_a_run_listed_twice_is_refused(tmp_path):
    """`ensemble run1 run1` built a graph of one member twice and carded it as two members."""
    runs = [tmp_path / name for name in ("a", "b")]
    for seed, run in enumerate(runs):
        run.mkdir()
        linear_member(run / "pneumonia_resnet50.onnx", seed)
    (tmp_path / "link").symlink_to(runs[0], target_is_directory=True)
    for twice in ([runs[0], runs[0]], [runs[0], runs[1], tmp_path / "link"], [runs[0], tmp_path / "b" / ".." / "a"]):
        with pytest.raises(RefusedError, match=re.escape(f"is the same run as {runs[0]}: the ensemble would count it twice")):
            member_files(twice)
    assert member_files(runs) == [run / "pneumonia_resnet50.onnx" for run in runs]
