"""The `ai.itera` ONNX ops: their schemas, the exporter's translations, and their decompositions.

Each custom torch op of the model (`itera::causal_conv1d`, `itera::selective_scan`,
`itera::ssm_step`, `itera::moe`) becomes one `ai.itera` node in the exported graph. The
node's meaning ships inside the model as an ONNX FunctionProto of standard ops, so stock
onnxruntime runs it (ORT inlines model-local functions); `lower.py` can instead rewrite the
nodes to onnxruntime's fused contrib kernels.

The decompositions are not written by hand: each is the op's own torch kernel from
`itera_lite.models` exported alone with dynamic batch/sequence dims, its graph turned into a
function (initializers become Constant nodes). That keeps one home for the math.
"""

from __future__ import annotations

import warnings

import onnx
import torch
from onnx import helper
from onnx.defs import OpSchema
from onnxscript.values import Op, Opset

from itera_lite.models.hybrid import kv_attention
from itera_lite.models.moe import moe_dense
from itera_lite.models.ssm import causal_conv1d, ssd_chunked, ssd_token

from . import tracecache

DOMAIN = "ai.itera"
VERSION = 1
ITERA = Opset(DOMAIN, VERSION)

_F = OpSchema.FormalParameter


def _schema(name: str, inputs: list[str], outputs: list[str], attrs: tuple[str, ...] = ()) -> OpSchema:
    # Not registered with onnx.defs (that is process-global): the Op objects below carry
    # the schema so onnxscript knows each op's arity when the exporter records the node.
    return OpSchema(
        name, DOMAIN, VERSION,
        inputs=[_F(i, "T") for i in inputs],
        outputs=[_F(o, "T") for o in outputs],
        type_constraints=[("T", ["tensor(float)"], "")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in attrs],
    )


_SCAN_IO = (["x", "dt", "A", "B", "C", "state"], ["y", "new_state"])
CausalConv1d = Op(ITERA, "CausalConv1d", _schema("CausalConv1d", ["x", "conv_state", "weight", "bias"], ["y", "new_conv_state"]))
SelectiveScan = Op(ITERA, "SelectiveScan", _schema("SelectiveScan", *_SCAN_IO))
SsmStep = Op(ITERA, "SsmStep", _schema("SsmStep", *_SCAN_IO))
# Attention of a hybrid's attention layer over its KV buffer (itera_lite/models/hybrid.py): the
# mask is int64, and the attributes are what the GroupQueryAttention lowering reads.
KvAttention = Op(ITERA, "KvAttention", OpSchema(
    "KvAttention", DOMAIN, VERSION,
    inputs=[*(_F(i, "T") for i in ("q", "k", "v", "past_key", "past_value")), _F("attention_mask", "M")],
    outputs=[_F(o, "T") for o in ("y", "present_key", "present_value")],
    type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int64)"], "")],
    attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                OpSchema.Attribute("kv_heads", OpSchema.AttrType.INT, ""),
                OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, ""),
                OpSchema.Attribute("rope_theta", OpSchema.AttrType.FLOAT, "")],
))
TopKMoE = Op(ITERA, "TopKMoE", _schema("TopKMoE", ["x", "router_logits", "w_gate", "w_up", "w_down"], ["y"], ("top_k",)))


# Translations for `torch.onnx.export(..., custom_translation_table=...)`: one opaque node each.
def _causal_conv1d(x, conv_state, weight, bias):
    return CausalConv1d(x, conv_state, weight, bias)


def _selective_scan(x, dt, A, Bm, Cm, state):
    return SelectiveScan(x, dt, A, Bm, Cm, state)


def _ssm_step(x, dt, A, Bm, Cm, state):
    return SsmStep(x, dt, A, Bm, Cm, state)


def _moe(x, router_logits, w_gate, w_up, w_down, top_k: int):
    return TopKMoE(x, router_logits, w_gate, w_up, w_down, top_k=top_k)


