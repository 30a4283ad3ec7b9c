"""Rewrite `ai.itera` nodes to onnxruntime's fused contrib kernels (`com.microsoft`).

A graph pass over an exported model (function path in, fused path out):

    SsmStep                 → LinearAttention (update_rule="gated"), dt and its decay by
                              LinearAttentionGate, + packing Reshapes/Muls
    SelectiveScan           → its function inlined (the chunked scan, standard ops: faster
                              than LinearAttention's token loop for a prompt)
    CausalConv1d            → CausalConvWithState (activation="silu", channels-last) for one
                              token; a depthwise Conv over [state, x] + SiLU for a sequence
    TopKMoE                 → MoE (swiglu, gate/up rows interleaved in FC1)
    KvAttention             → GroupQueryAttention over the shared past/present KV buffer
                              (a hybrid's attention layers; as the baseline's buffer graph)

Functions no node calls any more are dropped. The mapping of the Mamba-2 recurrence onto
LinearAttention (state_t = exp(dt·A)·state_{t-1} + B ⊗ (dt·x), y = C·state) is in
/work/shared/notes/onnxruntime-fused-ssm-ops.md and checked by tests/test_export_itera.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
from onnx import helper, numpy_helper

from .graph_passes import (collapse_reshapes, drop_identity_output_reshapes, drop_identity_reshapes, fuse_skip_rms_norms,
                           gather_unit_rows, prune, share_constants, sink_reshapes, symbolic_dims,
                           unit_gathers_to_reshapes)
from .onnx_functions import DOMAIN

MS = "com.microsoft"
FUSED_OPS = ("LinearAttention", "LinearAttentionGate", "CausalConvWithState", "MoE")  # GroupQueryAttention: hybrids only


def fused_ops_available() -> bool:
    """True when the installed onnxruntime has all the contrib kernels the fused path needs."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    except ImportError:
        return False
    have = {s.name for s in get_all_operator_schema() if s.domain == MS}
    return all(op in have for op in FUSED_OPS)


