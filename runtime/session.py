"""A bundle's graphs behind two calls: `prefill(ids, state)` and `decoder(state).step(token)`.

The manifest says which inputs a graph takes (SSM state for Itera-Lite, a KV buffer or cache
plus attention_mask/position_ids for the baseline); the state's kind (state.py) binds them,
so one generate loop serves both families. Before anything runs, the manifest is checked
against the graphs themselves (graphcheck.py).

State stays inside onnxruntime as OrtValues between calls (IOBinding), with no copy through
numpy. Prompts are processed in chunks of PREFILL_CHUNK tokens with the state carried, so
memory stays bounded whatever the prompt length; only the logits a caller asks for come back.
With a `retriever` (a bundle with a kNN datastore, `retrieval.py`), each call also reads the
graph's hidden-state output and returns the retrieval-mixed log-probabilities in place of
the logits.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnxruntime as ort

from .bundle import Bundle, BundleError
from .graphcheck import GRAPH_SET_ENV, check_manifest_against_graphs, pick_graph_set
from .options import (
    DEVICES,
    ORT_CONFIG_ENV,
    DeviceError,
    check_threads,
    make_session,
    providers_for,
    session_options,
    thread_settings,
)
from .retrieval import Retriever
from .state import STATE_KINDS, Decoder, State

# What a session is made with (options.py, graphcheck.py, state.py), importable from here too.
__all__ = ["DEVICES", "GRAPH_SET_ENV", "ORT_CONFIG_ENV", "PREFILL_CHUNK", "Decoder", "DeviceError", "ModelSession",
           "State", "check_manifest_against_graphs", "check_threads", "make_session", "pick_graph_set",
           "providers_for", "session_options", "thread_settings"]

# Tokens per prefill call. Bounds the logits (chunk × vocab × 4 bytes) and the attention or
# SSD work of one call, whatever the prompt length.
PREFILL_CHUNK = 512


class ModelSession:
    """onnxruntime sessions for a bundle's prefill and decode graphs, checked against the manifest."""

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None,
                 profile_prefix: str | None = None, graph_set: str | None = None,
                 retriever: Retriever | None = None):
        self.bundle = bundle
        providers_for(device)  # DeviceError / ValueError before any graph is read
        self.settings = thread_settings(threads)  # what bench rows record as ort_settings
        # Which graphs: the fused set when this onnxruntime has its kernels, else the portable one.
        self.graph_set = pick_graph_set(bundle, graph_set)
        sessions: dict = {}  # one session per graph file (prefill and decode may share one)
        self.graphs: dict[str, ort.InferenceSession] = {}
        for name in ("prefill", "decode"):
            path = bundle.graph_path(name, self.graph_set)
            if path not in sessions:
                try:
                    sessions[path] = make_session(path, threads, device, profile_prefix=profile_prefix)
                except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise BundleError(f"{path}: onnxruntime cannot load this graph ({first[:200]})") from None
            self.graphs[name] = sessions[path]
        check_manifest_against_graphs(bundle, self.graphs, self.graph_set)
        io = bundle.io
        self.input_ids, self.logits = io.input_ids, io.logits
        self.attention_mask, self.position_ids = io.attention_mask, io.position_ids
        self.state_specs = bundle.state
        self.retriever, self.hidden = retriever, io.hidden if retriever is not None else None
        if retriever is not None and self.hidden is None:
            raise BundleError(f"{bundle.path}: retrieval needs graphs that output the hidden state (io.hidden)")
        self.device, self.threads = device, threads
        self.ort_device = "cuda" if device == "cuda" else "cpu"
        # Per graph, the feeds that pick which positions' logits it computes ({} before format 2).
        self._positions = {g: {last: bundle.position_feeds(g, self.graph_set, last) for last in (False, True)}
                           for g in self.graphs}
        self.state_kind = STATE_KINDS[bundle.manifest.state.kind](self)

    def position_feeds(self, graph: str, last_only: bool = False) -> dict[str, np.ndarray]:
        """The feeds that make `graph` compute the last position's logits only (`last_only`) or every
        position's: {} for a graph that always computes every position's (Bundle.position_feeds)."""
        return self._positions[graph][last_only]

    def initial_state(self) -> State:
        return self.state_kind.initial()

    def check_room(self, position: int, tokens: int) -> None:
        """Refuse, in one line, tokens that would not fit the state (a kv_buffer's capacity)."""
        self.state_kind.check_room(position, tokens)

    def _run(self, graph: str, ids: np.ndarray, state: State, last_only: bool = False) -> tuple[np.ndarray, State]:
        """Run one graph on ids (1, T); logits (1, T, V) as numpy (1, 1, V) with `last_only` where the
        graph can skip the other positions' head), new state as OrtValues."""
        return self.state_kind.run(self.graphs[graph], ids, state, self.position_feeds(graph, last_only))

    def forward_chunks(self, ids, state: State | None = None, chunk: int = PREFILL_CHUNK,
                       last_only: bool = False) -> Iterator[tuple[np.ndarray, State]]:
        """Run tokens (T,) through the prefill graph `chunk` at a time, carrying the state.

        Yields (logits (t, V) of the chunk's positions, state after the chunk). Quality
        evaluation reads every chunk's logits; generation only the last row, so with `last_only`
        a graph that can (format 2) computes only that row (t = 1).
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("prefill needs at least one token")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        state = state or self.initial_state()
        self.check_room(state.position, ids.size)
        for start in range(0, ids.size, chunk):
            logits, state = self._run("prefill", ids[None, start:start + chunk], state, last_only)
            yield logits[0], state

    def prefill(self, ids, state: State | None = None, chunk: int = PREFILL_CHUNK) -> tuple[np.ndarray, State]:
        """Prompt tokens (T,) -> logits (V,) of the last position, state after them."""
        logits = None
        for logits, state in self.forward_chunks(ids, state, chunk, last_only=True):
            pass
        return np.array(logits[-1]), state

    def decode(self, token: int, state: State) -> tuple[np.ndarray, State]:
        """One token -> logits (V,), next state. Leaves `state` usable (for branching, tests)."""
        logits, state = self._run("decode", np.array([[token]], dtype=np.int64), state)
        return logits[0, -1], state

    def decoder(self, state: State) -> Decoder:
        """The generate loop's fast path: a decoder that continues from (and consumes) `state`."""
        return self.state_kind.decoder(state)
