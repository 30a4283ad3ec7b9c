"""Weight quantization of exported float graphs with onnxruntime's own quantizers and kernels.

int8: dense MatMuls through `quantize_dynamic` (int8 weights, activations quantized at run
time). int4: symmetric 4-bit blocks along the input dimension (`MatMulNBitsQuantizer`,
com.microsoft `MatMulNBits` with int8 activations, accuracy_level 4). A tied embedding is
quantized once (`quantize_tied_table`): the embedding Gather reads it through
`GatherBlockQuantized` and the tied head through `MatMulNBits`, so a bundle stores one
quantized table and no fp32 copy. com.microsoft MoE experts become QMoE (`_quantize_moe`).
What stays in float, and why, is `KEEP_FLOAT`; each bundle's manifest lists those tensors.
Works on any float ONNX graph whose MatMul weights are initializers.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from itera_runtime.bundle import Quantization

from .graph_passes import all_nodes, gemm_to_matmul, materialize_transposed_weights, prune
from .graphfile import graph_bytes

__all__ = ["quantize_graph", "quantize_tied_table", "kept_float", "parse_options", "SCHEMES", "Scheme", "MODES",
           "SETTINGS", "KEEP_FLOAT"]

# Float tensors a quantized bundle keeps, by what they are (regex on the tensor name) and why.
# Only MatMul weights, the tied table and MoE experts are ever quantized; the other rows say
# why the rest is not worth it or not safe. `kept_float` lists the matches per bundle.
KEEP_FLOAT: dict[str, tuple[str, str]] = {
    "router": (r"\.router\.",
               "MoE router (D×E, under 0.1% of the weights): its argmax picks the experts, so rounding it "
               "flips expert choices for a few bytes saved"),
    "ssm": (r"\.(A_log|D|dt_bias)$|^(neg|unsqueeze)(_\d+)?$|^spread_heads_",
            "SSM decay A, skip D and dt bias (3·H floats per layer; traced names neg/unsqueeze are the "
            "folded -exp(A_log) and D): exponentiated and compounded over every recurrence step; the "
            "lowering's one-hot spread of dt over each head's channels (a MatMul: quantizing it would "
            "round dt, and a quantized MatMul of H×H·P is slower than the float one)"),
    "norm": (r"norm", "RMSNorm gains: elementwise, D floats each"),
    "conv": (r"conv", "depthwise causal conv kernel and bias (K taps per channel): CausalConvWithState "
                      "takes fp32 weights only"),
}
# MatMul weights (regex on the name) the quantizers must skip: the KEEP_FLOAT rows that are MatMuls.
FLOAT_MATMULS = (KEEP_FLOAT["router"][0], r"^spread_heads_")

# Dense weights and the tied table, per scheme, chosen by measurement on Itera-Lite tiny (trained
# 71 steps, vocab 2048) and small (random init), 2-vCPU Xeon shared with other jobs. Speed:
# decode tokens per CPU-second of the one decode thread (wall time here was 3-10x lower and
# +-25% noisy), depth 128, medians of 21 interleaved rounds. Quality: bits/byte change vs fp32
# on 1024 held-out tokens (Macbeth, test split) through the runtime (`validate.compare`).
#                              tiny tok/CPU-s   small tok/CPU-s   tiny Δbits/byte   tiny bytes
#   fp32                            2,847             670                 -         6,245,681
#   int8 dynamic + 8-bit table      3,810           1,010            +0.009%        1,909,605
#   int8 MatMulNBits 8-bit b32      3,684             954            +0.002%        1,964,123
#   int4 b32 (chosen)               4,454           1,419            -0.08%         1,292,531
# (commands: `itera-export CKPT --quantize int8 [--quant-option weights=nbits]`, then
# `itera-bench latency B... -p 0 -n 64 -d 128 -t 1 -r 9`; wall-clock rows were in the same order.
# `itera-bench quality B... --reference FP32 --max-tokens 20000 --carry-state` on the test split:
# int8 dynamic +0.013%, int8 MatMulNBits +0.008%, int4 -0.029%.)
# Base (random init, 9 rounds of 32 steps): fp32 220, int8 dynamic 425, int8 MatMulNBits 383,
# int4 652 tok/CPU-s; 90.4 / 23.4 / 24.3 / 14.6 MB.
# - int8 dense weights: quantize_dynamic (per tensor) stays; 8-bit MatMulNBits was 3-10% slower
#   in all three presets and only better in ways bits/byte cannot see here (max |Δlogits| on small
#   0.80 vs 1.59). `--quant-option weights=nbits` selects it.
# - no static (calibrated QDQ) int8: quantize_static on the tiny decode graph, calibrated on
#   256 held-out decode steps, ran 2,808 tok/CPU-s vs dynamic's 3,154 (fp32 2,318) in the same
#   run, with the same logits error (max |Δ| 0.706 vs 0.705): the QDQ pairs cost more than the
#   run-time activation ranges they save at batch 1.
# - accuracy_level 4 (int8 activations): int4 tiny 4,133 vs 3,495 tok/CPU-s at level 0; the
#   8-bit tied head 2048x128 alone took ~1.5 ms at level 0 vs 65 us at level 4 (dequantizes per call).
# - block 32: blocks of 64/128 were 2-5% faster (about the rounds' spread) and 3-5% smaller;
#   their bits/byte differences on this barely trained model are noise (+0.016%, -0.055%), so
#   the smallest block, the least rounding error (4-bit 2048x128 head, Gaussian weights: 0.10
#   at 32, 0.14 at 64/128), wins.
# - tied table at the scheme's bits: int4 with an 8-bit table was 10% larger (1,423,611 B) and
#   no faster (3,962 tok/CPU-s); a float table (fp32 Gather + a 4-bit copy for the head) made
#   the int4 bundle larger than int8 (2,340,684 B).
# - in_proj stays quantized: keeping it float nearly doubled the int4 bundle (2,485,137 B) for
#   no measurable bits/byte (-0.074% vs -0.08%).
# With weights "dynamic" (int8), block_size and accuracy_level apply to the tied table only.
SETTINGS = {
    "int8": {"weights": "dynamic", "bits": 8, "block_size": 32, "symmetric": True, "accuracy_level": 4,
             "table_bits": 8, "float_matmuls": FLOAT_MATMULS,
             "moe_block_size": 0, "moe_step_block_size": 32,
             "moe_accuracy_level": 0, "moe_step_accuracy_level": 4},
    "int4": {"weights": "nbits", "bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 4,
             "table_bits": 4, "float_matmuls": FLOAT_MATMULS,
             "moe_block_size": 32, "moe_step_block_size": 32,
             "moe_accuracy_level": 0, "moe_step_accuracy_level": 4},
}

# QMoE expert weights (SETTINGS moe_*): raw uint8 [E, N, K*bits/8] (weights_prepacked=0: the
# layout of the MoE fp32 [E, N, K] weights, 4-bit codes packed low nibble first), no zero points
# (the default 2^(bits-1) makes them symmetric), 8 or 4 bits as the scheme.
# - moe_block_size: the quantization's blocks along K, one scale each, or 0 for one scale per
#   output channel. onnxruntime runs block layouts with its QNBit kernel (MatMulNBits'), and a
#   per-channel layout by dequantizing every routed expert to fp32 on each call, then a GEMM.
# - moe_step_block_size: the blocks the decode graph's QMoE is given (0: as quantized).
#   Per-channel experts are laid out there in blocks, each block with its channel's scale: the
#   same codes (stored once, export/weights.py), the int8-activation kernel.
# - moe_step_accuracy_level: QMoE's accuracy_level in the one-token (decode) graph, 4 = int8
#   activations; moe_accuracy_level: in prompt graphs, 0 = fp32 activations (4-bit only: 8-bit
#   blocks run int8 activations at every level).
# Measured on a 2-vCPU AVX2 EPYC (noisy neighbours), CPU time per call of the fused graphs, 1
# thread, interleaved rounds, medians (bench/PROFILE.md "Issue 29, stop 38"), tiny / small / base,
# int8 per channel and int4 at level 0 before, blocks of 32 and level 4 in decode after:
#   decode step                int8 -2% / -31% / -29%     int4 -9% / -22% / -29%
#   prompt of 512 tokens       int8 +5% / +16% / +19%     int4 unchanged (the same graph)
#   the prompt graph at level 4 instead of 0 (int4): +9% / +4% / +10%, so level 0 there.
# At int8 the prompt's layout was a question of length (stop 39, 2-vCPU AVX-512 Xeon, same method):
# per channel against blocks of 32, small / base, 16 tokens +27% / +43%, 512 -4.6% / -8.3%. Since
# stop 40 a prompt graph's int8 experts run neither: the exporter rewrites its per-channel QMoE
# into per-expert DynamicQuantizeMatMuls over the routed rows (export/route_experts.py), faster
# at every length from 16 tokens. So int8 experts are quantized per channel (moe_block_size 0):
# the prompt graph reads those scales, the decode graph the same codes in blocks of 32 (+1% for
# the block scales beside the channel ones). bits/byte (256 test tokens; torch 5.4232 / 5.9846 /
# 6.0208): blocks 5.4229 / 5.9923 / 6.0277, per channel 5.4241 / 5.9830 / 6.0178 (stop 39).
# `moe_block_size=32` gives blocks everywhere (the prompt graph then keeps QMoE);
# `moe_step_block_size=0` per channel everywhere (no accuracy_level: the layout onnxruntime
# 1.28-1.30 load, requires.py).

_QUANT_OPS = {"MatMulInteger", "QMoE", "MatMulNBits", "DynamicQuantizeMatMul", "QLinearMatMul", "GatherBlockQuantized"}


def _count_quantized(path: Path) -> int:
    """Quantized compute nodes, plus Gathers that read an int8/uint8/int4 table."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    int_types = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    int_inits = {t.name for t in model.graph.initializer if t.data_type in int_types}
    n = 0
    for node in model.graph.node:  # an If whose branches run QMoE counts once
        if any(m.op_type in _QUANT_OPS for m in all_nodes([node])):
            n += 1
        elif node.op_type == "Gather" and node.input[0] in int_inits:
            n += 1
    return n