class _Rewriter:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        # Dims with symbolic names kept ("batch"), for comparing dynamic dims across values;
        # `shapes` has numbers only (None for anything dynamic).
        self.sym = symbolic_dims(model)
        self.shapes = {k: [d if isinstance(d, int) else None for d in v] for k, v in self.sym.items()}
        for i in model.graph.initializer:
            self.shapes[i.name] = list(i.dims)
        self.names = {n.name for n in model.graph.node} | {v for n in model.graph.node for v in n.output}
        self.producers = {o: n for n in model.graph.node for o in n.output}
        self.counter = 0
        self.memo: dict[str, str] = {}

    def fresh(self, base: str) -> str:
        while True:
            self.counter += 1
            name = f"{base}__lower{self.counter}"
            if name not in self.names and name not in self.inits:
                self.names.add(name)
                return name

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        init = numpy_helper.from_array(array, name)
        self.model.graph.initializer.append(init)
        self.inits[name] = init
        return name

    def derived(self, key: str, make) -> str:
        """An initializer computed from others, made once however many nodes share it.

        Named `key` itself when free, so the fused and portable graphs of a dual bundle name
        the same derived tensor alike (quantize.read_quantized_experts pairs them by name).
        """
        if key not in self.memo:
            if key in self.names or key in self.inits:
                self.memo[key] = self.const(key, make())
            else:
                self.names.add(key)
                init = numpy_helper.from_array(make(), key)
                self.model.graph.initializer.append(init)
                self.inits[key] = init
                self.memo[key] = key
        return self.memo[key]

    def ints(self, *values: int) -> str:
        return self.derived("ints_" + "_".join(map(str, values)).replace("-", "m"),
                            lambda: np.array(values, dtype=np.int64))

    def dims(self, value: str, rank: int) -> list:
        d = self.shapes.get(value)
        if d is None or len(d) != rank:
            raise ValueError(f"lowering needs the rank-{rank} shape of {value!r}; shape inference gave {d}")
        return d

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", outputs=None, **attrs):
        outs = outputs or [self.fresh(op.lower()) for _ in range(n_out)]
        n = helper.make_node(op, inputs, outs, name=self.fresh(op), domain=domain or None, **attrs)
        return n, outs

    def _dt_chain(self, dt: str, heads: int) -> tuple[str, str] | None:
        """(raw, dt_bias) when dt = softplus(raw + dt_bias) as the model traced it: Softplus, or
        torch's thresholded form Where(x > T, x, Softplus(x)); None for anything else."""
        n = self.producers.get(dt)
        if n is not None and n.op_type == "Where":
            sp, cond = self.producers.get(n.input[2]), self.producers.get(n.input[0])
            if (sp is None or sp.op_type != "Softplus" or n.input[1] != sp.input[0]
                    or cond is None or cond.op_type != "Greater" or cond.input[0] != sp.input[0]):
                return None
            n = sp
        add = self.producers.get(n.input[0]) if n is not None and n.op_type == "Softplus" else None
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            return None
        raw, bias = add.input
        if bias not in self.inits or list(self.inits[bias].dims) != [heads]:
            return None
        return raw, bias

    # -- one rewrite per op; each returns the replacement nodes ------------------------

    def scan(self, n: onnx.NodeProto) -> list[onnx.NodeProto]:
        # SelectiveScan (prefill) and SsmStep (decode) share the sequence layout:
        # x (B, T, H, P), dt (B, T, H), Bm / Cm (B, T, G, N), with T = 1 in a step.
        x, dt, A, Bm, Cm, state = n.input
        y, new_state = n.output
        _, T, H, P = self.dims(x, 4)
        _, _, G, N = self.dims(Bm, 4)
        if None in (H, P, G, N):
            raise ValueError(f"{n.name}: head/state sizes must be static, got H={H} P={P} G={G} N={N}")
        seq = 1 if T == 1 else 0  # Reshape's 0 copies the (dynamic) T
        out = []

        # value = dt·x packed (B, T, H·P): dt spread over each head's P channels by a one-hot
        # MatMul (exact: one product by 1.0 per channel), one node where Unsqueeze + Mul +
        # Reshape were three; x arrives packed (its Reshape folds into the model's own).
        # decay = dt·A (B, T, H): log-space per-head decay, already in the packed layout.
        spread = self.derived(f"spread_heads_{H}x{P}",
                              lambda: np.kron(np.eye(H, dtype=np.float32), np.ones((1, P), np.float32)))
        chain = self._dt_chain(dt, H)
        if chain is not None:
            # dt = softplus(raw + dt_bias) and dt·A in one LinearAttentionGate (one node where
            # Add, Softplus, Mul were three); dt·x then reads dt back as decay·(1/A), the spread
            # scaled by 1/A_h (a constant subgraph onnxruntime folds at load).
            raw, dt_bias = chain
            n4, (decay,) = self.node("LinearAttentionGate", [raw, dt_bias, A], domain=MS)
            n5, (inv,) = self.node("Reciprocal", [A])
            n6, (col,) = self.node("Unsqueeze", [inv, self.ints(1)])
            n7, (scaled,) = self.node("Mul", [spread, col])
            n1, (dtp,) = self.node("MatMul", [decay, scaled])
            out += [n4, n5, n6, n7, n1]
        else:
            n1, (dtp,) = self.node("MatMul", [dt, spread])
            n4, (decay,) = self.node("Mul", [dt, A])
            out += [n1, n4]
        n2, (xp,) = self.node("Reshape", [x, self.ints(0, seq, H * P)])
        n3, (value,) = self.node("Mul", [xp, dtp])
        out += [n2, n3]

        # key = B and query = C, each packed per group (B, T, G·N): LinearAttention shares
        # key and query groups over heads as GQA does (group g serves heads g·H/G ..
        # (g+1)·H/G-1, Mamba-2's sharing), so B needs no repeat per head (checked against the
        # repeated key for G = 1 and 2 with onnxruntime 1.32; one Tile a layer fewer).
        n6, (key,) = self.node("Reshape", [Bm, self.ints(0, seq, G * N)])
        n9, (query,) = self.node("Reshape", [Cm, self.ints(0, seq, G * N)])
        out += [n6]
        o = self.fresh("linear_attention")
        la, _ = self.node(
            "LinearAttention", [query, key, value, state, decay], domain=MS, outputs=[o, new_state],
            q_num_heads=G, kv_num_heads=H, update_rule="gated", scale=1.0,
        )
        self.sym[o] = self.sym[xp] = [*self.sym.get(x, [None, None])[:2], H * P]  # for sink_reshapes
        n10, _ = self.node("Reshape", [o, self.ints(0, seq, H, P)], outputs=[y])
        return out + [n9, la, n10]

    def conv(self, n: onnx.NodeProto) -> list[onnx.NodeProto]:
        x, conv_state, weight, bias = n.input
        y, new_state = n.output
        Cc, K = self.dims(weight, 2)
        if weight not in self.inits:
            raise ValueError(f"{n.name}: conv weight {weight!r} must be an initializer to lower")
        w3 = self.derived(weight + ".kernel", lambda: numpy_helper.to_array(self.inits[weight]).reshape(Cc, 1, K))
        if self.shapes.get(x, [None, None])[1:2] == [1]:
            # One token (decode): the kernel channels-last reads the activations (B, 1, Cc)
            # and the model's (B, K-1, Cc) state as they are: no Transpose, no Reshape.
            cc, _ = self.node(
                "CausalConvWithState", [x, w3, bias, conv_state], domain=MS,
                outputs=[y, new_state], activation="silu", channels_last=1,
            )
            return [cc]
        # A sequence (prefill): a depthwise Conv over the window [state, x] (B, K-1+L, Cc).
        # onnxruntime's CausalConvWithState (channels-last) took 20% of a tiny 512-token
        # prefill, 30x the time of its MACs; Conv's depthwise kernel does the same work in a
        # fraction of it, and the Concat and the two Transposes move L·Cc floats once each.
        # The Conv is 2-D, (B, Cc, 1, K-1+L) by a (1, K) kernel: onnxruntime runs that one with
        # its blocked (NCHWc) depthwise kernel, 1.5x faster than the 1-D Conv (tiny: 174 vs
        # 267 µs a layer at 512 tokens, 1 thread; bench/PROFILE.md). The 4-D weight is a
        # Reshape of the 3-D one that onnxruntime folds at load (one copy in the weights file).
        cat, (window,) = self.node("Concat", [conv_state, x], axis=1)
        up, (window_nhwc,) = self.node("Unsqueeze", [window, self.ints(1)])  # (B, 1, K-1+L, Cc)
        t_in, (window_4d,) = self.node("Transpose", [window_nhwc], perm=[0, 3, 1, 2])
        w4n, (w4,) = self.node("Reshape", [w3, self.ints(Cc, 1, 1, K)])
        conv, (pre,) = self.node("Conv", [window_4d, w4, bias], group=Cc, kernel_shape=[1, K])
        sig, (gate,) = self.node("Sigmoid", [pre])
        act, (y_4d,) = self.node("Mul", [pre, gate])  # SiLU: onnxruntime fuses the pair
        t_out, (y_nhwc,) = self.node("Transpose", [y_4d], perm=[0, 2, 3, 1])
        down, _ = self.node("Squeeze", [y_nhwc, self.ints(1)], outputs=[y])
        keep, _ = self.node("Slice", [window, self.ints(-(K - 1)), self.ints(2**62), self.ints(1)],
                            outputs=[new_state])
        return [cat, up, t_in, w4n, conv, sig, act, t_out, down, keep]

    def moe(self, n: onnx.NodeProto) -> list[onnx.NodeProto]:
        x, logits, w_gate, w_up, w_down = n.input
        top_k = next(a.i for a in n.attribute if a.name == "top_k")
        for w in (w_gate, w_up, w_down):
            if w not in self.inits:
                raise ValueError(f"{n.name}: expert weight {w!r} must be an initializer to lower")

        fc1 = self.derived(_fc1_name(w_gate, w_up), lambda: _interleave(self.inits[w_gate], self.inits[w_up]))
        # The model flattens (B, T, D) to (T', D) for the router; MoE takes the 3-D tensor
        # itself, and its 3-D output makes the model's Reshape back an identity that drops out.
        src = self.producers.get(x)
        x3 = src.input[0] if src is not None and src.op_type == "Reshape" else None
        out = list(n.output)
        tail = []
        if x3 is not None and len(self.sym.get(x3) or []) == 3 and self.sym[x3][-1] == self.dims(x, 2)[1]:
            out3 = self.fresh("moe3")
            self.sym[out3] = list(self.sym[x3])
            r, _ = self.node("Reshape", [out3, self.ints(-1, self.sym[x3][-1])], outputs=out)
            x, out, tail = x3, [out3], [r]
        moe, _ = self.node(
            "MoE", [x, logits, fc1, "", w_down], domain=MS, outputs=out,
            k=top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
            activation_beta=0.0, normalize_routing_weights=1,
        )
        return [moe, *tail]

    def attention(self, n: onnx.NodeProto) -> list[onnx.NodeProto]:
        q, k, v, past_k, past_v, mask = n.input
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        _, Hkv, C, Dh = self.dims(past_k, 4)
        out = []
        if "seqlens_k" not in self.memo:  # seqlens_k = tokens seen - 1; total = mask width (int32)
            one, axis = self.ints(1), self.ints(1)
            n1, (total_seen,) = self.node("ReduceSum", [mask, axis], keepdims=0)
            n2, (seen,) = self.node("Sub", [total_seen, one])
            n3, (seqlens,) = self.node("Cast", [seen], to=onnx.TensorProto.INT32)
            n4, (width,) = self.node("Shape", [mask], start=1, end=2)
            n5, (width0,) = self.node("Squeeze", [width])
            n6, (total,) = self.node("Cast", [width0], to=onnx.TensorProto.INT32)
            out += [n1, n2, n3, n4, n5, n6]
            self.memo["seqlens_k"], self.memo["total_sequence_length"] = seqlens, total
        rotary = []
        theta = float(attrs["rope_theta"])
        if theta:
            # cos/sin caches (C, Dh/2) of positions · inv_freq, as in transformers' default RoPE.
            # Kept as tables: C × Dh floats each (the baseline computes them with nodes at load).
            def table(fn):
                inv_freq = 1.0 / theta ** (np.arange(0, Dh, 2, dtype=np.float32) / Dh)
                return fn(np.arange(C, dtype=np.float32)[:, None] * inv_freq[None]).astype(np.float32)

            rotary = [self.derived(f"rope.{C}.{Dh}.{theta:g}.cos", lambda: table(np.cos)),
                      self.derived(f"rope.{C}.{Dh}.{theta:g}.sin", lambda: table(np.sin))]
        gqa, _ = self.node(
            "GroupQueryAttention",
            [q, k, v, past_k, past_v, self.memo["seqlens_k"], self.memo["total_sequence_length"], *rotary],
            domain=MS, outputs=list(n.output), num_heads=int(attrs["num_heads"]), kv_num_heads=int(attrs["kv_heads"]),
            do_rotary=1 if theta else 0, rotary_interleaved=0, scale=float(attrs["scale"]),
        )
        return out + [gqa]


