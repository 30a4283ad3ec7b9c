"""Which graph set of a bundle runs here, and the manifest checked against its graphs.

The graphs are pinned by hashes; the manifest's own fields (state shapes and dtypes, io
names, vocab_size, family) are not, so a hand-edited manifest is one clear error at load
instead of a traceback mid-run.
"""

from __future__ import annotations

import onnxruntime as ort

from . import requires as _requires
from .bundle import Bundle, BundleError, TensorSpec
from .state import ORT_DTYPES, STATE_KINDS

# The environment variable the console scripts read for a graph set to run (where a bundle has
# it) instead of the one this onnxruntime picks; the library itself takes the set as a value.
GRAPH_SET_ENV = "ITERA_GRAPH_SET"


def _actual(node_arg) -> TensorSpec:
    dims = [d if isinstance(d, int) else (d or "?") for d in node_arg.shape]
    return TensorSpec(node_arg.name, ORT_DTYPES.get(node_arg.type, node_arg.type), dims)


def _same_shape(declared: list, actual: list) -> bool:
    """Equal rank and equal static dims; a symbolic dim must stay symbolic (names may differ)."""
    if len(declared) != len(actual):
        return False
    return all((isinstance(a, int)) == (isinstance(b, int)) and (not isinstance(a, int) or a == b)
               for a, b in zip(declared, actual))


def pick_graph_set(bundle: Bundle, graph_set: str | None = None) -> str:
    """The graph set to run: `graph_set`, else the first this onnxruntime runs.

    Refuses in one line, before any session is made, when the set asked for (or every set)
    needs contrib ops or a release this onnxruntime lacks.
    """
    sets = bundle.manifest.set_requires()
    where = str(bundle.path)
    if graph_set is not None:
        if graph_set not in sets:
            raise BundleError(f"{where}: no graph set {graph_set!r} (has: {', '.join(sets)})")
        missing = _requires.check_requires(sets[graph_set])
        if missing:
            raise BundleError(_requires.refusal(where, sets[graph_set], missing))
        return graph_set
    chosen, problems = _requires.choose_graph_set(sets)
    if chosen is None:
        first = next(iter(sets))
        raise BundleError(_requires.refusal(where, sets[first], problems[first], alternatives=list(sets)[1:]))
    return chosen


def check_manifest_against_graphs(bundle: Bundle, sessions: dict[str, ort.InferenceSession],
                                  graph_set: str | None = None) -> None:
    """Refuse, in one line, a manifest that does not describe its graphs.

    The graphs are pinned by hashes; the manifest's own fields (state shapes and dtypes, io
    names, vocab_size, family) are not, so they are checked against what onnxruntime reads
    from the graphs before any token runs.
    """
    m = bundle.manifest
    where = str(bundle.manifest_path)
    state_kind = STATE_KINDS.get(m.state.kind)
    expected_kind = tuple(name for name, k in STATE_KINDS.items() if m.family in k.families)
    if state_kind is None or m.family not in state_kind.families:
        raise BundleError(f"{where}: family {m.family!r} carries a {' or '.join(expected_kind)} state, but "
                          f"state.kind is {m.state.kind!r} (manifest edited?)")
    # a baseline's graph reads attention_mask, an Itera-Lite's never, a hybrid's when it has KV buffers
    takes_mask = any(t.is_kv_buffer for t in m.state.tensors) if m.family == "hybrid" else m.family == "baseline"
    if takes_mask != (m.io.attention_mask is not None):
        raise BundleError(f"{where}: family {m.family!r} does not match the io names "
                          f"(attention_mask {m.io.attention_mask!r})")
    for gname, sess in sessions.items():
        spec = bundle.graph(gname, graph_set)
        gwhere = f"{where}: graphs.{gname} ({spec.file})"
        actual_in = {a.name: _actual(a) for a in sess.get_inputs()}
        actual_out = {a.name: _actual(a) for a in sess.get_outputs()}
        for declared, actual, kind in ((spec.inputs, actual_in, "inputs"), (spec.outputs, actual_out, "outputs")):
            names = [t.name for t in declared]
            if sorted(names) != sorted(actual):
                raise BundleError(f"{gwhere}: manifest declares {kind} {sorted(names)} but the graph has "
                                  f"{sorted(actual)}")
            for t in declared:
                a = actual[t.name]
                if t.dtype != a.dtype or not _same_shape(t.shape, a.shape):
                    raise BundleError(f"{gwhere}: {t.name} is declared {t.dtype}{t.shape} but the graph has "
                                      f"{a.dtype}{a.shape}")
        feedable = {m.io.input_ids}
        for key in ("input_ids", "attention_mask", "position_ids"):
            name = getattr(m.io, key)
            if name is not None and name not in actual_in:
                raise BundleError(f"{gwhere}: io.{key} names {name!r}, which is not an input of the graph")
            feedable.add(name)
        start = m.io.logits_start  # the prompt graph's; a decode graph may take it too (a baseline's one graph)
        if start is not None and (start in actual_in or gname == "prefill"):
            if actual_in.get(start) != TensorSpec(start, "int64", [1]):
                raise BundleError(f"{gwhere}: io.logits_start names {start!r}, which is not an int64 [1] input "
                                  f"of the graph")
            feedable.add(start)
        if m.io.logits not in actual_out:
            raise BundleError(f"{gwhere}: io.logits names {m.io.logits!r}, which is not an output of the graph")
        for s in m.state.tensors:
            a_in, a_out = actual_in.get(s.input), actual_out.get(s.output)
            if a_in is None or a_out is None:
                raise BundleError(f"{gwhere}: state {s.input} → {s.output} is not an input/output pair of the graph")
            for a in (a_in, a_out):
                if s.dtype != a.dtype or len(s.shape) != len(a.shape) or any(
                        isinstance(d, int) and d != ad for d, ad in zip(s.shape, a.shape)):
                    raise BundleError(f"{gwhere}: state {s.input} is declared {s.dtype}{s.shape} but the graph "
                                      f"has {a.dtype}{a.shape}")
            state_kind.check_graph(gwhere, f"{s.input} → {s.output}", a_in.shape, a_out.shape)
            feedable.add(s.input)
        unfed = sorted(set(actual_in) - feedable)
        if unfed:
            raise BundleError(f"{gwhere}: graph inputs {unfed} are neither io names nor state (manifest edited?)")
        vocab = actual_out[m.io.logits].shape[-1]
        if isinstance(vocab, int) and vocab != m.vocab_size:
            raise BundleError(f"{gwhere}: logits have {vocab} entries but vocab_size is {m.vocab_size}")
