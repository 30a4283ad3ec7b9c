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
    drop_identity_output_reshapes,
    drop_identity_reshapes,
    fuse_skip_rms_norms,
    gather_unit_rows,
    plain_softplus,
    prune,
    share_constants,
    sink_reshapes,
    slice_head_input,
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


def _io_model(nodes, inits, inputs, out_shape):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _feeds(inputs, batch, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal([batch if d == "batch" else d for d in v]).astype(np.float32)
            for k, v in inputs.items()}


def _run_io(model, feeds):
    return make_session(model.SerializeToString(), threads=1).run(["y"], feeds)[0]


@pytest.mark.parametrize("batch", [1, 3])
def test_residual_add_and_rms_norm_become_one_skip_norm(batch):
    """Add → x / sqrt(mean(x²) + eps) * w (as the model's RMSNorm exports) → one
    SkipSimplifiedLayerNormalization whose 4th output (the sum) still feeds the next residual."""
    D = 8
    inputs = {"a": ["batch", 1, D], "b": ["batch", 1, D]}
    nodes = [
        helper.make_node("Add", ["a", "b"], ["x"]),
        helper.make_node("Pow", ["x", "two"], ["p"]),
        helper.make_node("ReduceMean", ["p", "last"], ["m"], keepdims=1),
        helper.make_node("Add", ["m", "eps"], ["me"]),
        helper.make_node("Sqrt", ["me"], ["s"]),
        helper.make_node("Div", ["x", "s"], ["d"]),
        helper.make_node("Mul", ["d", "w"], ["n"]),
        helper.make_node("Add", ["x", "n"], ["y"]),  # the next residual reads the sum
    ]
    inits = {"two": np.float32(2), "last": np.array([-1], np.int64), "eps": np.float32(1e-5),
             "w": np.linspace(0.5, 2, D).astype(np.float32)}
    model = _io_model(nodes, inits, inputs, ["batch", 1, D])
    feeds = _feeds(inputs, batch)
    before = _run_io(model, feeds)
    assert fuse_skip_rms_norms(model, symbolic_dims(model)) == 1
    prune(model)
    assert _ops(model) == ["Add", "SkipSimplifiedLayerNormalization"]
    np.testing.assert_allclose(_run_io(model, feeds), before, atol=1e-5)


def test_rms_norm_after_a_broadcasting_add_is_left_alone():
    D = 8
    inputs = {"a": ["batch", 1, D]}
    nodes = [
        helper.make_node("Add", ["a", "bias"], ["x"]),
        helper.make_node("Pow", ["x", "two"], ["p"]),
        helper.make_node("ReduceMean", ["p", "last"], ["m"], keepdims=1),
        helper.make_node("Add", ["m", "eps"], ["me"]),
        helper.make_node("Sqrt", ["me"], ["s"]),
        helper.make_node("Div", ["x", "s"], ["d"]),
        helper.make_node("Mul", ["d", "w"], ["y"]),
    ]
    inits = {"bias": np.ones(D, np.float32), "two": np.float32(2), "last": np.array([-1], np.int64),
             "eps": np.float32(1e-5), "w": np.ones(D, np.float32)}
    model = _io_model(nodes, inits, inputs, ["batch", 1, D])
    assert fuse_skip_rms_norms(model, symbolic_dims(model)) == 0


@pytest.mark.parametrize("batch", [1, 3])
def test_per_head_scale_and_add_sink_below_reshapes_and_cancel(batch):
    """y = (Reshape(o, (B,1,H,P)) + Reshape(x, (B,1,H,P)) * D[:, None]) reshaped to (B,1,H·P):
    the SSM's D skip. After sinking, the scale runs packed and no Reshape is left."""
    H, P = 3, 4
    inputs = {"o": ["batch", 1, H * P], "x": ["batch", 1, H * P]}
    nodes = [
        helper.make_node("Reshape", ["o", "s4"], ["o4"]),
        helper.make_node("Reshape", ["x", "s4m"], ["x4"]),
        helper.make_node("Mul", ["x4", "D"], ["xd"]),
        helper.make_node("Add", ["o4", "xd"], ["sum"]),
        helper.make_node("Reshape", ["sum", "s3"], ["r"]),
        helper.make_node("Neg", ["r"], ["y"]),
    ]
    inits = {"s4": np.array([0, 1, H, P], np.int64), "s4m": np.array([0, 1, H, P], np.int64),
             "s3": np.array([0, 1, H * P], np.int64), "D": np.arange(1, H + 1, dtype=np.float32)[:, None]}
    model = _io_model(nodes, inits, inputs, ["batch", 1, H * P])
    feeds = _feeds(inputs, batch)
    before = _run_io(model, feeds)
    dims = symbolic_dims(model)
    assert sink_reshapes(model, dims) == 2
    collapse_reshapes(model, dims)
    drop_identity_reshapes(model, dims)
    prune(model)
    assert _ops(model) == ["Add", "Mul", "Neg"]
    np.testing.assert_array_equal(_run_io(model, feeds), before)


