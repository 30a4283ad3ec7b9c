"""A bundle's graphs behind two calls: `prefill(ids, state)` and `decode(token, state)`.

The manifest says which inputs a graph takes (SSM state for Itera-Lite, KV cache plus
attention_mask/position_ids for the baseline), so one generate loop serves both families.

State stays inside onnxruntime as OrtValues between calls (IOBinding): the outputs of one
step are bound as the inputs of the next, with no copy of the state through numpy. Only the
logits of the last position come back as a numpy array.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from .bundle import Bundle, BundleError, initial_state

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


def session_options(threads: int | None, optimized_model_path: str | None = None) -> ort.SessionOptions:
    """The one set of onnxruntime session options: what users run is what benchmarks time."""
    threads = check_threads(threads)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = threads
        # Spinning idle threads steal the only other core from the caller on small machines.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0" if threads > 1 else "1")
    if optimized_model_path:
        opts.optimized_model_filepath = str(optimized_model_path)
    opts.log_severity_level = 3
    return opts


def make_session(model: str | os.PathLike | bytes, threads: int | None = None, device: str = "cpu",
                 optimized_model_path: str | None = None) -> ort.InferenceSession:
    """An InferenceSession for a graph file (or serialized bytes) with the project's options."""
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, session_options(threads, optimized_model_path),
                                providers=providers_for(device))


class State:
    """Carried tensors as OrtValues, in manifest order, plus the number of tokens seen."""

    def __init__(self, values: list[ort.OrtValue], position: int = 0):
        self.values = values
        self.position = position

    def numpy(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.values]


class ModelSession:
    """onnxruntime sessions for a bundle's prefill and decode graphs."""

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None):
        self.bundle = bundle
        providers_for(device)  # DeviceError / ValueError before any graph is read
        check_threads(threads)
        self._sessions: dict[str, ort.InferenceSession] = {}
        self.graphs = {}
        for name in ("prefill", "decode"):
            spec = bundle.graph(name)
            if spec.file not in self._sessions:
                try:
                    self._sessions[spec.file] = make_session(spec.file, threads, device)
                except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise BundleError(f"{spec.file}: onnxruntime cannot load this graph ({first[:200]})") from None
            self.graphs[name] = self._sessions[spec.file]
        io = bundle.io
        self.input_ids, self.logits = io["input_ids"], io["logits"]
        self.attention_mask, self.position_ids = io.get("attention_mask"), io.get("position_ids")
        self.state_specs = bundle.state
        self.device = device
        self._ort_device = "cuda" if device == "cuda" else "cpu"

    def initial_state(self) -> State:
        zeros = initial_state(self.bundle, batch=1)
        return State([ort.OrtValue.ortvalue_from_numpy(zeros[s.input]) for s in self.state_specs])

    def _run(self, graph: str, ids: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """Run one graph on ids (1, T); logits (1, T, V) as numpy, new state as OrtValues."""
        sess = self.graphs[graph]
        binding = sess.io_binding()
        T = ids.shape[1]
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
        sess.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return outs[0].numpy(), State(list(outs[1:]), state.position + T)

    def prefill(self, ids, state: State | None = None) -> tuple[np.ndarray, State]:
        """Prompt tokens (T,) or (1, T) -> logits (T, V), state after them."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        if ids.shape[1] == 0:
            raise ValueError("prefill needs at least one token")
        logits, state = self._run("prefill", ids, state or self.initial_state())
        return logits[0], state

    def decode(self, token: int, state: State) -> tuple[np.ndarray, State]:
        """One token -> logits (V,), next state. Leaves `state` usable (for branching, tests)."""
        logits, state = self._run("decode", np.array([[token]], dtype=np.int64), state)
        return logits[0, -1], state

    def decoder(self, state: State) -> "Decoder":
        """The generate loop's fast path: a decoder that continues from (and consumes) `state`."""
        return Decoder(self, state)


class Decoder:
    """Token-by-token decoding with bindings made once.

    The token and logits live in preallocated buffers bound to the graph, so a step is a
    write of one int64, one `run_with_iobinding` and a view of the logits. A fixed-shape
    state (SSM) is double-buffered: two sets of OrtValues and two bindings that read one set
    and write the other, alternating, so no state is allocated or copied per step. A KV
    cache grows every step, so its outputs are rebound each time (onnxruntime allocates).
    The returned logits view is overwritten by the next step.
    """

    def __init__(self, session: ModelSession, state: State):
        self.s = session
        self.sess = session.graphs["decode"]
        vocab = session.bundle.vocab_size or session.bundle.graph("decode").outputs[0].shape[-1]
        self._token = np.zeros((1, 1), dtype=np.int64)
        self._logits = np.zeros((1, 1, int(vocab)), dtype=np.float32)
        self._token_ov = ort.OrtValue.ortvalue_from_numpy(self._token)
        self._logits_ov = ort.OrtValue.ortvalue_from_numpy(self._logits)
        self.position = state.position
        self.values = list(state.values)
        self.fixed = session.bundle.state_kind == "ssm" and not session.attention_mask and not session.position_ids
        if self.fixed:
            other = [ort.OrtValue.ortvalue_from_numpy(np.zeros(v.shape(), dtype=v.numpy().dtype)) for v in self.values]
            self._sets = [self.values, other]
            self._bindings = [self._bind(self._sets[i], self._sets[1 - i]) for i in (0, 1)]
            self._parity = 0
        else:
            self._mask = np.ones((1, 1024), dtype=np.int64)
            self._state_inputs = [spec.input for spec in session.state_specs]
            self._output_names = [session.logits, *(spec.output for spec in session.state_specs)]

    def _bind(self, inputs, outputs) -> ort.IOBinding:
        b = self.sess.io_binding()
        b.bind_ortvalue_input(self.s.input_ids, self._token_ov)
        b.bind_ortvalue_output(self.s.logits, self._logits_ov)
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
        else:
            self._step_growing()
        self.position += 1
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
        self.values = outs[1:]

    @property
    def state(self) -> State:
        return State(list(self.values), self.position)
