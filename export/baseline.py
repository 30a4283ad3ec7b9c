"""Export the Transformer baseline (LlamaForCausalLM) to one ONNX graph with a KV cache.

optimum's Llama OnnxConfig does the export (task "text-generation-with-past"): one graph serves
prefill (past length 0) and decode. We rename its symbolic dims to the bundle's names and read
the manifest's parts back from the written graph. Validation against torch is
`validate.compare`, the same for both families.

KV layouts (`kv=`; itera-export --graph-set fused / portable):
- "buffer" (default): each layer's attention (RoPE, scores, softmax, the KV append) becomes one
  onnxruntime `com.microsoft::GroupQueryAttention` over a preallocated cache of max_seq_len
  positions that the runtime binds as both past input and present output, as
  onnxruntime-genai's model builder emits. A decode step writes one row per layer in place
  instead of copying the whole cache (optimum's Concat); what still grows with depth is the
  attention's own read of the cache. The manifest's state kind "kv_buffer" tells the runtime
  to run it that way.
- "concat": optimum's graph as it is (past and present of growing length, "kv_cache"):
  standard ops only, for onnxruntime releases whose GroupQueryAttention cannot run it
  (requires.FIRST_VERSION), and to measure against.

Glossary: B batch, S new tokens this call, P past length, T = P + S, V vocab, H kv heads, D head dim.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from itera_runtime.manifest import FUSED, PORTABLE, IoNames, StateSpec, StateTensor

from . import graphfile
from .graph_passes import LOGITS_START, prune, slice_head_input
from .graphfile import ExportedGraphs, graph_spec, save_model

__all__ = ["export_baseline_graphs", "baseline_parts", "use_group_query_attention", "GRAPH_FILE", "KV_LAYOUTS",
           "GQA_OP", "group_query_attention_runs_here"]

GRAPH_FILE = "model.onnx"
KV_LAYOUTS = ("buffer", "concat")
GQA_OP = "com.microsoft::GroupQueryAttention"


def group_query_attention_runs_here() -> bool:
    """True when the installed onnxruntime runs the buffer graph (has the op, at a release that computes it right)."""
    from itera_runtime import requires

    return not requires.check_requires(requires.requires_for({"graph": [GQA_OP]}))

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


def export_baseline_graphs(model, out_dir: Path, opset: int = 18, kv: str = "buffer") -> ExportedGraphs:
    """Export `model.llama` (a Baseline) to out_dir/model.onnx; return what was written.

    kv: "buffer" (GroupQueryAttention over a preallocated cache) or "concat" (optimum's graph).

    Weights stay inside model.onnx below graphfile.SINGLE_FILE_LIMIT and go to
    model.onnx.data above it (protobuf's 2 GiB limit); either way the manifest lists them.
    """
    if kv not in KV_LAYOUTS:
        raise ValueError(f"kv must be one of {', '.join(KV_LAYOUTS)}, got {kv!r}")
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
        _rename_dims(onnx_model)
        if kv == "buffer":
            use_group_query_attention(onnx_model, llama)
        slice_head_input(onnx_model)  # a prompt's head on the positions the caller reads
    finally:
        llama.train(was_training)
    external = GRAPH_FILE + ".data" if onnx_model.ByteSize() >= graphfile.SINGLE_FILE_LIMIT else None
    save_model(onnx_model, out_dir / GRAPH_FILE, external_data=external)
    n_nodes = len(onnx_model.graph.node)
    del onnx_model
    return baseline_parts(out_dir / GRAPH_FILE, opset, n_nodes)


def _rotary_cache_nodes(llama, n_positions: int) -> tuple[list, list]:
    """Nodes computing GroupQueryAttention's cos/sin caches (n_positions, head_dim / 2), and their initializers.

    cos(p · inv_freq) · attention_scaling with the model's own rotary embedding's inv_freq
    and scaling, as LlamaRotaryEmbedding computes it (its halves are repeated; the op's
    non-interleaved rotation is HF's rotate_half). Written as nodes over constants rather
    than as tables: onnxruntime folds them once at load, and the file does not carry
    max_seq_len · head_dim floats (512 KB for tiny, a third of its int4 bundle).
    """
    from onnx import TensorProto, helper, numpy_helper

    rotary = llama.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().float().numpy().reshape(1, -1)  # (1, head_dim / 2)
    inits = [numpy_helper.from_array(inv_freq, "gqa.inv_freq")]

    def scalar(name, value):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor("", TensorProto.FLOAT, [], [value]))

    nodes = [
        scalar("gqa.pos_start", 0.0), scalar("gqa.pos_limit", float(n_positions)), scalar("gqa.pos_delta", 1.0),
        helper.make_node("Range", ["gqa.pos_start", "gqa.pos_limit", "gqa.pos_delta"], ["gqa.pos_range"]),
        helper.make_node("Constant", [], ["gqa.pos_shape"],
                         value=helper.make_tensor("", TensorProto.INT64, [2], [n_positions, 1])),
        helper.make_node("Reshape", ["gqa.pos_range", "gqa.pos_shape"], ["gqa.positions"]),  # (n_positions, 1)
        helper.make_node("Mul", ["gqa.positions", "gqa.inv_freq"], ["gqa.freqs"]),  # (n_positions, head_dim / 2)
        helper.make_node("Cos", ["gqa.freqs"], ["gqa.cos"]),
        helper.make_node("Sin", ["gqa.freqs"], ["gqa.sin"]),
    ]
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if scaling != 1.0:
        inits.append(numpy_helper.from_array(np.array(scaling, dtype=np.float32), "gqa.rope_scaling"))
        nodes += [helper.make_node("Mul", ["gqa.cos", "gqa.rope_scaling"], ["gqa.cos_cache"]),
                  helper.make_node("Mul", ["gqa.sin", "gqa.rope_scaling"], ["gqa.sin_cache"])]
    else:
        nodes += [helper.make_node("Identity", ["gqa.cos"], ["gqa.cos_cache"]),
                  helper.make_node("Identity", ["gqa.sin"], ["gqa.sin_cache"])]
    return nodes, inits


def use_group_query_attention(onnx_model, llama) -> None:
    """Replace each layer's attention in optimum's graph by one GroupQueryAttention over a KV buffer.

    For each layer, the q/k/v projections (optimum's node names, /model/layers.{i}/self_attn/
    {q,k,v}_proj/MatMul) feed the op and its output feeds o_proj; RoPE, the score maths, the
    mask expansion and the Concat of past and new K/V are then dead and pruned, and so is
    position_ids (the op places tokens by seqlens_k). seqlens_k and total_sequence_length come
    from attention_mask, the input the runtime already feeds. The cache inputs and outputs
    become (batch, kv_heads, max_seq_len, head_dim) buffers, the same tensor on both sides.
    """
    from onnx import TensorProto, helper

    cfg = llama.config
    n_layers, n_heads, n_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    capacity = cfg.max_position_embeddings
    g = onnx_model.graph
    rope_nodes, rope_inits = _rotary_cache_nodes(llama, capacity)
    g.initializer.extend(rope_inits)
    mask = "attention_mask"
    shared = [  # seqlens_k = tokens seen - 1 per row; total_sequence_length = mask width (int32)
        helper.make_node("Constant", [], ["gqa.axis1"], value=helper.make_tensor("", TensorProto.INT64, [1], [1])),
        helper.make_node("ReduceSum", [mask, "gqa.axis1"], ["gqa.mask_sum"], keepdims=0),
        helper.make_node("Constant", [], ["gqa.one"], value=helper.make_tensor("", TensorProto.INT64, [], [1])),
        helper.make_node("Sub", ["gqa.mask_sum", "gqa.one"], ["gqa.seqlens_k64"]),
        helper.make_node("Cast", ["gqa.seqlens_k64"], ["gqa.seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", [mask], ["gqa.mask_shape"], start=1, end=2),
        helper.make_node("Squeeze", ["gqa.mask_shape"], ["gqa.total64"]),
        helper.make_node("Cast", ["gqa.total64"], ["gqa.total_sequence_length"], to=TensorProto.INT32),
        *rope_nodes,
    ]
    present = {f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")}
    kept = [n for n in g.node if not set(n.output) & present]  # optimum's Concat(past, new)
    if len(kept) != len(g.node) - len(present):
        raise RuntimeError("optimum's graph does not make each present.* with one node; cannot rewrite its attention")
    del g.node[:]
    g.node.extend(shared + kept)  # copies: look nodes up only now
    nodes = {n.name: n for n in g.node}
    for i in range(n_layers):
        scope = f"/model/layers.{i}/self_attn"
        try:
            q, k, v, o = (nodes[f"{scope}/{p}_proj/MatMul"] for p in ("q", "k", "v", "o"))
        except KeyError as e:
            raise RuntimeError(f"optimum's graph has no node {e.args[0]}; cannot rewrite its attention") from None
        out = f"{scope}/GroupQueryAttention_output_0"
        gqa = helper.make_node(
            "GroupQueryAttention",
            [q.output[0], k.output[0], v.output[0], f"past_key_values.{i}.key", f"past_key_values.{i}.value",
             "gqa.seqlens_k", "gqa.total_sequence_length", "gqa.cos_cache", "gqa.sin_cache"],
            [out, f"present.{i}.key", f"present.{i}.value"],
            name=f"{scope}/GroupQueryAttention", domain="com.microsoft",
            num_heads=n_heads, kv_num_heads=n_kv, do_rotary=1, rotary_interleaved=0,
            scale=float(head_dim) ** -0.5,
        )
        g.node.insert(list(g.node).index(o), gqa)
        o.input[0] = out
    if not any(op.domain == "com.microsoft" for op in onnx_model.opset_import):
        onnx_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    buffer = ["batch", n_kv, capacity, head_dim]
    for vi in [*g.input, *g.output]:
        if vi.name.startswith(("past_key_values.", "present.")):
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in buffer:
                dim = shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                else:
                    dim.dim_param = d
    del g.value_info[:]  # optimum's intermediate shapes (total_sequence caches) no longer hold
    prune(onnx_model)
    used = {x for n in g.node for x in n.input}
    unused = [x for x in g.input if x.name not in used]
    for x in unused:  # position_ids: GroupQueryAttention places tokens by seqlens_k
        g.input.remove(x)


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
    by_name = {t.name: t for t in spec.outputs}
    for t in spec.inputs:
        if not t.name.startswith("past_key_values."):
            continue
        out_name = "present." + t.name[len("past_key_values."):]
        if out_name not in out_names:
            raise RuntimeError(f"{path.name}: no output {out_name!r} for state input {t.name!r}")
        state.append(StateTensor(t.name, out_name, t.dtype, t.shape))
    if not state:
        raise RuntimeError(f"{path.name}: exported graph has no past_key_values inputs")
    # A cache whose past and present have one static shape is a buffer written in place.
    buffer = all(isinstance(s.shape[2], int) and by_name[s.output].shape == s.shape for s in state)
    return ExportedGraphs(
        graphs={"prefill": spec, "decode": spec},
        io=IoNames(input_ids="input_ids", logits="logits", attention_mask="attention_mask",
                   position_ids="position_ids" if "position_ids" in in_names else None,
                   logits_start=LOGITS_START if LOGITS_START in in_names else None),
        state=StateSpec("kv_buffer" if buffer else "kv_cache", state),
        opset=opset,
        graph_set=FUSED if buffer else PORTABLE,
        nodes={"prefill": n_nodes, "decode": n_nodes},
    )
