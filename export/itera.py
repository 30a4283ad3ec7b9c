"""Export an Itera-Lite model to two ONNX graphs: `prefill` (model.forward) and `decode` (model.step).

Both graphs take and return the per-layer state explicitly (`past.{i}.conv`, `past.{i}.ssm`
→ `present.{i}.conv`, `present.{i}.ssm`), so a runtime can prefill a prompt and continue
token by token. With `hidden=True` (bundles that carry a retrieval datastore) both graphs also
output `hidden`, the final-norm output that feeds the tied head: the runtime's kNN query.
The model's custom torch ops become `ai.itera` nodes whose decompositions
ship inside each model as functions (`onnx_functions.py`); `lower.py` optionally rewrites
them to onnxruntime's fused contrib kernels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from itera_lite.checkpoint import weights_sha256
from itera_runtime.manifest import FUSED, PORTABLE, IoNames, StateSpec, StateTensor

from . import lower as lowering
from . import tracecache
from .graph_passes import LOGITS_START, name_nodes_by_layer, plain_softplus, prune, slice_head_input
from .graphfile import ExportedGraphs, graph_spec, save_model
from .onnx_functions import DOMAIN, VERSION, itera_functions, translation_table

STATE_KINDS = ("conv", "ssm")
OPSET = 18


def _takes_mask(model) -> bool:
    """A hybrid with attention layers reads how many tokens came before from attention_mask."""
    return "attention" in getattr(model.config, "layer_types", ())


def _unflatten(takes_mask: bool, past: tuple) -> tuple[dict, list]:
    """The wrappers' positional inputs after input_ids: the attention mask (if the model takes one),
    then each layer's two state tensors; as the model's keyword and state list."""
    mask = {}
    if takes_mask:
        mask["attention_mask"], past = past[0], past[1:]
    return mask, [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]


class _Prefill(nn.Module):
    """model.forward with the state list flattened into positional tensors (after attention_mask, if any),
    returning logits, the new state and `hidden`."""

    def __init__(self, model):
        super().__init__()
        self.model, self.mask = model, _takes_mask(model)

    def forward(self, input_ids, *past):
        mask, state = _unflatten(self.mask, past)
        out = self.model(input_ids, state, **mask)
        return (out.logits, *[t for layer in out.state for t in layer], out.hidden)


class _Decode(nn.Module):
    """model.step on a (batch, 1) token, returning (batch, 1, vocab) logits, the new state and `hidden`."""

    def __init__(self, model):
        super().__init__()
        self.model, self.mask = model, _takes_mask(model)

    def forward(self, input_ids, *past):
        mask, state = _unflatten(self.mask, past)
        logits, new_state, hidden = self.model.step(input_ids.reshape(-1), state, return_hidden=True, **mask)
        # reshape, not [:, None]: it folds into the step's own (B, 1, V) -> (B, V) and drops out
        return (logits.reshape(-1, 1, logits.shape[-1]), *[t for layer in new_state for t in layer],
                hidden.reshape(-1, 1, hidden.shape[-1]))


HIDDEN = "hidden"
MASK = "attention_mask"


def _state_names(model) -> list[tuple[str, str]]:
    """Per layer, its two state tensors' names: (conv, ssm), or (key, value) for a hybrid's attention."""
    if hasattr(model, "state_names"):
        return model.state_names()
    return [STATE_KINDS] * model.config.n_layers


def _io_names(model) -> tuple[list[str], list[str]]:
    names = _state_names(model)
    past = [f"past.{i}.{k}" for i, layer in enumerate(names) for k in layer]
    present = [f"present.{i}.{k}" for i, layer in enumerate(names) for k in layer]
    mask = [MASK] if _takes_mask(model) else []
    return ["input_ids", *mask, *past], ["logits", *present, HIDDEN]


def _trace(wrapper: nn.Module, tokens: torch.Tensor, state, dynamic_tokens: dict, opset: int) -> onnx.ModelProto:
    batch = torch.export.Dim("batch")
    dyn_tokens = {k: (batch if v == "batch" else torch.export.Dim(v)) for k, v in dynamic_tokens.items()}
    flat = [t for layer in state for t in layer]
    names_in, names_out = _io_names(wrapper.model)
    mask, dyn_mask = (), ()
    if wrapper.mask:  # two tokens already in the buffer: the traced S differs from T
        mask = (torch.ones(tokens.shape[0], tokens.shape[1] + 2, dtype=torch.long),)
        dyn_mask = ({0: batch, 1: torch.export.Dim("total_sequence")},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            wrapper, (tokens, *mask, *flat), dynamo=True, opset_version=opset,
            custom_translation_table=translation_table(),
            input_names=names_in, output_names=names_out,
            dynamic_shapes=(dyn_tokens, (*dyn_mask, *({0: batch} for _ in flat))),
            verbose=False,
        )
    return prog.model_proto


def _attach_functions(model: onnx.ModelProto, functions: list[onnx.FunctionProto]) -> None:
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    del model.functions[:]
    model.functions.extend(f for f in functions if f.name in used)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, VERSION))


def _fingerprint(model, opset: int) -> tuple:
    return (type(model).__qualname__, repr(model.config), opset, weights_sha256(model))


def _trace_both(model, opset: int) -> dict[str, bytes]:
    was_training = model.training
    model.eval()
    try:
        state = model.allocate_state(2)
        with torch.no_grad():
            prefill = _trace(_Prefill(model), torch.zeros(2, 7, dtype=torch.long), state,
                             {0: "batch", 1: "seq"}, opset)
            decode = _trace(_Decode(model), torch.zeros(2, 1, dtype=torch.long), state, {0: "batch"}, opset)
    finally:
        model.train(was_training)
    functions = itera_functions(model.config, opset)
    for m in (prefill, decode):
        _attach_functions(m, functions)
    return {"prefill": prefill.SerializeToString(), "decode": decode.SerializeToString()}


def _function_graphs(model, opset: int) -> dict[str, bytes]:
    """Serialized function-path prefill and decode graphs, with the `hidden` output (drop_hidden
    removes it for bundles without a datastore: one trace serves both kinds of bundle).

    Tracing takes tens of seconds, so a model's graphs are kept per (weights, config, opset)
    (tracecache.py): exporting one model both ways, or again after another model (as the bench
    and the tests do), traces it once.
    """
    return tracecache.kept(_fingerprint(model, opset), ("prefill", "decode"), lambda: _trace_both(model, opset))


def drop_hidden(model: onnx.ModelProto) -> None:
    """Remove the `hidden` graph output (the nodes only it used go with the next prune)."""
    outputs = [o for o in model.graph.output if o.name != HIDDEN]
    del model.graph.output[:]
    model.graph.output.extend(outputs)


def _custom_domains(models) -> dict[str, int]:
    return {o.domain: o.version for m in models for o in m.opset_import if o.domain not in ("", "ai.onnx")}


def trace_ahead(model, opset: int = OPSET) -> None:
    """Trace `model` now (into the trace folder, if one is set) so a later export only reads it."""
    _function_graphs(model, opset)


def export_itera_graphs(model, out_dir: Path, graph_set: str = "auto", opset: int = OPSET,
                        suffix: str = "", fused_weights: bool = False, hidden: bool = False) -> ExportedGraphs:
    """Write prefill{suffix}.onnx and decode{suffix}.onnx for an IteraLite into out_dir; return what was written.

    graph_set: "portable" keeps the ai.itera functions (standard ops), "fused" rewrites them to
    onnxruntime's contrib kernels, "auto" picks fused when the installed onnxruntime has them
    (faster decode: `itera-bench step` times both).
    fused_weights: a portable graph reads its expert weights in the fused layout, so it shares
    them with fused graphs in one weights file (bundles with both sets).
    hidden: also output the head's input (`hidden`), for bundles with a retrieval datastore.
    """
    if graph_set not in ("auto", FUSED, PORTABLE):
        raise ValueError(f"graph_set must be 'auto', 'fused' or 'portable', not {graph_set!r}")
    if graph_set == "auto":
        graph_set = FUSED if lowering.fused_ops_available() else PORTABLE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    graphs = {k: onnx.ModelProto.FromString(v) for k, v in _function_graphs(model, opset).items()}
    for m in graphs.values():
        if not hidden:
            drop_hidden(m)
        if graph_set == FUSED:
            lowering.lower_to_fused(m)
        elif fused_weights:
            lowering.read_fused_moe_weights(m)
        plain_softplus(m)  # the dt softplus: 2 nodes a layer fewer (bench/PROFILE.md)
        prune(m)
    slice_head_input(graphs["prefill"])  # a prompt's head on the positions the caller reads
    for m in graphs.values():
        name_nodes_by_layer(m)

    specs, nodes = {}, {}
    for name, m in graphs.items():
        save_model(m, out_dir / f"{name}{suffix}.onnx")
        specs[name] = graph_spec(out_dir / f"{name}{suffix}.onnx")
        nodes[name] = len(m.graph.node)

    hybrid = cfg.family == "hybrid"
    tensors = [StateTensor(f"past.{i}.{kind}", f"present.{i}.{kind}", "float32", ["batch", *shape[1:]],
                           kind=kind if hybrid else None)
               for i, (blk, names) in enumerate(zip(model.blocks, _state_names(model)))
               for kind, shape in zip(names, blk.mixer.state_shapes(1))]
    return ExportedGraphs(
        graphs=specs,
        io=IoNames(input_ids="input_ids", logits="logits", hidden=HIDDEN if hidden else None,
                   attention_mask=MASK if _takes_mask(model) else None, logits_start=LOGITS_START),
        state=StateSpec("hybrid" if hybrid else "ssm", tensors),
        opset=opset,
        graph_set=graph_set,
        custom_domains=_custom_domains(graphs.values()),
        nodes=nodes,
    )