def _kv_attention(q, k, v, past_k, past_v, attention_mask, num_heads: int, kv_heads: int, scale: float,
                  rope_theta: float):
    return KvAttention(q, k, v, past_k, past_v, attention_mask, num_heads=num_heads, kv_heads=kv_heads,
                       scale=scale, rope_theta=rope_theta)


def translation_table() -> dict:
    """custom_translation_table mapping the model's torch custom ops to `ai.itera` nodes."""
    ops = torch.ops.itera
    return {
        ops.causal_conv1d.default: _causal_conv1d,
        ops.selective_scan.default: _selective_scan,
        ops.ssm_step.default: _ssm_step,
        ops.moe.default: _moe,
        ops.kv_attention.default: _kv_attention,
    }


# ---------------------------------------------------------------------------------------
# Decompositions: the kernels, exported alone.


class _Kernel(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


# The exported scan's chunk: a prompt pads to whole chunks of it. onnxruntime ran a 512-token,
# 8-head scan in 2.4 / 1.7 / 2.9 ms at 32 / 64 / 128 (1 thread; bench/PROFILE.md), whatever
# chunk the model trains with (every chunk size computes the same scan).
EXPORT_CHUNK = 64


def _selective_scan_kernel(x, dt, A, Bm, Cm, state):
    return ssd_chunked(x, dt, A, Bm, Cm, state, chunk_size=EXPORT_CHUNK)


def _moe_kernel(top_k):
    return lambda x, r, g, u, d: moe_dense(x, r, g, u, d, top_k)


def _graph_to_function(model: onnx.ModelProto, schema: OpSchema) -> onnx.FunctionProto:
    g = model.graph
    # Name the function's formal inputs and outputs as the op schema does (x, dt, ...).
    rename = {v.name: p.name for v, p in zip(list(g.input) + list(g.output), schema.inputs + schema.outputs)}
    nodes = [
        helper.make_node("Constant", [], [init.name], value=init, name=f"const_{init.name}")
        for init in g.initializer
    ] + [onnx.NodeProto.FromString(n.SerializeToString()) for n in g.node]
    for n in nodes:
        n.input[:] = [rename.get(v, v) for v in n.input]
        n.output[:] = [rename.get(v, v) for v in n.output]
    return helper.make_function(
        DOMAIN, schema.name,
        inputs=[rename[i.name] for i in g.input],
        outputs=[rename[o.name] for o in g.output],
        nodes=nodes,
        opset_imports=list(model.opset_import),
        attributes=list(schema.attributes),
    )


def _export_kernel(fn, args, dynamic_shapes, opset: int) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            _Kernel(fn), tuple(args), dynamo=True, dynamic_shapes=(tuple(dynamic_shapes),),
            opset_version=opset, verbose=False,
        )
    model = prog.model_proto
    if model.functions:
        raise RuntimeError(f"kernel {fn} exported with nested functions; not supported")
    return model


def _top_k_from_attribute(fn: onnx.FunctionProto) -> None:
    """Make TopK's k read the function's `top_k` attribute instead of the traced constant."""
    topk = [n for n in fn.node if n.op_type == "TopK"]
    if len(topk) != 1:
        raise RuntimeError(f"expected one TopK in the MoE decomposition, found {len(topk)}")
    k_name = "top_k_attr_1d"
    scalar = helper.make_node("Constant", [], ["top_k_attr"], name="top_k_attr")
    scalar.attribute.append(onnx.AttributeProto(name="value_int", ref_attr_name="top_k", type=onnx.AttributeProto.INT))
    shape = helper.make_node("Constant", [], ["top_k_shape"], name="top_k_shape",
                             value=helper.make_tensor("top_k_shape", onnx.TensorProto.INT64, [1], [1]))
    reshape = helper.make_node("Reshape", ["top_k_attr", "top_k_shape"], [k_name], name="top_k_1d")
    topk[0].input[1] = k_name
    nodes = [scalar, shape, reshape] + list(fn.node)
    del fn.node[:]
    fn.node.extend(nodes)


