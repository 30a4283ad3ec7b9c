"""One copy of the weights for all of a bundle's graphs.

Itera-Lite bundles hold two graphs (prefill traced from `forward`, decode from `step`) over
the same parameters; stored inline, every weight would be on disk twice. This moves each
graph's large initializers into one external-data file, each distinct tensor once (matched
by dtype, shape and content, since the two traces name them differently), and points both
graphs at it. onnxruntime reads external data relative to the graph's folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
from onnx import numpy_helper

WEIGHTS_FILE = "weights.bin"
_ALIGN = 4096  # page-aligned tensors, so a runtime may map them


def gemm_to_matmul(model) -> int:
    """Rewrite Gemm(x, W) with an initializer W as MatMul(x, W or W.T) (+ Add bias).

    A one-token decode graph traces Linear on 2-D activations as Gemm (weight as stored,
    transB=1) where the prefill graph has MatMul with the transposed weight. Rewriting makes
    the two graphs hold byte-identical weights (so they can share one copy) and lets the
    quantizers, which take MatMul only, treat the decode graph like the prefill graph.
    """
    from onnx import helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    done = 0
    for i, node in enumerate(list(g.node)):
        if node.op_type != "Gemm" or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        name = node.input[1] + ("_T" if attrs.get("transB", 0) else "")
        if name not in inits:
            g.initializer.append(numpy_helper.from_array((w.T if attrs.get("transB", 0) else w).copy(), name))
            inits[name] = g.initializer[-1]
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_mm" if has_bias else node.output[0]
        new = [helper.make_node("MatMul", [node.input[0], name], [mm_out], name=node.name + "_matmul")]
        if has_bias:
            new.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_bias"))
        pos = list(g.node).index(node)
        g.node.remove(node)
        for k, n in enumerate(new):
            g.node.insert(pos + k, n)
        done += 1
    used = {x for n in g.node for x in n.input}
    for t in [t for t in g.initializer if t.name not in used and t.name not in {o.name for o in g.output}]:
        g.initializer.remove(t)
    return done


def share_weights(folder: Path, graph_files: list[str], min_bytes: int = 1024) -> dict:
    """Externalise initializers ≥ min_bytes of the graphs into WEIGHTS_FILE, deduplicated."""
    folder = Path(folder)
    models = {f: onnx.load(str(folder / f)) for f in graph_files}
    for model in models.values():
        gemm_to_matmul(model)
    placed: dict[tuple, tuple[int, int]] = {}
    inline = shared = 0
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    with open(tmp, "wb") as out:
        for model in models.values():
            for t in model.graph.initializer:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    continue
                raw = numpy_helper.to_array(t).tobytes()
                if len(raw) < min_bytes:
                    continue
                inline += len(raw)
                key = (t.data_type, tuple(t.dims), hashlib.sha256(raw).hexdigest())
                if key not in placed:
                    offset = -out.tell() % _ALIGN + out.tell()
                    out.seek(offset)
                    out.write(raw)
                    placed[key] = (offset, len(raw))
                    shared += len(raw)
                offset, length = placed[key]
                name, dims, dtype = t.name, list(t.dims), t.data_type
                t.Clear()
                t.name, t.data_type = name, dtype
                t.dims.extend(dims)
                t.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
    os.replace(tmp, folder / WEIGHTS_FILE)
    for f, model in models.items():
        path = folder / f
        part = path.with_name(f".{path.name}.tmp")
        onnx.save_model(model, str(part))
        os.replace(part, path)
    return {"file": WEIGHTS_FILE, "tensors": len(placed), "bytes": shared, "bytes_if_inline": inline}
