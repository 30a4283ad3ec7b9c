"""A bundle's graphs behind two calls: `prefill(ids, state)` and `Decoder.step(token)`.

The manifest says which inputs a graph takes (SSM state for Itera-Lite, KV cache plus
attention_mask/position_ids for the baseline), so one generate loop serves both families.
Before anything runs, the manifest's graphs, io names, state and vocabulary are checked
against what onnxruntime reports for the graphs themselves (`check_manifest_against_graphs`),
so a hand-edited manifest is one clear error at load instead of a traceback mid-run.

State stays inside onnxruntime as OrtValues between calls (IOBinding): the outputs of one
step are bound as the inputs of the next, with no copy of the state through numpy. A
"kv_buffer" state (the baseline's GroupQueryAttention graph) is one preallocated buffer per
tensor, bound as both input and output, that the graph appends to in place.
Prompts are processed in chunks of PREFILL_CHUNK tokens with the state carried, so memory
stays bounded whatever the prompt length; only the logits a caller asks for come back.

With a `retriever` (a bundle with a kNN datastore, `retrieval.py`), each call also reads the
graph's hidden-state output and returns the retrieval-mixed log-probabilities in place of
the logits; without one the hidden output is not bound.

Every onnxruntime session of the project (runtime, bench, export validation, tests) is made
by `make_session` with `session_options`: what users run is what benchmarks time.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort

from . import requires as _requires
from .bundle import KV_BUFFER_AXIS, Bundle, BundleError, TensorSpec, initial_state
from .retrieval import Retriever

# User-facing device names → onnxruntime execution providers.
DEVICES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}

# Names a graph set to run instead of choosing one (`itera-bench` on the portable set of a
# dual bundle, say); `itera-run --graph-set` sets it for one run.
GRAPH_SET_ENV = "ITERA_GRAPH_SET"

# Tokens per prefill call. Bounds the logits (chunk × vocab × 4 bytes) and the attention or
# SSD work of one call, whatever the prompt length.
PREFILL_CHUNK = 512

_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}


class DeviceError(Exception):
    """An execution provider this onnxruntime does not have; one line."""


def providers_for(device: str) -> list[str]:
    """Execution providers for a device name, CPU last as onnxruntime's own fallback."""
    available = ort.get_available_providers()
    provider = DEVICES.get(device)
    if provider is None or provider not in available:
        names = sorted(d for d, p in DEVICES.items() if p in available)
        raise DeviceError(f"device {device!r} is not available in this onnxruntime; available: {', '.join(names)}")
    return [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]


def check_threads(threads: int | None) -> int | None:
    """Validate a user's thread count: None (onnxruntime decides) or 1..CPUs of this machine.

    More intra-op threads than CPUs only makes them wait for each other (1000 threads ran
    4x slower than 1); a benchmark row claiming them would describe a machine we are not on.
    """
    if threads is None:
        return None
    if isinstance(threads, bool) or int(threads) != threads or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    cpus = os.cpu_count() or 1
    if threads > cpus:
        raise ValueError(f"{threads} threads requested but this machine has {cpus} CPUs; use at most {cpus}")
    return int(threads)


# Extra onnxruntime session config entries for every session this process makes:
# "KEY=VALUE;KEY=VALUE" with onnxruntime's own keys ("session.intra_op.allow_spinning=1").
# It lets anyone measure thread-pool settings on their own device with itera-bench; every
# bench row records the settings it ran with (`thread_settings`), this variable included.
ORT_CONFIG_ENV = "ITERA_ORT_CONFIG"
_EXECUTION_MODES = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL, "parallel": ort.ExecutionMode.ORT_PARALLEL}


def _env_config() -> dict[str, str]:
    text = os.environ.get(ORT_CONFIG_ENV, "").strip()
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().startswith("session.") or not value.strip():
            raise ValueError(f"${ORT_CONFIG_ENV}: {item!r} is not KEY=VALUE with an onnxruntime "
                             f"session config key (session.…)")
        out[key.strip()] = value.strip()
    return out