def _pad_to_chunks(fn: onnx.FunctionProto) -> onnx.FunctionProto:
    """The scan function of whole chunks made to take any length: x, dt, B and C padded at the end
    with zero steps to a multiple of EXPORT_CHUNK (dt = 0: no decay, no input, the state unchanged),
    y cut back to the length given."""
    padded = {name: f"{name}_padded" for name in ("x", "dt", "B", "C", "y")}
    for n in fn.node:  # the body reads the padded inputs and writes the padded output
        n.input[:] = [padded.get(v, v) for v in n.input]
        n.output[:] = [padded["y"] if v == "y" else v for v in n.output]
    ints = lambda name, vals: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, onnx.TensorProto.INT64, [len(vals)], vals))
    head = [
        helper.make_node("Shape", ["x"], ["pad_len"], start=1, end=2),
        ints("pad_chunk", [EXPORT_CHUNK]), ints("pad_zero1", [0]), ints("pad_zero2", [0, 0]),
        ints("pad_zero3", [0, 0, 0]),
        helper.make_node("Mod", ["pad_len", "pad_chunk"], ["pad_rem"]),
        helper.make_node("Sub", ["pad_chunk", "pad_rem"], ["pad_left"]),
        helper.make_node("Mod", ["pad_left", "pad_chunk"], ["pad_amount"]),
        # Pad's pads: all begins, then all ends; only the ends of axis 1 are non-zero.
        helper.make_node("Concat", ["pad_zero3", "pad_zero2", "pad_amount", "pad_zero2"], ["pads4"], axis=0),
        helper.make_node("Concat", ["pad_zero3", "pad_zero1", "pad_amount", "pad_zero1"], ["pads3"], axis=0),
        helper.make_node("Pad", ["x", "pads4"], [padded["x"]]),
        helper.make_node("Pad", ["dt", "pads3"], [padded["dt"]]),
        helper.make_node("Pad", ["B", "pads4"], [padded["B"]]),
        helper.make_node("Pad", ["C", "pads4"], [padded["C"]]),
    ]
    tail = [ints("pad_one", [1]), helper.make_node("Slice", [padded["y"], "pad_zero1", "pad_len", "pad_one"], ["y"])]
    for n in head + tail:
        n.name = f"pad_{n.output[0]}"
    nodes = head + list(fn.node) + tail
    del fn.node[:]
    fn.node.extend(nodes)
    return fn


def _ssm_decompositions(H: int, P: int, N: int, G: int, Cc: int, K: int, opset: int) -> dict[str, bytes]:
    b, L = torch.export.Dim("batch"), torch.export.Dim("seq", min=2)
    bt = {0: b}
    btl = {0: b, 1: L}
    r = torch.randn
    conv = _export_kernel(
        causal_conv1d, (r(2, 5, Cc), r(2, K - 1, Cc), r(Cc, K), r(Cc)), (btl, bt, None, None), opset
    )
    # The scan is traced for whole chunks (L = EXPORT_CHUNK·k: a computed pad amount would make
    # torch.export bake in the traced length); _pad_to_chunks takes any L to that and back.
    bk = {0: b, 1: EXPORT_CHUNK * torch.export.Dim("chunks", min=1)}
    Lk = 2 * EXPORT_CHUNK
    scan = _export_kernel(
        _selective_scan_kernel,
        (r(2, Lk, H, P), r(2, Lk, H).abs(), -r(H).abs(), r(2, Lk, G, N), r(2, Lk, G, N), r(2, H, N, P)),
        (bk, bk, None, bk, bk, bt), opset,
    )
    step = _export_kernel(
        ssd_token, (r(2, 1, H, P), r(2, 1, H).abs(), -r(H).abs(), r(2, 1, G, N), r(2, 1, G, N), r(2, H, N, P)),
        (bt, bt, None, bt, bt, bt), opset,
    )
    return {"conv": _graph_to_function(conv, CausalConv1d.op_schema).SerializeToString(),
            "scan": _pad_to_chunks(_graph_to_function(scan, SelectiveScan.op_schema)).SerializeToString(),
            "step": _graph_to_function(step, SsmStep.op_schema).SerializeToString()}