def _quantize_experts(w, bits: int, block: int):
    """Symmetric quantization of (E, N, K) fp32 weights: QMoE's uint8 codes (E, N, K*bits/8) and
    the scales (E, N, K/block), one column when `block` is 0 (one scale per output channel)."""
    import numpy as np

    e, n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    blocks = w.reshape(e, n, k // block, block) if block else w.reshape(e, n, 1, k)
    scale = np.maximum(np.abs(blocks).max(-1) / qmax, np.finfo(np.float32).tiny).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -qmax - 1, qmax).astype(np.int16) + 2 ** (bits - 1)
    q = q.reshape(e, n, k).astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return q, scale


def _scales_as(scale, k: int, layout: int):
    """The quantization's scales (E, N, blocks) as QMoE takes them for `layout`: (E, N) for 0 (per
    channel), else (E, N, K/layout), each scale repeated over the layout blocks its own covers —
    the same dequantized weights, another kernel."""
    import numpy as np

    if not layout:
        assert scale.shape[-1] == 1, "a per-channel layout needs per-channel scales"
        return scale[..., 0]
    return np.repeat(scale, k // scale.shape[-1] // layout, axis=-1)


def _layout_for(k1: int, k2: int, block: int, layout: int) -> int:
    """The block layout QMoE gets for experts of inner sizes k1, k2 quantized in `block`s (0:
    per channel): `layout` where it divides both and the quantization's blocks, else `block`."""
    if layout and all(k % layout == 0 for k in (k1, k2)) and (block == 0 or block % layout == 0):
        return layout
    return block


def _quantize_moe(model, bits: int, block_size: int, accuracy_level: int = 0, layout_block: int = 0) -> int:
    """Rewrite each com.microsoft MoE whose fc1/fc2 weights are initializers into QMoE.

    block_size: the quantization's blocks along K (0: one scale per output channel).
    layout_block: the blocks this graph's QMoE runs (0: as quantized); per-channel experts laid
    out in blocks run onnxruntime's QNBit kernel on the same codes (see SETTINGS).
    accuracy_level: QMoE's, for block-wise layouts (4: int8 activations; 0: fp32).
    Only nodes without fc3 weights are handled (Itera-Lite lowers to fused SwiGLU); other
    MoE nodes are left in fp32. A block size that does not divide D and F falls back to
    per-output-channel scales. Returns the number of nodes rewritten.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    done = 0
    for node in list(g.node):
        if node.op_type != "MoE" or node.domain != "com.microsoft":
            continue
        ins = list(node.input) + [""] * (8 - len(node.input))
        fc1, fc2 = ins[2], ins[4]
        if fc1 not in inits or fc2 not in inits or any(ins[6:]):
            continue
        w1 = numpy_helper.to_array(inits[fc1]).astype(np.float32)
        w2 = numpy_helper.to_array(inits[fc2]).astype(np.float32)
        if w1.ndim != 3 or w2.ndim != 3 or (bits == 4 and (w1.shape[2] % 2 or w2.shape[2] % 2)):
            continue
        block = block_size if block_size and w1.shape[2] % block_size == 0 and w2.shape[2] % block_size == 0 else 0
        layout = _layout_for(w1.shape[2], w2.shape[2], block, layout_block)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs.update(expert_weight_bits=bits, weights_prepacked=0)
        if layout:
            attrs["block_size"] = layout
            if accuracy_level:  # 0 is the default; onnxruntime < 1.31 refuses the attribute
                attrs["accuracy_level"] = accuracy_level
        weights = []  # fc1 codes, scales, fc2 codes, scales
        for w, name in ((w1, fc1), (w2, fc2)):
            q, scale = _quantize_experts(w, bits, block)
            qn = f"{name}_q{bits}"
            g.initializer.append(numpy_helper.from_array(q, qn))
            g.initializer.append(numpy_helper.from_array(_scales_as(scale, w.shape[2], layout), f"{qn}_scales"))
            weights += [qn, f"{qn}_scales"]
        inputs = [ins[0], ins[1], weights[0], weights[1], ins[3], weights[2], weights[3], ins[5]]
        while not inputs[-1]:
            inputs.pop()
        idx = list(g.node).index(node)
        g.node.remove(node)
        g.node.insert(idx, helper.make_node("QMoE", inputs, list(node.output), name=node.name,
                                            domain="com.microsoft", **attrs))
        done += 1
    return done


def one_token_graph(model) -> bool:
    """Whether the graph reads one token a call: an int64 (batch, 1) token input (a decode step)."""
    import onnx

    for i in model.graph.input:
        t = i.type.tensor_type
        if t.elem_type == onnx.TensorProto.INT64 and len(t.shape.dim) == 2 and t.shape.dim[1].dim_value == 1:
            return True
    return False


def _block_for(k: int, block_size: int) -> int:
    """The largest power-of-two block ≤ block_size that divides k (0 if under 16, the kernels' minimum)."""
    b = block_size
    while b >= 16 and k % b:
        b //= 2
    return b if b >= 16 else 0


def _block_quantize(w, bits: int, block_size: int):
    """onnxruntime's symmetric block quantizer on w (K, N): packed (N, K/block, block*bits/8), scales (N, K/block)."""
    import numpy as np
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits,
                                          quant_format=QuantFormat.QOperator)
    # The C++ kernel reads w's buffer as row-major: a transposed view would be read untransposed.
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(w))
    return packed, scales