def thread_settings(threads: int | None) -> dict[str, str]:
    """The thread-pool settings a session at `threads` runs with, as bench rows record them.

    Measured on a shared 2-vCPU Xeon (bench/PROFILE.md): at 2 threads, spinning idle threads
    cost 3-4x the CPU per token and ran 8-9x slower there (the spinning thread and the caller
    fight other processes for two cores), so 2-thread sessions sleep between parallel
    sections; dynamic_block_base, force_spinning_stop and worker affinity changed nothing
    beyond the noise. $ITERA_ORT_CONFIG adds or overrides session.* entries.
    """
    threads = check_threads(threads)
    settings = {"execution_mode": "sequential", "inter_op_num_threads": "1"}
    if threads:
        settings["intra_op_num_threads"] = str(threads)
        settings["session.intra_op.allow_spinning"] = "0" if threads > 1 else "1"
    settings.update(_env_config())
    return settings


def session_options(threads: int | None, optimized_model_path: str | None = None,
                    profile_prefix: str | None = None) -> ort.SessionOptions:
    """The one set of onnxruntime session options: what users run is what benchmarks time."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    settings = thread_settings(threads)
    opts.execution_mode = _EXECUTION_MODES[settings["execution_mode"]]
    opts.inter_op_num_threads = int(settings["inter_op_num_threads"])
    if "intra_op_num_threads" in settings:
        opts.intra_op_num_threads = int(settings["intra_op_num_threads"])
    for key, value in settings.items():
        if key.startswith("session."):
            opts.add_session_config_entry(key, value)
    if optimized_model_path:
        opts.optimized_model_filepath = str(optimized_model_path)
    if profile_prefix:  # onnxruntime's own per-node profiler (itera-bench profile)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    opts.log_severity_level = 3
    return opts


def make_session(model: str | os.PathLike | bytes, threads: int | None = None, device: str = "cpu",
                 optimized_model_path: str | None = None, profile_prefix: str | None = None) -> ort.InferenceSession:
    """An InferenceSession for a graph file (or serialized bytes) with the project's options."""
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, session_options(threads, optimized_model_path, profile_prefix),
                                providers=providers_for(device))


# ------------------------------------------------------------------- manifest vs graphs


def _actual(node_arg) -> TensorSpec:
    dims = [d if isinstance(d, int) else (d or "?") for d in node_arg.shape]
    return TensorSpec(node_arg.name, _ORT_DTYPES.get(node_arg.type, node_arg.type), dims)


def _same_shape(declared: list, actual: list) -> bool:
    """Equal rank and equal static dims; a symbolic dim must stay symbolic (names may differ)."""
    if len(declared) != len(actual):
        return False
    return all((isinstance(a, int)) == (isinstance(b, int)) and (not isinstance(a, int) or a == b)
               for a, b in zip(declared, actual))


def pick_graph_set(bundle: Bundle, graph_set: str | None = None) -> str:
    """The graph set to run: `graph_set` (or $ITERA_GRAPH_SET, if the bundle has it), else the first this onnxruntime runs.

    Refuses in one line, before any session is made, when the set asked for (or every set)
    needs contrib ops or a release this onnxruntime lacks.
    """
    m = bundle.manifest
    sets = m.set_requires()
    where = str(bundle.path)
    if graph_set is None and os.environ.get(GRAPH_SET_ENV) in sets:
        # Only bundles that have the set: a bench run may mix dual and baseline bundles.
        graph_set = os.environ[GRAPH_SET_ENV]
    if graph_set is not None:
        if graph_set not in sets:
            raise BundleError(f"{where}: no graph set {graph_set!r} (has: {', '.join(sets)})")
        problems = _requires.check_requires(sets[graph_set])
        if problems:
            raise BundleError(_requires.refusal(where, sets[graph_set], problems))
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
    expected_kind = {"itera": ("ssm",), "baseline": ("kv_cache", "kv_buffer")}[m.family]
    if m.state.kind not in expected_kind:
        raise BundleError(f"{where}: family {m.family!r} carries a {' or '.join(expected_kind)} state, but "
                          f"state.kind is {m.state.kind!r} (manifest edited?)")
    if (m.family == "baseline") != (m.io.attention_mask is not None):
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
            if m.state.kind == "kv_buffer" and a_in.shape[KV_BUFFER_AXIS] != a_out.shape[KV_BUFFER_AXIS]:
                raise BundleError(f"{gwhere}: kv_buffer state {s.input} and {s.output} differ in capacity "
                                  f"({a_in.shape} vs {a_out.shape}); the buffer is written in place")
            feedable.add(s.input)
        unfed = sorted(set(actual_in) - feedable)
        if unfed:
            raise BundleError(f"{gwhere}: graph inputs {unfed} are neither io names nor state (manifest edited?)")
        vocab = actual_out[m.io.logits].shape[-1]
        if isinstance(vocab, int) and vocab != m.vocab_size:
            raise BundleError(f"{gwhere}: logits have {vocab} entries but vocab_size is {m.vocab_size}")