def _moe_decomposition(D: int, E: int, Fw: int, opset: int) -> dict[str, bytes]:
    # top_k = 2 at trace time only; the function reads its `top_k` attribute.
    r = torch.randn
    T = torch.export.Dim("tokens", min=2)
    moe = _export_kernel(
        _moe_kernel(min(2, E)), (r(5, D), r(5, E), r(E, Fw, D), r(E, Fw, D), r(E, D, Fw)),
        ({0: T}, {0: T}, None, None, None), opset,
    )
    fn = _graph_to_function(moe, TopKMoE.op_schema)
    _top_k_from_attribute(fn)
    return {"moe": fn.SerializeToString()}


def _attention_decomposition(Hq: int, Hkv: int, Dh: int, C: int, scale: float, theta: float,
                             opset: int) -> dict[str, bytes]:
    """KvAttention's function, its sizes and constants baked in (every attention layer shares them)."""
    b, T, S = torch.export.Dim("batch"), torch.export.Dim("seq", min=2), torch.export.Dim("total", min=2)
    r = torch.randn

    def kernel(q, k, v, past_k, past_v, mask):
        return kv_attention(q, k, v, past_k, past_v, mask, Hq, Hkv, scale, theta)

    model = _export_kernel(
        kernel, (r(2, 5, Hq * Dh), r(2, 5, Hkv * Dh), r(2, 5, Hkv * Dh), r(2, Hkv, C, Dh), r(2, Hkv, C, Dh),
                 torch.ones(2, 9, dtype=torch.long)),
        ({0: b, 1: T}, {0: b, 1: T}, {0: b, 1: T}, {0: b}, {0: b}, {0: b, 1: S}), opset,
    )
    return {"attention": _graph_to_function(model, KvAttention.op_schema).SerializeToString()}


def _kernels(make, *dims) -> list[onnx.FunctionProto]:
    """make(*dims)'s functions, traced once per dims (tracecache.py: shared by models of the same
    sizes, in this process and, with a trace folder, in others)."""
    parts = _PARTS[make.__name__]
    made = tracecache.kept((make.__name__, *dims), parts, lambda: make(*dims))
    return [onnx.FunctionProto.FromString(made[p]) for p in parts]


_PARTS = {"_ssm_decompositions": ("conv", "scan", "step"), "_moe_decomposition": ("moe",),
          "_attention_decomposition": ("attention",)}


def itera_functions(cfg, opset: int) -> list[onnx.FunctionProto]:
    """FunctionProtos (domain ai.itera) for the four ops, specialised to a model config's dims.

    Head, state and group sizes are baked in as constants of the traced kernels (batch,
    sequence and token counts stay dynamic); the functions ship inside that model only.
    """
    d_inner = cfg.expand * cfg.d_model
    fns = _kernels(_ssm_decompositions, d_inner // cfg.head_dim, cfg.head_dim, cfg.d_state, cfg.n_groups,
                   d_inner + 2 * cfg.n_groups * cfg.d_state, cfg.d_conv, opset)
    if cfg.n_experts:  # no MoE function for a model without experts (an imported plain Mamba-2)
        fns += _kernels(_moe_decomposition, cfg.d_model, cfg.n_experts, cfg.d_expert, opset)
    if "attention" in getattr(cfg, "layer_types", ()):
        fns += _kernels(_attention_decomposition, cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads,
                        cfg.max_seq_len, cfg.attention_multiplier, cfg.rope_theta, opset)
    return fns
