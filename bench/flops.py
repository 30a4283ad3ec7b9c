"""FLOPs per decoded token at a depth: analytic from the model config, and counted from the graph.

What is counted, the same in both: the matrix products (2 FLOPs per multiply-add; integer
multiply-adds for int8 `MatMulInteger`, 4-bit `MatMulNBits`), the attention over the
`depth + 1` cached positions, the SSM recurrence (per head: decay N·P, outer-product update
2·N·P, read-out 2·N·P) and the depthwise causal conv (2·K per channel). MoE counts only the
`top_k` experts a token is routed to, plus the router. Elementwise work (norms, activations,
softmax, rotary, residuals) is not counted in either: it is a few percent of the total and
its count depends on how an exporter happened to spell it.

`analytic_flops` reads only the manifest's model_config. `graph_flops` runs the bundle's
decode graph once at the depth with every counted node's operands exposed as outputs and
reads their shapes: onnx's static shape inference leaves the attention dims of the exported
baseline symbolic (they come from Shape/Concat chains), while a run gives them exactly.
Needs the `onnx` package (the `train` extra) to open the graph; without it, one error line.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from itera_runtime.bundle import Bundle
from itera_runtime.errors import UserError

MATMUL_OPS = ("MatMul", "MatMulInteger", "Gemm", "MatMulNBits", "FusedMatMul")
FUSED_OPS = ("MoE", "QMoE", "TopKMoE", "LinearAttention", "SsmStep", "SelectiveScan", "CausalConvWithState",
             "CausalConv1d", "Conv", "GroupQueryAttention")


# ----------------------------------------------------------------------------- analytic


def analytic_flops(cfg: dict, depth: int) -> dict[str, int]:
    """FLOPs of one decoded token after `depth` tokens, by part, from a model config."""
    D, V, L = cfg["d_model"], cfg["vocab_size"], cfg["n_layers"]
    parts: Counter = Counter()
    if cfg["family"] == "itera":
        d_inner = cfg["expand"] * D
        H, P, N = d_inner // cfg["head_dim"], cfg["head_dim"], cfg["d_state"]
        conv_dim = d_inner + 2 * cfg["n_groups"] * N
        parts["in_proj"] = L * 2 * D * (d_inner + conv_dim + H)
        parts["conv"] = L * 2 * conv_dim * cfg["d_conv"]
        parts["ssm_scan"] = L * 5 * H * N * P
        parts["out_proj"] = L * 2 * d_inner * D
        parts["router"] = L * 2 * D * cfg["n_experts"]
        parts["experts_active"] = L * cfg["top_k"] * 3 * 2 * D * cfg["d_expert"]  # gate, up, down
    else:
        hd = D // cfg["n_heads"]
        q, kv = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd
        parts["qkv_proj"] = L * 2 * D * (q + 2 * kv)
        parts["attention"] = L * 2 * 2 * q * (depth + 1)  # scores and weighted sum over depth + 1 keys
        parts["o_proj"] = L * 2 * q * D
        parts["mlp"] = L * 3 * 2 * D * cfg["d_ff"]
    parts["lm_head"] = 2 * D * V
    return dict(parts)


# -------------------------------------------------------------------------------- graph


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _node_flops(node, shape, value=None) -> int:
    """FLOPs of one node from its operands' shapes (`shape(name)` → tuple) and, where a count is an input, values."""
    op, ins = node.op_type, node.input
    if op in ("MatMul", "MatMulInteger", "FusedMatMul", "Gemm"):
        a = shape(ins[0])
        k = a[-2] if op == "Gemm" and _attr(node, "transA", 0) else a[-1]
        return 2 * k * int(np.prod(shape(node.output[0])))
    if op == "MatMulNBits":
        return 2 * _attr(node, "K") * int(np.prod(shape(node.output[0])))
    if op in ("MoE", "QMoE"):  # fc1 (E, 2F or F, D/pack); x (T, D)
        x, fc1 = shape(ins[0]), shape(ins[2])
        swiglu = _attr(node, "activation_type", b"relu") in (b"swiglu", "swiglu")
        f = fc1[1] // 2 if swiglu else fc1[1]
        mats = 3 if swiglu else 2
        return int(np.prod(x[:-1])) * _attr(node, "k", 1) * mats * 2 * x[-1] * f
    if op == "TopKMoE":  # w_gate (E, F, D)
        x, w = shape(ins[0]), shape(ins[2])
        return int(np.prod(x[:-1])) * _attr(node, "top_k", 1) * 3 * 2 * w[2] * w[1]
    if op in ("LinearAttention", "SsmStep", "SelectiveScan"):  # state (B, H, N, P)
        state = shape(ins[3] if op == "LinearAttention" else ins[5])
        tokens = shape(ins[0])[1] if op in ("LinearAttention", "SelectiveScan") else 1
        return tokens * 5 * int(np.prod(state))
    if op in ("CausalConvWithState", "CausalConv1d", "Conv"):  # depthwise: 2 FLOPs per tap and output
        if op == "CausalConv1d":  # ai.itera: (x, conv_state, weight (C, K), bias)
            taps = shape(ins[2])[1]
        else:  # weight (C_out, C_in / group, kernel...)
            taps = int(np.prod(shape(ins[1])[1:]))
        return 2 * taps * int(np.prod(shape(node.output[0])))
    if op == "GroupQueryAttention":  # query (B, S, heads·hd); each query attends to the keys cached so far
        q = shape(ins[0])
        total = int(value(ins[6]))  # total_sequence_length: past + new keys
        return int(np.prod(q[:-1])) * 2 * 2 * q[-1] * total
    raise AssertionError(op)


