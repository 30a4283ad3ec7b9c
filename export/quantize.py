"""Weight quantization of exported float graphs with onnxruntime's own quantizers.

int8: `quantize_dynamic` (int8 weights, activations quantized at run time: MatMulInteger).
int4: `MatMulNBitsQuantizer` (4-bit blocks of MatMul weights: com.microsoft MatMulNBits).
Works on any float ONNX graph whose MatMul weights are initializers.
Then, in both modes, every com.microsoft MoE node whose expert weights are initializers becomes
a com.microsoft QMoE with 8- (int8) or 4-bit (int4) symmetric expert weights (`_quantize_moe`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from itera_runtime.bundle import Quantization

from .graph_passes import gemm_to_matmul, materialize_transposed_weights, prune
from .graphfile import graph_bytes

__all__ = ["quantize_graph", "SCHEMES", "Scheme", "MODES", "INT8_SETTINGS", "INT4_SETTINGS"]

# Per-tensor, not per-channel: on the tiny baseline per-channel (which ORT pairs with a 7-bit
# reduced range) gave 1.85 max |Δlogits| vs 0.67 per-tensor. The embedding Gather is
# quantized too: the tied lm_head then reads the same int8 table (one copy in the file).
INT8_SETTINGS = {
    "weight_type": "QInt8",
    "per_channel": False,
    "reduce_range": False,
    "op_types": ["MatMul", "Gather"],
}
# Only MatMul weights; the embedding Gather stays fp32. accuracy_level 4 (int8 activations):
# tiny baseline decode step 1.55 vs 1.72 ms (level 0) at past 128, same logits error
# (`itera-bench step` on the two bundles, 1 thread, busy 2-vCPU VM; re-measure on devices).
INT4_SETTINGS = {
    "bits": 4,
    "block_size": 32,
    "symmetric": True,
    "accuracy_level": 4,
    "op_types": ["MatMul"],
    "materialize_transposed_weights": True,
}

# QMoE expert weights: raw uint8 [E, N, K*bits/8] (weights_prepacked=0: the layout of the MoE
# fp32 [E, N, K] weights, 4-bit codes packed low nibble first), no zero points (the default
# 2^(bits-1) makes them symmetric). int8: one scale per output channel (QMoE's fp32 kernel; its
# block-wise 8-bit kernel quantizes activations too, 1.2% vs 0.9% error on random weights).
# int4: blocks of 32 along K, fp32 activations (accuracy_level 0).
MOE_SETTINGS = {"int8": {"bits": 8, "block_size": 0}, "int4": {"bits": 4, "block_size": 32}}

_QUANT_OPS = {"MatMulInteger", "QMoE", "MatMulNBits", "DynamicQuantizeMatMul", "QLinearMatMul", "GatherBlockQuantized"}


def _count_quantized(path: Path) -> int:
    """Quantized compute nodes, plus Gathers that read an int8/uint8/int4 table."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    int_types = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    int_inits = {t.name for t in model.graph.initializer if t.data_type in int_types}
    n = 0
    for node in model.graph.node:
        if node.op_type in _QUANT_OPS:
            n += 1
        elif node.op_type == "Gather" and node.input[0] in int_inits:
            n += 1
    return n


def _quantize_experts(w, bits: int, block: int):
    """Symmetric quantization of (E, N, K) fp32 weights to QMoE's uint8 (E, N, K*bits/8) + scales."""
    import numpy as np

    e, n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    blocks = w.reshape(e, n, k // block, block) if block else w.reshape(e, n, 1, k)
    scale = np.maximum(np.abs(blocks).max(-1) / qmax, np.finfo(np.float32).tiny).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -qmax - 1, qmax).astype(np.int16) + 2 ** (bits - 1)
    q = q.reshape(e, n, k).astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return q, (scale if block else scale[..., 0])


