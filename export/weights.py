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

from .graph_passes import gemm_to_matmul
from .graphfile import public_mode, save_model

WEIGHTS_FILE = "weights.bin"
_ALIGN = 4096  # page-aligned tensors, so a runtime may map them


def share_weights(folder: Path, graph_files: list[str], min_bytes: int = 1024) -> dict:
    """Externalise initializers ≥ min_bytes of the graphs into WEIGHTS_FILE, deduplicated."""
    folder = Path(folder)
    models = {f: onnx.load(str(folder / f)) for f in graph_files}
    for model in models.values():
        gemm_to_matmul(model)
    placed: dict[tuple, tuple[int, int]] = {}
    inline = shared = 0
    tmp = folder / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
    with open(tmp, "wb") as out:
        for model in models.values():
            for t in model.graph.initializer:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    continue
                raw = numpy_helper.to_array(t).tobytes()
                if len(raw) < min_bytes:
                    continue
                inline += len(raw)
                # Content, not shape: the fused graphs of a dual bundle read some portable
                # weights reshaped (conv kernels (C, K) vs (C, 1, K)); each tensor keeps its dims.
                key = (t.data_type, hashlib.sha256(raw).hexdigest())
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
    os.chmod(tmp, public_mode())
    os.replace(tmp, folder / WEIGHTS_FILE)
    for f, model in models.items():
        save_model(model, folder / f)
    return {"file": WEIGHTS_FILE, "tensors": len(placed), "bytes": shared, "bytes_if_inline": inline}
