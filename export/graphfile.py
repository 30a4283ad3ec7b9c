"""ONNX graph files as the exporter writes and reads them, and what a family exporter returns.

One home for: the manifest's view of a graph's inputs and outputs (`tensor_spec`), atomic
saving with an ordinary file mode, the external data files a graph reads, its bytes on
disk, and the full onnx.checker pass every written graph goes through.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from itera_runtime.manifest import FUSED, PORTABLE, GraphSpec, IoNames, StateSpec, TensorSpec

# itera-export --graph-set: one set, both (Itera-Lite: fused preferred, portable as the
# fallback, over one weights file), or auto (the exporter's `_build` says which).
GRAPH_SET_CHOICES = ("auto", FUSED, PORTABLE, "both")
# The values of the option's former name, --lower, in the words of --graph-set.
LOWER_TO_GRAPH_SET = {"auto": "auto", "fused": FUSED, "none": PORTABLE, "dual": "both"}

# protobuf refuses messages over 2 GiB; below that a graph may stay one file.
SINGLE_FILE_LIMIT = 2**31 - 2**24


@dataclass
class ExportedGraphs:
    """What a family exporter wrote into a folder: the manifest's graph-related parts."""

    graphs: dict[str, GraphSpec]
    io: IoNames
    state: StateSpec
    opset: int
    graph_set: str  # FUSED (onnxruntime's contrib kernels) or PORTABLE (standard ops)
    custom_domains: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)

    @property
    def files(self) -> list[str]:
        """Every graph file and external data file, once each."""
        names = {g.file for g in self.graphs.values()}
        names |= {e for g in self.graphs.values() for e in g.external_data}
        return sorted(names)


def tensor_spec(value_info: onnx.ValueInfoProto) -> TensorSpec:
    """The manifest's description of one graph input or output."""
    t = value_info.type.tensor_type
    dims = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in t.shape.dim]
    return TensorSpec(value_info.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims)


def external_data_files(path: Path) -> list[str]:
    """Names of the files a graph's initializers live in (relative to its folder)."""
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc:
                locations.add(loc)
    return sorted(locations)


def graph_spec(path: Path) -> GraphSpec:
    """GraphSpec of a written graph file, read from the file itself (weights not loaded)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    return GraphSpec(file=path.name, inputs=[tensor_spec(v) for v in g.input],
                     outputs=[tensor_spec(v) for v in g.output], external_data=external_data_files(path))


def graph_bytes(path: Path) -> int:
    """Size of an ONNX file plus the external data files it reads."""
    path = Path(path)
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in external_data_files(path))


def public_mode() -> int:
    """rw-r--r-- under the user's umask: the mode a bundle file gets (mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o644 & ~umask


def save_model(model: onnx.ModelProto, path: Path, external_data: str | None = None) -> None:
    """Write `model` to path atomically (temp file + rename) with an ordinary file mode.

    external_data: file name for the initializers (needed past SINGLE_FILE_LIMIT); None
    keeps them inline.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        if external_data:
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=external_data, size_threshold=0)
        else:
            onnx.save_model(model, tmp)
        os.chmod(tmp, public_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_graph(path: Path) -> dict:
    """onnx.checker (full, with shape inference) on a written graph; its node count and size.

    Raises ValueError with the checker's first line.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # checker raises ValidationError / InferenceError
        raise ValueError(f"{Path(path).name}: onnx.checker failed: {str(e).strip().splitlines()[0][:200]}") from None
    model = onnx.load(str(path), load_external_data=False)
    return {"nodes": len(model.graph.node), "functions": len(model.functions), "bytes": Path(path).stat().st_size}


def graph_ops(model: onnx.ModelProto | Path) -> list[str]:
    """"domain::op" of every node onnxruntime must provide a kernel for, sorted.

    A node that sets an attribute only later releases accept is named with it
    ("com.microsoft::QMoE[accuracy_level]", `itera_runtime.requires.node_key`).
    Ops of the standard domain are left out (the opset says what they need), and so are ops
    of a domain the model defines itself as functions (ai.itera: the model carries their
    bodies); bodies of functions and of If/Loop/Scan subgraphs are walked too.
    """
    from itera_runtime.requires import node_key

    from .graph_passes import all_nodes

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    local = {(f.domain, f.name) for f in model.functions}
    nodes = all_nodes(list(model.graph.node) + [n for f in model.functions for n in f.node])
    return sorted({node_key(n.domain, n.op_type, [a.name for a in n.attribute]) for n in nodes
                   if n.domain not in ("", "ai.onnx") and (n.domain, n.op_type) not in local})


def graph_functions(model: onnx.ModelProto | Path) -> list[str]:
    """"domain::name" of the model-local functions the graph calls (ai.itera), sorted.

    onnxruntime inlines them, so what they need is the kernels of their bodies' standard ops:
    not a contrib op to look up, but still a floor (`requires_for(functions=...)`).
    """
    from itera_runtime.requires import op_key

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    local = {(f.domain, f.name) for f in model.functions}
    return sorted({op_key(n.domain, n.op_type) for n in model.graph.node if (n.domain, n.op_type) in local})
