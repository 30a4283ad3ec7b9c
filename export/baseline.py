"""Export the Transformer baseline (LlamaForCausalLM) to one ONNX graph with a KV cache.

optimum's Llama OnnxConfig does the export (task "text-generation-with-past"): one graph serves
prefill (past length 0) and decode. We only rename its symbolic dims to the bundle's names and
read the manifest's parts back from the written graph. Validation against torch is
`validate.compare`, the same for both families.

Glossary: B batch, S new tokens this call, P past length, T = P + S, V vocab, H kv heads, D head dim.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from itera_runtime.bundle import IoNames, StateSpec, StateTensor

from . import graphfile
from .graphfile import ExportedGraphs, graph_spec, save_model

__all__ = ["export_baseline_graphs", "baseline_parts", "GRAPH_FILE"]

GRAPH_FILE = "model.onnx"

# optimum's dim names -> the bundle's.
_DIM_NAMES = {
    "batch_size": "batch",
    "sequence_length": "seq",
    "past_sequence_length": "past_sequence",
    "past_sequence_length + sequence_length": "total_sequence",
}


def _rename_dims(model) -> None:
    g = model.graph
    for vi in [*g.input, *g.output, *g.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in _DIM_NAMES:
                d.dim_param = _DIM_NAMES[d.dim_param]


def export_baseline_graphs(model, out_dir: Path, opset: int = 18) -> ExportedGraphs:
    """Export `model.llama` (a Baseline) to out_dir/model.onnx; return what was written.

    Weights stay inside model.onnx below graphfile.SINGLE_FILE_LIMIT and go to
    model.onnx.data above it (protobuf's 2 GiB limit); either way the manifest lists them.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnx
    from optimum.exporters.onnx import onnx_export_from_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    llama = model.llama
    was_training = llama.training
    llama.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="itera-optimum-") as tmp:
            # Post-processing (on by default) removes the duplicate tied lm_head initializer;
            # it finds the tie through accelerate, so accelerate must be installed.
            onnx_export_from_model(
                llama,
                tmp,
                opset=opset,
                task="text-generation-with-past",
                device="cpu",
                do_validation=False,  # validate.compare runs the written bundle against torch
            )
            exported = Path(tmp) / GRAPH_FILE
            if not exported.exists():
                raise RuntimeError(f"optimum wrote {sorted(os.listdir(tmp))}, expected {GRAPH_FILE}")
            onnx_model = onnx.load(str(exported))  # pulls in external data, if any
    finally:
        llama.train(was_training)
    _rename_dims(onnx_model)
    external = GRAPH_FILE + ".data" if onnx_model.ByteSize() >= graphfile.SINGLE_FILE_LIMIT else None
    save_model(onnx_model, out_dir / GRAPH_FILE, external_data=external)
    n_nodes = len(onnx_model.graph.node)
    del onnx_model
    return baseline_parts(out_dir / GRAPH_FILE, opset, n_nodes)


def baseline_parts(path: Path, opset: int, n_nodes: int) -> ExportedGraphs:
    """The manifest's parts for a baseline graph, read from the graph itself."""
    spec = graph_spec(path)
    in_names = {t.name for t in spec.inputs}
    out_names = {t.name for t in spec.outputs}
    for required in ("input_ids", "attention_mask"):
        if required not in in_names:
            raise RuntimeError(f"{path.name}: exported graph has no {required!r} input")
    if "logits" not in out_names:
        raise RuntimeError(f"{path.name}: exported graph has no 'logits' output")
    state = []
    for t in spec.inputs:
        if not t.name.startswith("past_key_values."):
            continue
        out_name = "present." + t.name[len("past_key_values."):]
        if out_name not in out_names:
            raise RuntimeError(f"{path.name}: no output {out_name!r} for state input {t.name!r}")
        state.append(StateTensor(t.name, out_name, t.dtype, t.shape))
    if not state:
        raise RuntimeError(f"{path.name}: exported graph has no past_key_values inputs")
    return ExportedGraphs(
        graphs={"prefill": spec, "decode": spec},
        io=IoNames(input_ids="input_ids", logits="logits", attention_mask="attention_mask",
                   position_ids="position_ids" if "position_ids" in in_names else None),
        state=StateSpec("kv_cache", state),
        opset=opset,
        nodes={"prefill": n_nodes, "decode": n_nodes},
    )