def _feeds(bundle: Bundle, depth: int, graph_set: str) -> dict[str, np.ndarray]:
    """Inputs of the decode graph for one token after `depth` tokens of context (zeros state)."""
    io = bundle.io
    feeds = {io.input_ids: np.zeros((1, 1), dtype=np.int64), **bundle.position_feeds("decode", graph_set, True)}
    if io.attention_mask:
        feeds[io.attention_mask] = np.ones((1, depth + 1), dtype=np.int64)
    if io.position_ids:
        feeds[io.position_ids] = np.full((1, 1), depth, dtype=np.int64)
    for s in bundle.state:
        dims = [1 if d == "batch" else depth if isinstance(d, str) else d for d in s.shape]
        feeds[s.input] = np.zeros(dims, dtype=np.dtype(s.dtype))
    return feeds


def graph_flops(bundle: Bundle, depths: list[int]) -> dict[int, dict[str, int]]:
    """FLOPs per op type of one decode step at each depth, from the decode graph's nodes."""
    try:
        import onnx
    except ImportError:
        raise UserError("counting FLOPs from the graph needs the onnx package: "
                         "pip install 'itera-lite[train]' (or pip install onnx)") from None
    from itera_runtime.graphcheck import pick_graph_set
    from itera_runtime.options import make_session

    # The decode graph the runtime would run here (fused or portable set of a dual bundle);
    # external weights too: the graph runs.
    graph_set = pick_graph_set(bundle)
    model = onnx.load(str(bundle.graph_path("decode", graph_set)))
    counted = [n for n in model.graph.node if n.op_type in MATMUL_OPS + FUSED_OPS]
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    present = {o.name for o in model.graph.output}
    wanted = []
    for n in counted:
        for name in list(n.input) + [n.output[0]]:
            if name and name not in inits and name not in present and name not in wanted:
                wanted.append(name)
    for name in wanted:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name) or 1, None))
    session = make_session(model.SerializeToString(), threads=1)
    names = [o.name for o in session.get_outputs()]
    out: dict[int, dict[str, int]] = {}
    for d in depths:
        feeds = _feeds(bundle, d, graph_set)
        values = dict(zip(names, session.run(None, feeds)))
        inputs = {k: tuple(v.shape) for k, v in feeds.items()}

        def shape(name: str) -> tuple:
            if name in inits:
                return inits[name]
            return inputs[name] if name in inputs else tuple(values[name].shape)

        by_op: Counter = Counter()
        for n in counted:
            by_op[n.op_type] += _node_flops(n, shape, lambda name: values[name])
        out[d] = dict(by_op)
    return out


# ------------------------------------------------------------------------------- records


def flops_records(bundles: list[Bundle], depths: list[int]) -> list:
    """Two rows per (bundle, depth): counted from the graph, and analytic from the config."""
    from .record import Record
    from .sweep import bundle_fields, stamp

    from .latency import check_depth

    records = []
    for b in bundles:
        check_depth(b, max(depths), 1)
    for b in bundles:
        counted = graph_flops(b, depths)
        for d in depths:
            analytic = analytic_flops(b.model_config, d)
            total_a, total_g = sum(analytic.values()), sum(counted[d].values())
            extra = {"flops_graph": total_g, "flops_analytic": total_a, "graph_vs_analytic": total_g / total_a - 1,
                     "graph_by_op": counted[d], "analytic_by_part": analytic}
            common = dict(kind="flops", test=f"tg1@d{d}", unit="FLOP", higher_is_better=False, n_gen=1,
                          n_depth=d, repetitions=1, warmup=False, **bundle_fields(b))
            records.append(Record(metric="flops_per_token", samples=[float(total_g)], extra=dict(extra),
                                  method="counted from the decode graph's nodes with shapes from one run "
                                         "at this depth", **common))
            records.append(Record(metric="flops_per_token_analytic", samples=[float(total_a)], extra=dict(extra),
                                  method="analytic from the manifest's model_config", **common))
    stamp(records)
    return records