def _quantize_moe(model, bits: int, block_size: int) -> int:
    """Rewrite each com.microsoft MoE whose fc1/fc2 weights are initializers into QMoE.

    Only nodes without fc3 weights are handled (Itera-Lite lowers to fused SwiGLU); other
    MoE nodes are left in fp32. A block size that does not divide D and F falls back to
    per-output-channel scales. Returns the number of nodes rewritten.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    done = 0
    for idx, node in enumerate(list(g.node)):
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
        new_inputs = [ins[0], ins[1]]
        for w, name, bias in ((w1, fc1, ins[3]), (w2, fc2, ins[5])):
            q, scale = _quantize_experts(w, bits, block)
            qn, sn = f"{name}_q{bits}", f"{name}_q{bits}_scales"
            g.initializer.extend([numpy_helper.from_array(q, qn), numpy_helper.from_array(scale, sn)])
            new_inputs += [qn, sn, bias]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs.update(expert_weight_bits=bits, weights_prepacked=0)
        if block:
            attrs["block_size"] = block
        while not new_inputs[-1]:
            new_inputs.pop()
        qnode = helper.make_node("QMoE", new_inputs, list(node.output), name=node.name, domain="com.microsoft", **attrs)
        g.node.remove(node)
        g.node.insert(idx, qnode)
        done += 1
    return done


def quantize_graph(src: Path, dst: Path, mode: str) -> Quantization:
    """Quantize the float graph `src` to `dst` ("int8" or "int4"); returns what was done."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnx

    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose from {list(MODES)}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such ONNX graph")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    work = tmp.with_suffix(".gemm.onnx")  # src with Gemms rewritten, when it has any
    # The quantizers log advice (pre-processing, etc.) through the root logger; keep it quiet.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    # The int4 quantizer logs every node it skips at INFO through its own handler.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    try:
        model = onnx.load(str(src))
        gemms = gemm_to_matmul(model)
        if gemms:
            onnx.save_model(model, str(work))
        if mode == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            settings = dict(INT8_SETTINGS, gemm_rewritten=gemms)
            quantize_dynamic(
                str(work if gemms else src),
                str(tmp),
                op_types_to_quantize=settings["op_types"],
                per_channel=settings["per_channel"],
                reduce_range=settings["reduce_range"],
                weight_type=QuantType.QInt8,
                # Graphs holding com.microsoft ops fail ORT's shape inference without this.
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
            method = "onnxruntime.quantization.quantize_dynamic"
        else:
            from onnxruntime.quantization import QuantFormat
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                MatMulNBitsQuantizer,
            )

            settings = dict(INT4_SETTINGS, gemm_rewritten=gemms)
            settings["transposed_weights_materialized"] = materialize_transposed_weights(model)
            config = DefaultWeightOnlyQuantConfig(
                block_size=settings["block_size"],
                is_symmetric=settings["symmetric"],
                accuracy_level=settings["accuracy_level"],
                quant_format=QuantFormat.QOperator,
                op_types_to_quantize=tuple(settings["op_types"]),
                bits=settings["bits"],
            )
            quantizer = MatMulNBitsQuantizer(model, algo_config=config)
            quantizer.process()
            q = quantizer.model.model
            if q.ByteSize() >= 2**31 - 2**24:
                raise ValueError(f"{src}: int4 graph over 2 GiB; external data is not supported here")
            onnx.save_model(q, str(tmp))
            method = "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer"
        q = onnx.load(str(tmp))
        moe = MOE_SETTINGS[mode]
        settings["moe_quantized"] = _quantize_moe(q, moe["bits"], moe["block_size"])
        if settings["moe_quantized"]:
            settings["moe_block_size"] = moe["block_size"]
            prune(q)  # the fp32 expert weights the QMoE nodes replaced
            onnx.save_model(q, str(tmp))
        nodes = _count_quantized(tmp)
        if nodes == 0:
            raise ValueError(f"{src}: nothing to quantize (no MatMul with an initializer weight)")
        os.replace(tmp, dst)
    finally:
        root.setLevel(level)
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
    apply: Callable[[Path, Path], Quantization] | None  # (float graph, destination) → record


# The one list of quantization schemes: itera-export's --quantize choices, the default output
# names and what the exporter applies all come from here.
SCHEMES: dict[str, Scheme] = {
    "none": Scheme("none", "fp32 weights as trained", "", None),
    "int8": Scheme("int8", "8-bit weights (dynamic activation quantization; QMoE experts)", "-int8",
                   lambda src, dst: quantize_graph(src, dst, "int8")),
    "int4": Scheme("int4", "4-bit weight blocks (MatMulNBits; QMoE experts)", "-int4",
                   lambda src, dst: quantize_graph(src, dst, "int4")),
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
    for node in fused.graph.node:
        if node.op_type != "QMoE" or node.domain != "com.microsoft":
            continue
        bits = next(a.i for a in node.attribute if a.name == "expert_weight_bits")
        for q_name, s_name in ((node.input[2], node.input[3]), (node.input[5], node.input[6])):
            suffix = f"_q{bits}"
            if q_name.endswith(suffix) and q_name in fused_inits and s_name in fused_inits:
                sources[q_name[: -len(suffix)]] = (q_name, s_name, bits)
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

