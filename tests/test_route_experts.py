"""A prompt graph's experts routed to per-expert matmuls (export/route_experts.py) against
onnxruntime's own MoE / QMoE kernels on the same weights."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from itera_export.quantize import quantize_graph
from itera_export.route_experts import route_prompt_experts
from itera_runtime.options import make_session
from test_quantize import _moe_feeds, _moe_graph, _rel

ROWS = (1, 3, 16, 300)  # 1 and 3 rows leave experts without rows (zero-length splits)


def _routed(src, dst, nodes: int = 1) -> onnx.ModelProto:
    model = onnx.load(str(src))
    assert route_prompt_experts(model) == nodes
    onnx.save_model(model, str(dst))
    return model


def _expert_matmuls_read_constants(path, tmp_path) -> tuple[int, int]:
    """(expert matmuls, those whose weight onnxruntime holds as a constant) after its optimiser:
    the weight reordering is folded at load, so the kernels prepack their weights."""
    out = tmp_path / "optimized.onnx"
    make_session(path, threads=1, optimized_model_path=str(out))
    opt = onnx.load(str(out), load_external_data=False)
    consts = {t.name for t in opt.graph.initializer}
    mms = [n for n in opt.graph.node if n.op_type in ("Gemm", "MatMul", "FusedMatMul", "DynamicQuantizeMatMul")]
    return len(mms), sum(n.input[1] in consts for n in mms)


def test_fp32_experts_routed_equal_the_moe_kernel(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "moe.onnx"
    e, d = _moe_graph(src, rng)
    model = _routed(src, tmp_path / "routed.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert "MoE" not in ops and ops.count("Gemm") == 2 * e and "ScatterND" in ops
    assert {t.name for t in model.graph.initializer} >= {"fc1", "fc2"}  # read as stored, reordered at load
    assert _expert_matmuls_read_constants(tmp_path / "routed.onnx", tmp_path) == (2 * e, 2 * e)
    moe, routed = make_session(src, threads=1), make_session(tmp_path / "routed.onnx", threads=1)
    for rows in ROWS:
        feeds = _moe_feeds(rng, rows, e, d, False)
        ref, got = moe.run(None, feeds)[0], routed.run(None, feeds)[0]
        assert got.shape == ref.shape and _rel(got, ref) < 1e-5, (rows, _rel(got, ref))  # measured ~1e-7


def test_routing_is_deterministic_at_two_threads(tmp_path):
    """Each (row, slot) output is placed once and the k slots summed after. Scattering the
    weighted outputs onto their rows with ScatterND reduction="add" (rows repeat k times) gave
    other sums on 2 of 5 runs at 2 threads on these int8 experts (8 of them, 256 wide)."""
    rng = np.random.default_rng(1)
    src = tmp_path / "moe.onnx"
    e, d = _moe_graph(src, rng, e=8, d=256)
    quantize_graph(src, tmp_path / "moe.int8.onnx", "int8")
    _routed(tmp_path / "moe.int8.onnx", tmp_path / "routed.onnx")
    feeds = _moe_feeds(rng, 1024, e, d, False)
    one = make_session(tmp_path / "routed.onnx", threads=1).run(None, feeds)[0]
    two = make_session(tmp_path / "routed.onnx", threads=2)
    for _ in range(10):
        assert np.array_equal(two.run(None, feeds)[0], one)


def test_int8_experts_routed_run_the_same_codes(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "moe.onnx"
    e, d = _moe_graph(src, rng)
    quantize_graph(src, tmp_path / "moe.int8.onnx", "int8")  # a prompt graph: per-channel QMoE
    model = _routed(tmp_path / "moe.int8.onnx", tmp_path / "routed.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert "QMoE" not in ops and ops.count("DynamicQuantizeMatMul") == 2 * e
    assert {t.name for t in model.graph.initializer} >= {"fc1_q8", "fc1_q8_scales", "fc2_q8", "fc2_q8_scales"}
    assert _expert_matmuls_read_constants(tmp_path / "routed.onnx", tmp_path) == (2 * e, 2 * e)
    sessions = [make_session(p, threads=1) for p in (src, tmp_path / "moe.int8.onnx", tmp_path / "routed.onnx")]
    for rows in ROWS:
        feeds = _moe_feeds(rng, rows, e, d, False)
        fp32, qmoe, routed = (s.run(None, feeds)[0] for s in sessions)
        # The same dequantized weights; the routed matmuls also quantize their activations (int8,
        # per call over an expert's rows, as the dense int8 matmuls do): measured 0.007-0.025
        # from QMoE and 0.011-0.033 from fp32 (QMoE itself 0.010-0.013), growing with the rows.
        # A wrong gate/up order or expert is off by order 1.
        assert _rel(routed, qmoe) < 0.05 and _rel(routed, fp32) < 0.06, (rows, _rel(routed, qmoe), _rel(routed, fp32))


@pytest.mark.parametrize("change", ["int4", "blocks", "sparse_mixer", "swiglu_limit"])
def test_what_is_not_reproduced_is_left_as_it_is(change, tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "moe.onnx"
    _moe_graph(src, rng)
    if change in ("sparse_mixer", "swiglu_limit"):  # an attribute it does not reproduce
        model = onnx.load(str(src))
        model.graph.node[0].attribute.append(helper.make_attribute(*(
            ("use_sparse_mixer", 1) if change == "sparse_mixer" else ("swiglu_limit", 7.0))))
    else:
        options = {"moe_block_size": 32} if change == "blocks" else None
        quantize_graph(src, tmp_path / "q.onnx", "int4" if change == "int4" else "int8", options)
        model = onnx.load(str(tmp_path / "q.onnx"))
    before = model.SerializeToString()
    assert route_prompt_experts(model) == 0 and model.SerializeToString() == before


_RSS_AFTER_LOAD = """
import sys
from itera_runtime.options import make_session
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
before = rss()
make_session(sys.argv[1], threads=1)
print(rss() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to read a process's resident memory")
def test_loading_a_routed_graph_keeps_no_folding_copies(tmp_path):
    """onnxruntime folds the routed experts' weight reordering at load and frees the copies, which
    glibc kept resident (6 layers of int8 experts, 4.7 MB: +40 MB against QMoE's +15 MB);
    make_session hands them back (malloc_trim). Measured in fresh processes."""
    from itera_runtime.options import _MALLOC_TRIM

    if _MALLOC_TRIM is None:
        pytest.skip("no malloc_trim in this C library")
    rng = np.random.default_rng(4)
    e, d, f, layers = 8, 256, 128, 6
    nodes, weights, x = [], [], "x"
    for i in range(layers):
        weights += [numpy_helper.from_array((rng.standard_normal((e, 2 * f, d)) * 0.05).astype(np.float32), f"fc1_{i}"),
                    numpy_helper.from_array((rng.standard_normal((e, d, f)) * 0.05).astype(np.float32), f"fc2_{i}")]
        nodes.append(helper.make_node("MoE", [x, "router", f"fc1_{i}", "", f"fc2_{i}"], [f"y{i}"], name=f"blocks.{i}/moe",
                                      domain="com.microsoft", k=2, activation_type="swiglu", swiglu_fusion=1,
                                      activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=1))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", d]),
                                             helper.make_tensor_value_info("router", TensorProto.FLOAT, ["t", e])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["t", d])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    onnx.save_model(model, str(tmp_path / "moe.onnx"))
    quantize_graph(tmp_path / "moe.onnx", tmp_path / "kernel.onnx", "int8")
    _routed(tmp_path / "kernel.onnx", tmp_path / "routed.onnx", nodes=layers)
    grown = {name: int(subprocess.run([sys.executable, "-c", _RSS_AFTER_LOAD, str(tmp_path / f"{name}.onnx")],
                                      capture_output=True, text=True, check=True).stdout)
             for name in ("kernel", "routed")}
    assert grown["routed"] < grown["kernel"] + 10e6, grown