def quantize_tied_table(model, bits: int, block_size: int, accuracy_level: int) -> list[str]:
    """Quantize each embedding table once for its Gather and its tied head; returns the tables done.

    Gather(E, ids) with a float (V, D) initializer E becomes GatherBlockQuantized, and every
    MatMul(x, Transpose(E)) (the tied head, as both exporters trace it) becomes MatMulNBits
    with N=V, K=D. Both kernels read blocks along D with the same packing and the same default
    zero point 2^(bits-1), so MatMulNBits's B (V, D/block, blob) is the Gather's (V, D·bits/8)
    table reshaped: one initializer on disk; the Reshape is folded when the session loads.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    done = []
    for node in list(g.node):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.input[0] not in inits:
            continue
        table = inits[node.input[0]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table.data_type != TensorProto.FLOAT or len(table.dims) != 2 or axis != 0:
            continue
        v, d = table.dims
        block = _block_for(d, block_size)
        if not block:
            continue
        qname, sname = f"{table.name}_q{bits}", f"{table.name}_q{bits}_scales"
        if qname not in inits:
            packed, scales = _block_quantize(numpy_helper.to_array(table).T, bits, block)
            g.initializer.extend([numpy_helper.from_array(packed.reshape(v, d * bits // 8), qname),
                                  numpy_helper.from_array(scales.astype(np.float32), sname)])
            inits[qname] = g.initializer[-2]
        pos = list(g.node).index(node)
        g.node.remove(node)
        g.node.insert(pos, helper.make_node(
            "GatherBlockQuantized", [qname, node.input[1], sname], list(node.output), name=node.name,
            domain="com.microsoft", bits=bits, block_size=block, gather_axis=0, quantize_axis=1))
        for mm in list(g.node):
            t = producers.get(mm.input[1]) if mm.op_type == "MatMul" and len(mm.input) > 1 else None
            perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None) if t is not None else None
            if t is None or t.op_type != "Transpose" or t.input[0] != table.name or perm not in (None, [1, 0]):
                continue
            bname = f"{qname}_blocks"
            if bname not in inits:
                shape = numpy_helper.from_array(np.array([v, d // block, block * bits // 8], np.int64),
                                                f"{bname}_shape")
                g.initializer.append(shape)
                inits[bname] = shape
                g.node.insert(0, helper.make_node("Reshape", [qname, shape.name], [bname], name=f"{bname}_reshape"))
            pos = list(g.node).index(mm)
            g.node.remove(mm)
            g.node.insert(pos, helper.make_node(
                "MatMulNBits", [mm.input[0], bname, sname], list(mm.output), name=mm.name or f"{bname}_head",
                domain="com.microsoft", K=d, N=v, bits=bits, block_size=block, accuracy_level=accuracy_level))
        done.append(table.name)
    if done and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    prune(model)
    return done


def _float_matmuls(model, patterns) -> list[str]:
    """Names of the MatMul nodes whose weight name matches one of `patterns` (kept in float)."""
    rules = [re.compile(p) for p in patterns]
    names = []
    for i, node in enumerate(model.graph.node):
        if node.op_type == "MatMul" and len(node.input) > 1 and any(r.search(node.input[1]) for r in rules):
            if not node.name:  # the quantizers exclude nodes by name
                node.name = f"keep_float_matmul_{i}"
            names.append(node.name)
    return names


def kept_float(path: Path) -> dict[str, dict]:
    """The float initializers of a graph file that a KEEP_FLOAT row names: {row: {why, tensors}}."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    floats = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims)]
    out = {}
    for kind, (pattern, why) in KEEP_FLOAT.items():
        names = sorted(n for n in floats if re.search(pattern, n))
        if names:
            out[kind] = {"why": why, "tensors": names}
    return out


