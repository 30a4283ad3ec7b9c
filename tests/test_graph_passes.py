"""Graph passes that shrink a one-token decode graph: fewer nodes, same outputs.

Each pass runs on a small hand-built graph with a symbolic batch, as the exporter's decode
graphs have; onnxruntime runs the graph before and after on random inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from itera_export.graph_passes import (  # noqa: E402
    collapse_reshapes,
    drop_identity_reshapes,
    plain_softplus,
    prune,
    symbolic_dims,
    unit_gathers_to_reshapes,
)
from itera_runtime.options import make_session  # noqa: E402

C = 6


def _model(nodes, inits, out_shape):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", C])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, x):
    return make_session(model.SerializeToString(), threads=1).run(["y"], {"x": x})[0]


def _ops(model):
    return sorted(n.op_type for n in model.graph.node)


def _one_token_conv_like():
    """x (B, C) → Unsqueeze → (B, 1, C) → Reshape (B, C, 1) → Relu → Reshape (B, 1, C) → x[:, 0]:
    the shape of the lowered one-token conv between the model's own Unsqueeze and select."""
    nodes = [
        helper.make_node("Unsqueeze", ["x", "ax1"], ["u"]),
        helper.make_node("Reshape", ["u", "s_cf"], ["cf"]),
        helper.make_node("Relu", ["cf"], ["r"]),
        helper.make_node("Reshape", ["r", "s_cl"], ["cl"]),
        helper.make_node("Gather", ["cl", "zero"], ["y"], axis=1, name="select"),
    ]
    inits = {"ax1": np.array([1], np.int64), "s_cf": np.array([0, C, 1], np.int64),
             "s_cl": np.array([0, 1, C], np.int64), "zero": np.array(0, np.int64)}
    return _model(nodes, inits, ["batch", C])


@pytest.mark.parametrize("batch", [1, 3])
def test_unit_gather_and_reshape_chains_fold_with_equal_outputs(batch):
    model = _one_token_conv_like()
    x = np.random.default_rng(batch).standard_normal((batch, C)).astype(np.float32)
    before = _run(model, x)
    dims = symbolic_dims(model)
    assert unit_gathers_to_reshapes(model, dims) == 1
    assert collapse_reshapes(model, dims) == 2  # the Unsqueeze and the Reshape before the select
    prune(model)
    assert _ops(model) == ["Relu", "Reshape", "Reshape"]  # was 5 nodes: Unsqueeze, Gather gone
    np.testing.assert_array_equal(_run(model, x), before)


def test_gather_on_an_axis_longer_than_one_is_kept():
    nodes = [helper.make_node("Reshape", ["x", "s"], ["r"]),
             helper.make_node("Gather", ["r", "zero"], ["y"], axis=1)]
    model = _model(nodes, {"s": np.array([0, 2, C // 2], np.int64), "zero": np.array(0, np.int64)},
                   ["batch", C // 2])
    x = np.arange(2 * C, dtype=np.float32).reshape(2, C)
    before = _run(model, x)
    assert unit_gathers_to_reshapes(model, symbolic_dims(model)) == 0
    np.testing.assert_array_equal(_run(model, x), before)


def test_identity_reshapes_dropped_and_shape_changing_ones_kept():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Reshape", ["a", "same"], ["b"]),  # (B, C) → (-1, C): identity
        helper.make_node("Reshape", ["b", "split"], ["c"]),  # (B, C) → (B, 2, C/2): kept
        helper.make_node("Neg", ["c"], ["y"]),
    ]
    model = _model(nodes, {"same": np.array([-1, C], np.int64), "split": np.array([0, 2, C // 2], np.int64)},
                   ["batch", 2, C // 2])
    x = np.random.default_rng(0).standard_normal((4, C)).astype(np.float32)
    before = _run(model, x)
    assert drop_identity_reshapes(model, symbolic_dims(model)) == 1
    prune(model)
    assert _ops(model) == ["Neg", "Relu", "Reshape"]
    np.testing.assert_array_equal(_run(model, x), before)


def test_reshape_that_is_a_graph_output_is_kept():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Reshape", ["a", "same"], ["y"])]
    model = _model(nodes, {"same": np.array([-1, C], np.int64)}, ["batch", C])
    assert drop_identity_reshapes(model, symbolic_dims(model)) == 0
    assert _ops(model) == ["Relu", "Reshape"]


def _thresholded_softplus(threshold: float):
    """torch's F.softplus(x, beta=1, threshold=T) as the exporter writes it."""
    nodes = [helper.make_node("Softplus", ["x"], ["sp"]),
             helper.make_node("Greater", ["x", "t"], ["big"]),
             helper.make_node("Where", ["big", "x", "sp"], ["w"]),
             helper.make_node("Neg", ["w"], ["y"])]
    return _model(nodes, {"t": np.array(threshold, np.float32)}, ["batch", C])


def test_thresholded_softplus_becomes_one_node_with_equal_outputs():
    model = _thresholded_softplus(20.0)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal((3, C)) * 10, rng.uniform(15, 25, (3, C)),
                        np.full((1, C), 1e4), np.full((1, C), -1e4)]).astype(np.float32)
    before = _run(model, x)
    assert plain_softplus(model) == 1
    prune(model)
    assert _ops(model) == ["Neg", "Softplus"]
    after = _run(model, x)
    assert np.isfinite(after).all()
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_softplus_with_a_low_threshold_is_kept():
    model = _thresholded_softplus(1.0)  # x and softplus(x) differ visibly above 1
    assert plain_softplus(model) == 0
    assert _ops(model) == ["Greater", "Neg", "Softplus", "Where"]