# --------------------------------------------------------------------------- sessions


class State:
    """Carried tensors as OrtValues, in manifest order, plus the number of tokens seen.

    buffers: for a kv_buffer state, the numpy arrays the OrtValues wrap (the graph writes
    into them in place); None otherwise.
    """

    def __init__(self, values: list[ort.OrtValue], position: int = 0, buffers: list[np.ndarray] | None = None):
        self.values = values
        self.position = position
        self.buffers = buffers

    def numpy(self) -> list[np.ndarray]:
        if self.buffers is not None:  # the filled rows only: the rest is unwritten buffer
            return [b[:, :, :self.position].copy() for b in self.buffers]
        return [v.numpy() for v in self.values]

    @property
    def nbytes(self) -> int:
        """Bytes the carried tensors hold right now (what the runtime actually keeps).

        For a kv_buffer, the filled rows: the buffer is an anonymous mapping of its full
        capacity whose pages the OS backs only once the graph writes them.
        """
        if self.buffers is not None:
            return sum(b[:, :, :self.position].nbytes for b in self.buffers)
        return sum(int(np.prod(v.shape())) * np.dtype(_ORT_DTYPES[v.data_type()]).itemsize for v in self.values)


def _unbacked_zeros(shape, dtype) -> np.ndarray:
    """Zeros whose pages the OS backs only once written: a KV buffer of max_seq_len costs what is filled.

    An anonymous private mapping guarantees that; np.zeros does not (glibc's calloc clears
    reused heap memory, which touched every page of the small baseline's 4 MB buffers).
    """
    count = int(np.prod(shape))
    try:
        raw = mmap.mmap(-1, max(count * np.dtype(dtype).itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (AttributeError, TypeError, OSError):  # Windows' mmap takes no flags
        return np.zeros(shape, dtype)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


def _buffer_state(buffers: list[np.ndarray], position: int) -> State:
    return State([ort.OrtValue.ortvalue_from_numpy(b) for b in buffers], position, buffers)


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
        sessions: dict[str, ort.InferenceSession] = {}
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
        # In place: the graph appends to buffers bound as both past and present.
        self.capacity = bundle.manifest.state.capacity
        if self.capacity is not None and device != "cpu":
            raise DeviceError(f"{bundle.path}: this bundle's KV buffer runs on the cpu device only in this runtime")
        self.device, self.threads = device, threads
        self._ort_device = "cuda" if device == "cuda" else "cpu"

    def initial_state(self) -> State:
        if self.capacity is not None:
            shapes = [[1 if d == "batch" else d for d in s.shape] for s in self.state_specs]
            return _buffer_state([_unbacked_zeros(shape, s.dtype) for shape, s in zip(shapes, self.state_specs)], 0)
        zeros = initial_state(self.bundle, batch=1)
        return State([ort.OrtValue.ortvalue_from_numpy(zeros[s.input]) for s in self.state_specs])

    def check_room(self, position: int, tokens: int) -> None:
        """Refuse, in one line, tokens that would not fit a kv_buffer's capacity."""
        if self.capacity is not None and position + tokens > self.capacity:
            raise ValueError(f"{position} + {tokens} tokens exceed this model's KV buffer of {self.capacity} "
                             f"positions (its max_seq_len)")

    def _copy_buffers(self, state: State) -> State:
        """A kv_buffer state whose buffers are new, so that running on it leaves `state` usable."""
        fresh = []
        for b in state.buffers:
            c = _unbacked_zeros(b.shape, b.dtype)
            c[:, :, :state.position] = b[:, :, :state.position]
            fresh.append(c)
        return _buffer_state(fresh, state.position)

    def _run(self, graph: str, ids: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """Run one graph on ids (1, T); logits (1, T, V) as numpy, new state as OrtValues."""
        sess = self.graphs[graph]
        binding = sess.io_binding()
        T = ids.shape[1]
        if self.capacity is not None:
            self.check_room(state.position, T)
            state = self._copy_buffers(state)
            return self._run_in_place(sess, binding, ids, state)
        binding.bind_cpu_input(self.input_ids, ids)
        if self.attention_mask:
            binding.bind_cpu_input(self.attention_mask, np.ones((1, state.position + T), dtype=np.int64))
        if self.position_ids:
            binding.bind_cpu_input(self.position_ids,
                                   np.arange(state.position, state.position + T, dtype=np.int64)[None])
        for spec, value in zip(self.state_specs, state.values):
            binding.bind_ortvalue_input(spec.input, value)
        binding.bind_output(self.logits, "cpu")
        for spec in self.state_specs:
            binding.bind_output(spec.output, self._ort_device)
        if self.hidden:
            binding.bind_output(self.hidden, "cpu")
        sess.run_with_iobinding(binding)
        outs = binding.get_outputs()
        n_state = len(self.state_specs)
        logits = outs[0].numpy()
        if self.hidden:
            logits = self.retriever(logits[0], outs[1 + n_state].numpy()[0])[None]
        return logits, State(list(outs[1:1 + n_state]), state.position + T)

    def _run_in_place(self, sess, binding, ids: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """One call on a kv_buffer state: its buffers are bound as both past and present."""
        T = ids.shape[1]
        binding.bind_cpu_input(self.input_ids, ids)
        binding.bind_cpu_input(self.attention_mask, np.ones((1, state.position + T), dtype=np.int64))
        binding.bind_output(self.logits, "cpu")
        for spec, value in zip(self.state_specs, state.values):
            binding.bind_ortvalue_input(spec.input, value)
            binding.bind_ortvalue_output(spec.output, value)
        sess.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        return logits, State(state.values, state.position + T, state.buffers)

    def forward_chunks(self, ids, state: State | None = None,
                       chunk: int = PREFILL_CHUNK) -> Iterator[tuple[np.ndarray, State]]:
        """Run tokens (T,) through the prefill graph `chunk` at a time, carrying the state.

        Yields (logits (t, V) of the chunk's positions, state after the chunk). Quality
        evaluation reads every chunk's logits; generation keeps only the last row.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("prefill needs at least one token")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        state = state or self.initial_state()
        self.check_room(state.position, ids.size)
        for start in range(0, ids.size, chunk):
            logits, state = self._run("prefill", ids[None, start:start + chunk], state)
            yield logits[0], state

    def prefill(self, ids, state: State | None = None, chunk: int = PREFILL_CHUNK) -> tuple[np.ndarray, State]:
        """Prompt tokens (T,) -> logits (V,) of the last position, state after them."""
        logits = None
        for logits, state in self.forward_chunks(ids, state, chunk):
            pass
        return np.array(logits[-1]), state

    def decode(self, token: int, state: State) -> tuple[np.ndarray, State]:
        """One token -> logits (V,), next state. Leaves `state` usable (for branching, tests)."""
        logits, state = self._run("decode", np.array([[token]], dtype=np.int64), state)
        return logits[0, -1], state

    def decoder(self, state: State) -> Decoder:
        """The generate loop's fast path: a decoder that continues from (and consumes) `state`."""
        return Decoder(self, state)


class Decoder:
    """Token-by-token decoding with bindings made once.

    The token and logits live in preallocated buffers bound to the graph, so a step is a
    write of one int64, one `run_with_iobinding` and a view of the logits. A fixed-shape
    state (SSM) is double-buffered: two sets of OrtValues and two bindings that read one set
    and write the other, alternating, so no state is allocated or copied per step. A KV
    buffer is bound once as both input and output and written in place; only the attention
    mask (one longer each step) is rebound. A KV cache of growing length (older baseline
    bundles) has its outputs rebound each time (onnxruntime allocates).
    The returned logits view is overwritten by the next step.
    """

    def __init__(self, session: ModelSession, state: State):
        self.s = session
        self.sess = session.graphs["decode"]
        self._token = np.zeros((1, 1), dtype=np.int64)
        self._logits = np.zeros((1, 1, session.bundle.vocab_size), dtype=np.float32)
        self._token_ov = ort.OrtValue.ortvalue_from_numpy(self._token)
        self._logits_ov = ort.OrtValue.ortvalue_from_numpy(self._logits)
        if session.hidden:  # the retrieval query, read after every step
            width = next(t.shape[-1] for t in session.bundle.graph("decode", session.graph_set).outputs
                         if t.name == session.hidden)
            self._hidden = np.zeros((1, 1, width), dtype=np.float32)
            self._hidden_ov = ort.OrtValue.ortvalue_from_numpy(self._hidden)
        self.position = state.position
        self.values = list(state.values)
        self.buffers = state.buffers
        self.in_place = session.capacity is not None
        self.fixed = session.bundle.state_kind == "ssm" and not session.attention_mask and not session.position_ids
        if self.fixed:
            other = [ort.OrtValue.ortvalue_from_numpy(np.zeros(v.shape(), dtype=v.numpy().dtype)) for v in self.values]
            self._sets = [self.values, other]
            self._bindings = [self._bind(self._sets[i], self._sets[1 - i]) for i in (0, 1)]
            self._parity = 0
        elif self.in_place:
            self._mask = np.ones((1, session.capacity), dtype=np.int64)
            self._binding = self._bind(self.values, self.values)
        else:
            self._mask = np.ones((1, 1024), dtype=np.int64)
            self._state_inputs = [spec.input for spec in session.state_specs]
            self._output_names = [session.logits, *(spec.output for spec in session.state_specs)]
            if session.hidden:
                self._output_names.append(session.hidden)

    def _bind(self, inputs, outputs) -> ort.IOBinding:
        b = self.sess.io_binding()
        b.bind_ortvalue_input(self.s.input_ids, self._token_ov)
        b.bind_ortvalue_output(self.s.logits, self._logits_ov)
        if self.s.hidden:
            b.bind_ortvalue_output(self.s.hidden, self._hidden_ov)
        for spec, src, dst in zip(self.s.state_specs, inputs, outputs):
            b.bind_ortvalue_input(spec.input, src)
            b.bind_ortvalue_output(spec.output, dst)
        return b

    def step(self, token: int) -> np.ndarray:
        """Feed one token; logits (V,) for the next (a view, valid until the next step)."""
        self._token[0, 0] = token
        if self.fixed:
            self.sess.run_with_iobinding(self._bindings[self._parity])
            self._parity ^= 1
            self.values = self._sets[self._parity]
        elif self.in_place:
            self.s.check_room(self.position, 1)
            total = self.position + 1
            self._binding.bind_ortvalue_input(self.s.attention_mask,
                                              ort.OrtValue.ortvalue_from_numpy(self._mask[:, :total]))
            self.sess.run_with_iobinding(self._binding)
        else:
            self._step_growing()
        self.position += 1
        if self.s.hidden:
            return self.s.retriever(self._logits[0, 0], self._hidden[0, 0])
        return self._logits[0, 0]

    def _step_growing(self) -> None:
        # run_with_ort_values: one call, no IOBinding to build; the KV OrtValues it returns
        # are fed straight back, never copied through numpy.
        s = self.s
        feeds = {s.input_ids: self._token_ov}
        if s.attention_mask:
            total = self.position + 1
            if total > self._mask.shape[1]:
                self._mask = np.ones((1, 2 * total), dtype=np.int64)
            feeds[s.attention_mask] = ort.OrtValue.ortvalue_from_numpy(self._mask[:, :total])
        if s.position_ids:
            feeds[s.position_ids] = ort.OrtValue.ortvalue_from_numpy(np.array([[self.position]], dtype=np.int64))
        feeds.update(zip(self._state_inputs, self.values))
        outs = self.sess.run_with_ort_values(self._output_names, feeds)
        self._logits[...] = outs[0].numpy()
        n_state = len(self.s.state_specs)
        if self.s.hidden:
            self._hidden[...] = outs[1 + n_state].numpy()
        self.values = outs[1:1 + n_state]

    @property
    def state(self) -> State:
        return State(list(self.values), self.position, self.buffers)