def _quantize_matmuls(model, settings: dict, exclude: list[str], work: Path, out: Path):
    """Dense MatMul weights per settings["weights"]; writes the quantized graph to `out`."""
    import onnx

    if settings["weights"] == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        onnx.save_model(model, str(work))
        quantize_dynamic(
            str(work), str(out), op_types_to_quantize=["MatMul"], per_channel=False, reduce_range=False,
            weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
            # Graphs holding com.microsoft ops fail ORT's shape inference without this.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        return "onnxruntime.quantization.quantize_dynamic"
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(
        block_size=settings["block_size"], is_symmetric=settings["symmetric"],
        accuracy_level=settings["accuracy_level"], quant_format=QuantFormat.QOperator,
        op_types_to_quantize=("MatMul",), bits=settings["bits"],
    )
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=config)
    quantizer.process()
    q = quantizer.model.model
    if q.ByteSize() >= 2**31 - 2**24:
        raise ValueError("quantized graph over 2 GiB; external data is not supported here")
    onnx.save_model(q, str(out))
    return "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer"


def parse_options(mode: str, items) -> dict:
    """`KEY=VALUE` strings (itera-export --quant-option) → SETTINGS overrides, checked against SETTINGS[mode].

    Values are JSON (`block_size=64`, `float_matmuls=["\\.router\\.", "\\.in_proj\\."]`) or a bare
    string (`weights=dynamic`), and must have the type of the setting they replace.
    """
    import json

    if mode not in MODES:
        raise ValueError(f"quantization options need --quantize {' or '.join(MODES)}")
    out = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        if not sep or key not in SETTINGS[mode]:
            raise ValueError(f"--quant-option {item!r}: expected KEY=VALUE with KEY one of {', '.join(SETTINGS[mode])}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        default = SETTINGS[mode][key]
        kind = list if isinstance(default, (list, tuple)) else type(default)
        if not isinstance(value, kind) or isinstance(value, bool) != isinstance(default, bool):
            kinds = {int: "an integer", str: "a string", list: "a JSON list", bool: "true or false"}
            raise ValueError(f"--quant-option {item!r}: {key} takes {kinds.get(kind, kind.__name__)}, like {default!r}")
        out[key] = value
    if out.get("weights", "nbits") not in ("nbits", "dynamic"):
        raise ValueError("--quant-option weights: 'nbits' or 'dynamic'")
    merged = dict(SETTINGS[mode], **out)
    for key in ("moe_block_size", "moe_step_block_size"):
        b = merged[key]
        if b and (b < 16 or b & (b - 1)):
            raise ValueError(f"--quant-option {key}={b}: 0 or a power of two of at least 16 (QMoE's blocks)")
    if merged["moe_block_size"] and merged["moe_block_size"] % max(merged["moe_step_block_size"], 1):
        raise ValueError(f"--quant-option moe_step_block_size={merged['moe_step_block_size']}: must divide "
                         f"moe_block_size={merged['moe_block_size']} (or be 0)")
    return out


def quantize_graph(src: Path, dst: Path, mode: str, overrides: dict | None = None) -> Quantization:
    """Quantize the float graph `src` to `dst` ("int8" or "int4"); returns what was done.

    overrides: SETTINGS entries to change (the measurements that chose SETTINGS use it).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnx

    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose from {list(MODES)}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such ONNX graph")
    settings = dict(SETTINGS[mode], **(overrides or {}))
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    work = tmp.with_suffix(".work.onnx")
    # The quantizers log advice (pre-processing, parameters not given for tensors they skip)
    # through the root logger, and importing matmul_nbits_quantizer runs
    # logging.basicConfig(level=INFO): import it first, silence the root logger while we
    # quantize, then leave logging as we found it.
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401

    root.setLevel(logging.ERROR)
    # The int4 quantizer logs every node it skips at INFO through its own handler.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    try:
        model = onnx.load(str(src))
        settings["gemm_rewritten"] = gemm_to_matmul(model)
        tables = []
        if settings.get("table_bits"):
            tables = quantize_tied_table(model, settings["table_bits"], settings["block_size"],
                                         settings["accuracy_level"])
        settings["tied_tables"] = tables
        # An untied head MatMul(x, Transpose(W)) is skipped by the quantizers (B is not an
        # initializer); storing W.T lets it be quantized like any other weight.
        settings["transposed_weights_materialized"] = materialize_transposed_weights(model)
        exclude = _float_matmuls(model, settings["float_matmuls"])
        method = _quantize_matmuls(model, settings, exclude, work, tmp)
        q = onnx.load(str(tmp))
        step = one_token_graph(q)
        settings["moe_quantized"] = _quantize_moe(
            q, 8 if mode == "int8" else 4, settings["moe_block_size"],
            settings["moe_step_accuracy_level" if step else "moe_accuracy_level"],
            settings["moe_step_block_size"] if step else 0)
        prune(q)  # the fp32 expert weights the QMoE nodes replaced
        onnx.save_model(q, str(tmp))
        nodes = _count_quantized(tmp)
        if nodes == 0:
            raise ValueError(f"{src}: nothing to quantize (no MatMul with an initializer weight)")
        settings["kept_float"] = kept_float(tmp)
        os.replace(tmp, dst)
    finally:
        root.setLevel(level)
        for h in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(h)
        tmp.unlink(missing_ok=True)
        work.unlink(missing_ok=True)
    return Quantization(mode=mode, method=method, settings=settings, bytes_before=graph_bytes(src),
                        bytes_after=graph_bytes(dst), nodes_quantized=nodes)


@dataclass(frozen=True)
class Scheme:
    """A way to store a bundle's weights: the CLI choice, the default bundle name, how to apply it."""

    name: str
    description: str
    suffix: str  # appended to the default bundle folder name
    apply: Callable[[Path, Path, dict], Quantization] | None  # (float graph, destination, overrides) → record


# The one list of quantization schemes: itera-export's --quantize choices, the default output
# names and what the exporter applies all come from here.
SCHEMES: dict[str, Scheme] = {
    "none": Scheme("none", "fp32 weights as trained", "", None),
    "int8": Scheme("int8", "8-bit weights (dynamic activation quantization), one 8-bit tied embedding table; "
                           "QMoE experts", "-int8",
                   lambda src, dst, overrides=None: quantize_graph(src, dst, "int8", overrides)),
    "int4": Scheme("int4", "4-bit weight blocks (MatMulNBits), one 4-bit tied embedding table; QMoE experts",
                   "-int4",
                   lambda src, dst, overrides=None: quantize_graph(src, dst, "int4", overrides)),
}
MODES = tuple(name for name, scheme in SCHEMES.items() if scheme.apply is not None)


def read_quantized_experts(portable, fused) -> int:
    """Make a portable graph compute its fp32 expert weights from the fused graph's QMoE weights.

    A quantized dual bundle would otherwise store the experts twice: packed for QMoE (fused
    set) and fp32 for the portable TopKMoE, which has no quantized form. Each fp32 expert
    initializer of `portable` that a QMoE of `fused` quantized (same name before the `_q{bits}`
    suffix) becomes standard-op dequantization of those very bytes (Cast, Sub, Mul; nibble
    unpacking for 4 bits), which onnxruntime folds into constants at load. The portable
    experts then carry the fused set's quantization error, so the two sets agree. Returns the
    number of tensors rewritten.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    fused_inits = {t.name: t for t in fused.graph.initializer}
    sources = {}  # fp32 name → (packed name, scales name, bits)
    for node in all_nodes(fused.graph.node):  # a prompt graph's QMoE sit in If branches
        if node.op_type != "QMoE" or node.domain != "com.microsoft":
            continue
        bits = next(a.i for a in node.attribute if a.name == "expert_weight_bits")
        for q_name, s_name in ((node.input[2], node.input[3]), (node.input[5], node.input[6])):
            suffix = f"_q{bits}"
            if q_name.endswith(suffix) and q_name in fused_inits and s_name in fused_inits:
                sources.setdefault(q_name[: -len(suffix)], (q_name, s_name, bits))
    g = portable.graph
    inits = {t.name: t for t in g.initializer}
    nodes, done = [], 0

    def const(name, value):
        g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    for name, (q_name, s_name, bits) in sorted(sources.items()):
        if name not in inits:
            continue
        w = inits[name]
        E, N, K = w.dims
        for src in (q_name, s_name):
            if src not in inits:
                g.initializer.append(fused_inits[src])
                inits[src] = fused_inits[src]
        scales = list(fused_inits[s_name].dims)
        p = f"{name}.deq"
        if bits == 4:
            # Two codes per byte, low nibble first: (E, N, K/2) → (E, N, K/2, 2) → (E, N, K).
            nodes += [
                helper.make_node("BitwiseAnd", [q_name, const(f"{p}.mask", np.uint8(15))], [f"{p}.lo"]),
                helper.make_node("BitShift", [q_name, const(f"{p}.four", np.uint8(4))], [f"{p}.hi"],
                                 direction="RIGHT"),
                helper.make_node("Unsqueeze", [f"{p}.lo", const(f"{p}.last", np.array([-1], np.int64))], [f"{p}.lo1"]),
                helper.make_node("Unsqueeze", [f"{p}.hi", f"{p}.last"], [f"{p}.hi1"]),
                helper.make_node("Concat", [f"{p}.lo1", f"{p}.hi1"], [f"{p}.pairs"], axis=-1),
                helper.make_node("Reshape", [f"{p}.pairs", const(f"{p}.shape", np.array([E, N, K], np.int64))],
                                 [f"{p}.codes"]),
            ]
            codes = f"{p}.codes"
        else:
            codes = q_name
        nodes += [
            helper.make_node("Cast", [codes], [f"{p}.f"], to=TensorProto.FLOAT),
            helper.make_node("Sub", [f"{p}.f", const(f"{p}.zero", np.float32(2 ** (bits - 1)))], [f"{p}.c"]),
        ]
        if len(scales) == 3:  # blocks along K: (E, N, K/B) scales
            block = K // scales[2]
            nodes += [
                helper.make_node("Reshape", [f"{p}.c", const(f"{p}.blocks", np.array([E, N, K // block, block], np.int64))],
                                 [f"{p}.cb"]),
                helper.make_node("Unsqueeze", [s_name, const(f"{p}.slast", np.array([-1], np.int64))], [f"{p}.s"]),
                helper.make_node("Mul", [f"{p}.cb", f"{p}.s"], [f"{p}.wb"]),
                helper.make_node("Reshape", [f"{p}.wb", const(f"{p}.full", np.array([E, N, K], np.int64))], [name]),
            ]
        else:  # one scale per output channel: (E, N)
            nodes += [
                helper.make_node("Unsqueeze", [s_name, const(f"{p}.slast", np.array([-1], np.int64))], [f"{p}.s"]),
                helper.make_node("Mul", [f"{p}.c", f"{p}.s"], [name]),
            ]
        g.initializer.remove(w)
        done += 1
    for i, n in enumerate(nodes):  # constants first: they depend on initializers only
        n.name = f"dequantize_experts_{i}"
        g.node.insert(i, n)
    return done