def _embedding_step(ids_shape):
    """ids → Reshape(-1) → Gather(table) → Unsqueeze(1) → MatMul: a one-token step's embedding."""
    V = 10
    nodes = [helper.make_node("Reshape", ["ids", "flat"], ["v"]),
             helper.make_node("Gather", ["table", "v"], ["e"]),
             helper.make_node("Unsqueeze", ["e", "ax1"], ["u"]),
             helper.make_node("MatMul", ["u", "w"], ["y"])]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((V, C)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.standard_normal((C, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([-1], np.int64), "flat"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ids_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_embedding_of_one_token_ids_is_one_gather_with_equal_outputs():
    m = _embedding_step(["batch", 1])
    ids = np.array([[3], [7]], np.int64)
    before = make_session(m.SerializeToString(), threads=1).run(["y"], {"ids": ids})[0]
    assert gather_unit_rows(m, symbolic_dims(m)) == 1
    assert _ops(m) == ["Gather", "MatMul"]
    after = make_session(m.SerializeToString(), threads=1).run(["y"], {"ids": ids})[0]
    assert after.shape == (2, 1, 3) and np.array_equal(before, after)


def test_embedding_of_several_tokens_keeps_its_reshape():
    m = _embedding_step(["batch", 2])  # (B, 2) ids flattened: Unsqueeze(1) is not their shape
    assert gather_unit_rows(m, symbolic_dims(m)) == 0
    assert _ops(m) == ["Gather", "MatMul", "Reshape", "Unsqueeze"]


def _head_with_output_reshape(target):
    nodes = [helper.make_node("Unsqueeze", ["x", "ax1"], ["u"]),
             helper.make_node("MatMul", ["u", "w"], ["m"]),
             helper.make_node("Reshape", ["m", "shape"], ["y"])]
    inits = {"ax1": np.array([1], np.int64), "shape": np.array(target, np.int64),
             "w": np.random.default_rng(0).standard_normal((C, 4)).astype(np.float32)}
    return _model(nodes, inits, None)


def test_identity_reshape_into_a_graph_output_is_dropped_with_equal_outputs():
    m = _head_with_output_reshape([-1, 1, 4])  # logits.reshape(-1, 1, V) of a (B, 1, V) tensor
    x = np.random.default_rng(1).standard_normal((3, C)).astype(np.float32)
    before = _run(m, x)
    assert drop_identity_output_reshapes(m, symbolic_dims(m)) == 1
    assert _ops(m) == ["MatMul", "Unsqueeze"] and m.graph.node[-1].output[0] == "y"
    assert np.array_equal(_run(m, x), before)


def test_shape_changing_reshape_into_a_graph_output_is_kept():
    m = _head_with_output_reshape([-1, 4])
    assert drop_identity_output_reshapes(m, symbolic_dims(m)) == 0
    assert _ops(m) == ["MatMul", "Reshape", "Unsqueeze"]


def test_repeated_constants_are_kept_once_with_equal_outputs():
    """An inlined function's constants, one copy per call, become one node each value."""
    mask = np.tril(np.ones((C, C), np.float32))
    const = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(v, name))  # noqa: E731
    nodes = [const("m1", mask), helper.make_node("MatMul", ["x", "m1"], ["a"]),
             const("m2", mask.copy()), helper.make_node("MatMul", ["a", "m2"], ["b"]),
             const("other", mask * 2), helper.make_node("MatMul", ["b", "other"], ["y"])]
    model = _model(nodes, {}, ["batch", C])
    x = np.random.default_rng(0).standard_normal((3, C)).astype(np.float32)
    before = _run(model, x)
    assert share_constants(model) == 1
    assert sum(n.op_type == "Constant" for n in model.graph.node) == 2
    onnx.checker.check_model(model, full_check=True)  # the kept ones come before every use
    np.testing.assert_array_equal(_run(model, x), before)


def test_head_runs_on_the_positions_logits_start_keeps():
    """norm -> head: with the Slice, -1 gives the last position's logits (and hidden), 0 all of them."""
    T, D, V = 5, C, 7
    rng = np.random.default_rng(0)
    w, head = rng.standard_normal(D).astype(np.float32), rng.standard_normal((D, V)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "head"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", D])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", V]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "seq", D])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(head, "head")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((2, T, D)).astype(np.float32)
    every, hidden = make_session(model.SerializeToString(), threads=1).run(None, {"x": x})
    assert slice_head_input(model) == "logits_start"
    assert [d.dim_param for d in model.graph.output[0].type.tensor_type.shape.dim[:2]] == ["batch", "kept"]
    sess = make_session(model.SerializeToString(), threads=1)
    for start, rows in ((-1, slice(T - 1, T)), (0, slice(0, T)), (-3, slice(T - 3, T))):
        logits, h = sess.run(None, {"x": x, "logits_start": np.array([start], np.int64)})
        np.testing.assert_allclose(logits, every[:, rows], rtol=1e-6)
        np.testing.assert_array_equal(h, hidden[:, rows])
    with pytest.raises(ValueError, match="already has"):
        slice_head_input(model)


def test_prune_keeps_what_only_an_if_branch_reads():
    # x → Mul(w) → h; If(cond) then Add(h, b) else Sub(h, b): h's producer, w and b are read only
    # inside (or through) the branches; the dead Neg and its initializer go.
    def branch(op):
        return helper.make_graph([helper.make_node(op, ["h", "b"], [f"y_{op}"])], op, [],
                                 [helper.make_tensor_value_info(f"y_{op}", TensorProto.FLOAT, None)])

    nodes = [helper.make_node("Mul", ["x", "w"], ["h"]),
             helper.make_node("Neg", ["dead_w"], ["dead"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch("Add"), else_branch=branch("Sub"))]
    model = _model(nodes, {"w": np.full(C, 2, np.float32), "b": np.ones(C, np.float32),
                           "dead_w": np.ones(C, np.float32), "cond": np.array([True])}, ["batch", C])
    x = np.arange(2 * C, dtype=np.float32).reshape(2, C)
    before = make_session(model.SerializeToString(), threads=1).run(None, {"x": x})[0]
    prune(model)
    assert [n.op_type for n in model.graph.node] == ["Mul", "If"]
    assert sorted(t.name for t in model.graph.initializer) == ["b", "cond", "w"]
    np.testing.assert_array_equal(make_session(model.SerializeToString(), threads=1).run(None, {"x": x})[0], before)