def _fc1_name(w_gate: str, w_up: str) -> str:
    return f"{w_gate}+{w_up}.fc1"


def _interleave(gate: onnx.TensorProto, up: onnx.TensorProto) -> np.ndarray:
    """MoE FC1 from gate and up weights (E, F, D): rows [g0, u0, g1, u1, ...] (E, 2F, D).

    swiglu_fusion=1 is the only fused layout onnxruntime's CPU kernel accepts.
    """
    g, u = numpy_helper.to_array(gate), numpy_helper.to_array(up)
    E, Fw, D = g.shape
    return np.stack([g, u], axis=2).reshape(E, 2 * Fw, D)


def read_fused_moe_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make a portable graph read its expert gate/up weights out of the fused graphs' FC1.

    In a dual bundle both graph sets share one weights file, deduplicated by content; the
    fused MoE reads gate and up interleaved, so without this the expert weights (most of an
    Itera-Lite model) would be stored twice. Each TopKMoE's gate and up become strided
    Slices of the interleaved FC1, which onnxruntime folds into constants at load.
    """
    rw = _Rewriter(model)
    nodes = []
    for n in model.graph.node:
        if n.domain == DOMAIN and n.op_type == "TopKMoE" and n.input[2] in rw.inits and n.input[3] in rw.inits:
            w_gate, w_up = n.input[2], n.input[3]
            fc1 = rw.derived(_fc1_name(w_gate, w_up), lambda: _interleave(rw.inits[w_gate], rw.inits[w_up]))
            rows = 2 * rw.inits[w_gate].dims[1]
            for i, first in ((2, 0), (3, 1)):
                s, (out,) = rw.node("Slice", [fc1, rw.ints(first), rw.ints(rows), rw.ints(1), rw.ints(2)])
                nodes.append(s)
                n.input[i] = out
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    prune(model)
    return model


def lower_to_fused(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite every ai.itera node in place to com.microsoft kernels; returns the model.

    A prompt's SelectiveScan is the exception: its function (the chunked scan as batched
    MatMuls) is inlined, since onnxruntime's LinearAttention runs a sequence token by token,
    ~2.3x slower at 512 tokens (bench/PROFILE.md); the one-token SsmStep becomes LinearAttention.
    """
    if any(n.domain == DOMAIN and n.op_type == "SelectiveScan" for n in model.graph.node):
        model.CopyFrom(onnx.inliner.inline_selected_functions(model, [(DOMAIN, "SelectiveScan")]))
        share_constants(model)  # its masks once, not once a layer
    rw = _Rewriter(model)
    nodes = []
    for n in model.graph.node:
        if n.domain != DOMAIN:
            nodes.append(n)
        elif n.op_type in ("SelectiveScan", "SsmStep"):
            nodes += rw.scan(n)
        elif n.op_type == "CausalConv1d":
            nodes += rw.conv(n)
        elif n.op_type == "TopKMoE":
            nodes += rw.moe(n)
        elif n.op_type == "KvAttention":
            nodes += rw.attention(n)
        else:
            raise ValueError(f"no lowering for {DOMAIN}::{n.op_type}")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    prune(model)  # the dt chains LinearAttentionGate replaced, before the passes below look at adds
    # Fewer nodes for onnxruntime to dispatch (~0.3 µs each; counted in bench/PROFILE.md).
    unit_gathers_to_reshapes(model, rw.sym)
    collapse_reshapes(model, rw.sym)
    drop_identity_reshapes(model, rw.sym)
    if sink_reshapes(model, rw.sym):  # the D skip in the packed layout: its Reshapes cancel
        collapse_reshapes(model, rw.sym)
        drop_identity_reshapes(model, rw.sym)
    fuse_skip_rms_norms(model, rw.sym)
    gather_unit_rows(model, rw.sym)
    drop_identity_output_reshapes(model, rw.sym)
    prune(model)
    return model
