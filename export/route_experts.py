"""A prompt graph's experts as one matmul chain per expert over the rows routed to it.

onnxruntime's CPU `MoE` (fp32) and per-channel `QMoE` (8-bit) run a prompt's experts far
below the speed of plain matmuls of the same work: one layer, 512 tokens, 1 thread, against
this form's first version (which reordered the weights at load; the whole prompt graph runs as
fast with the current folds; bench/PROFILE.md, "Issue 29, stop 40"): fp32 MoE 1.27 / 3.00 / 5.67 ms against
0.78 / 1.92 / 3.76 (tiny / small / base); 8-bit per-channel QMoE 1.09 / 2.79 / 5.11 ms against
0.68 / 1.33 / 1.83, where each expert's matmuls are DynamicQuantizeMatMul (int8 activations
per call, like the dense int8 matmuls). So a prompt graph's `MoE` / 8-bit per-channel `QMoE`
becomes:

- route: TopK of the router logits, softmax over the k picked (MoE's
  normalize_routing_weights), the (row, slot) pairs sorted by expert (TopK ascending), the
  rows gathered in that order and split by the experts' row counts;
- per expert: x·W1 (gate and up in one matmul, their columns interleaved as stored),
  SiLU(gate)·up, ·W2 — Gemm at fp32 (transB: the expert's rows as stored),
  DynamicQuantizeMatMul with per-column scales at 8 bits;
- combine: the outputs scattered back to their (row, slot) places (ScatterND over distinct
  indices: deterministic at any thread count), weighted and summed over the k slots.

The per-expert weights are the node's own expert tensors — fc1 (E, 2F, D) with gate and up
rows interleaved (swiglu_fusion 1), fc2 (E, D, F), or their uint8 codes and per-channel
scales — taken by Gather (at 8 bits also made signed and transposed) on initializers only,
which onnxruntime folds into constants at load: the weights file keeps one copy, shared with
the decode graph, which keeps the fused kernel (one token a call). Each folded op is a copy at
load, so there are as few as the kernels allow, and `make_session` hands the freed ones back
(runtime/options.py). 4-bit QMoE and block layouts are left as they are.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph_passes import layer_prefix, prune

MS = "com.microsoft"
# The attributes of the MoE nodes this rewrite reproduces (export/lower.py `moe`), and the only
# other ones a node may carry; any other attribute or value leaves the node as it is.
_SWIGLU = {"activation_type": b"swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0, "activation_beta": 0.0,
           "normalize_routing_weights": 1}
_FREE = {"k", "expert_weight_bits", "weights_prepacked", "use_sparse_mixer"}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _routable(node: onnx.NodeProto, inits: dict) -> str | None:
    """"fp32" / "int8" when `node` is a MoE / 8-bit per-channel QMoE this rewrite reproduces."""
    if node.domain != MS or node.op_type not in ("MoE", "QMoE"):
        return None
    a = _attrs(node)
    if set(a) - set(_SWIGLU) - _FREE or any(a.get(k, v) != v for k, v in _SWIGLU.items()) \
            or a.get("use_sparse_mixer", 0) or a.get("weights_prepacked", 0):
        return None
    ins = list(node.input) + [""] * 8
    if node.op_type == "MoE":  # x, router, fc1, fc1 bias, fc2; nothing after (biases, fc3)
        ok = ins[2] in inits and ins[4] in inits and not ins[3] and not any(ins[5:])
        return "fp32" if ok else None
    # QMoE: x, router, fc1 codes, fc1 scales, fc1 bias, fc2 codes, fc2 scales; nothing after
    # (fc2 bias, fc3, zero points), one scale per output channel
    ok = (a.get("expert_weight_bits") == 8 and not ins[4] and not any(ins[7:])
          and all(n in inits for n in (ins[2], ins[3], ins[5], ins[6]))
          and len(inits[ins[3]].dims) == 2 and len(inits[ins[6]].dims) == 2)
    return "int8" if ok else None


class _Builder:
    def __init__(self, g: onnx.GraphProto, prefix: str, consts: dict):
        self.g, self.p, self.nodes, self.n, self.consts = g, prefix, [], 0, consts

    def const(self, value, dtype=np.int64) -> str:
        """A small constant initializer, one per distinct value in the graph (every layer's)."""
        a = np.asarray(value, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self.consts:
            self.consts[key] = f"route_experts/c{len(self.consts)}"
            self.g.initializer.append(numpy_helper.from_array(a, self.consts[key]))
        return self.consts[key]

    def __call__(self, op: str, inputs: list[str], n_out: int = 1, outputs=None, domain: str = "", **attrs):
        """One node; short names (a prompt graph gets ~100 of them a layer), the layer's prefix kept
        in node names for `itera-bench profile`."""
        outs = outputs or [f"{self.p}.{self.n}.{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"{self.p}.{self.n}", domain=domain, **attrs))
        self.n += 1
        return outs[0] if n_out == 1 and outputs is None else outs


def _signed(b: _Builder, codes: str) -> str:
    """uint8 codes with the implicit zero point 128 → int8: flipping the top bit gives the
    two's-complement byte of code − 128, which Cast keeps (onnxruntime's Cast wraps)."""
    return b("Cast", [b("BitwiseXor", [codes, b.const(128, np.uint8)])], to=TensorProto.INT8)


def _expert_weights(b: _Builder, kind: str, ins: list[str], inits: dict) -> tuple[int, int, int, list]:
    """E, D, F and, per expert, the operands of its two matmuls: a Gather of the expert's own
    weights, for int8 then as signed bytes in (K, N). Each folded op is a copy onnxruntime makes at
    load (and its peak memory): one Gather at fp32 (Gemm reads the rows as stored, transB), four
    1-byte tensors at int8. Gate and up rows stay interleaved; `_route` splits the output."""
    E, two_f, D = inits[ins[2]].dims
    F = two_f // 2

    def expert(w: str, e: int) -> str:
        return b("Gather", [w, b.const(e)], axis=0)

    if kind == "fp32":
        per = [([expert(ins[2], e)], [expert(ins[4], e)]) for e in range(E)]  # (2F, D), (D, F)
    else:
        per = [([b("Transpose", [_signed(b, expert(ins[2], e))], perm=[1, 0]), expert(ins[3], e)],
                [b("Transpose", [_signed(b, expert(ins[5], e))], perm=[1, 0]), expert(ins[6], e)])
               for e in range(E)]  # int8 (D, 2F) + (2F,) scales, (F, D) + (D,)
    return E, D, F, per


def _route(b: _Builder, node: onnx.NodeProto, kind: str, inits: dict) -> None:
    ins = list(node.input) + [""] * 8
    k = _attrs(node).get("k", 1)
    E, D, F, per = _expert_weights(b, kind, ins, inits)
    matmul = (lambda x, w: b("Gemm", [x, *w], transB=1)) if kind == "fp32" else \
        (lambda x, w: b("DynamicQuantizeMatMul", [x, *w], domain=MS))
    rows = b("Reshape", [ins[0], b.const([-1, D])])  # (R, D)
    top, picked = b("TopK", [ins[1], b.const([k])], n_out=2, axis=1)  # (R, k)
    gates = b("Softmax", [top], axis=1)
    slots = b("Reshape", [picked, b.const([-1])])  # (R·k,) expert of each (row, slot)
    n_slots = b("Shape", [slots])
    _, order = b("TopK", [slots, n_slots], n_out=2, axis=0, largest=0, sorted=1)  # slots by expert
    gathered = b("Gather", [rows, b("Div", [order, b.const(k)])], axis=0)  # (R·k, D) rows in that order
    hits = b("Equal", [b("Unsqueeze", [slots, b.const([1])]), b.const(np.arange(E)[None])])
    counts = b("ReduceSum", [b("Cast", [hits], to=TensorProto.INT64), b.const([0])], keepdims=0)  # (E,)
    parts = b("Split", [gathered, counts], n_out=E, axis=0)
    outs = []
    for e, (w1, w2) in enumerate(per):
        pairs = b("Reshape", [matmul(parts[e], w1), b.const([-1, F, 2])])  # gate/up columns interleaved
        gate, up = b("Split", [pairs, b.const([1, 1])], n_out=2, axis=2)
        act = b("Mul", [b("Mul", [gate, b("Sigmoid", [gate])]), up])  # SiLU(gate) · up, (n, F, 1)
        outs.append(matmul(b("Reshape", [act, b.const([-1, F])]), w2))
    ys = b("Concat", outs, axis=0)  # (R·k, D), sorted by expert
    zeros = b("ConstantOfShape", [b("Concat", [n_slots, b.const([D])], axis=0)],
              value=numpy_helper.from_array(np.zeros(1, np.float32)))
    placed = b("ScatterND", [zeros, b("Unsqueeze", [order, b.const([1])]), ys])  # back to (row, slot) order
    per_slot = b("Reshape", [placed, b.const([-1, k, D])])
    mixed = b("ReduceSum", [b("Mul", [per_slot, b("Unsqueeze", [gates, b.const([-1])])]), b.const([1])], keepdims=0)
    b("Reshape", [mixed, b("Shape", [ins[0]])], outputs=[node.output[0]])


def route_prompt_experts(model: onnx.ModelProto) -> int:
    """Rewrite the routable MoE / QMoE nodes of a prompt graph (module docstring); returns how many."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    done, consts = 0, {}
    for node in list(g.node):
        kind = _routable(node, inits)
        if kind is None:
            continue
        layer = layer_prefix(node.name)
        b = _Builder(g, f"{layer}/route" if layer else f"route{done}", consts)
        _route(b, node, kind, inits)
        idx = list(g.node).index(node)
        g.node.remove(node)
        for i, n in enumerate(b.nodes):
            g.node.insert(idx + i, n)
        done += 1
    if done:
        prune(model)
    return done
