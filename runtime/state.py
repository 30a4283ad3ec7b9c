"""Carried state: one small class per kind (ssm, kv_buffer, kv_cache, hybrid), and the decode loops they bind.

A kind says how its tensors start, how one graph call carries them (`run`), which graph
shapes it accepts, and which `Decoder` binds them for the token-by-token loop. The session
holds one kind and never branches on its name; a new kind (a hybrid's per-layer mix) is a
new subclass in `STATE_KINDS`.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnxruntime as ort

from .bundle import KV_BUFFER_AXIS, BundleError, initial_state
from .bundle import STATE_KINDS as MANIFEST_STATE_KINDS
from .options import DeviceError

if TYPE_CHECKING:
    from .session import ModelSession

ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}


class State:
    """Carried tensors as OrtValues, in manifest order, plus the number of tokens seen.

    buffers: for a kv_buffer state, the numpy arrays the OrtValues wrap (the graph writes
    into them in place); None otherwise. A hybrid state has None for its SSM tensors' entries.
    """

    def __init__(self, values: list[ort.OrtValue], position: int = 0,
                 buffers: list[np.ndarray | None] | None = None):
        self.values = values
        self.position = position
        self.buffers = buffers

    def numpy(self) -> list[np.ndarray]:
        if self.buffers is not None:  # a buffer's filled rows only: the rest is unwritten buffer
            return [v.numpy() if b is None else b[:, :, :self.position].copy()
                    for v, b in zip(self.values, self.buffers)]
        return [v.numpy() for v in self.values]

    @property
    def nbytes(self) -> int:
        """Bytes the carried tensors hold right now (what the runtime actually keeps).

        For a kv_buffer, the filled rows: the buffer is an anonymous mapping of its full
        capacity whose pages the OS backs only once the graph writes them.
        """
        buffers = self.buffers or [None] * len(self.values)
        return sum(int(np.prod(v.shape())) * np.dtype(ORT_DTYPES[v.data_type()]).itemsize if b is None
                   else b[:, :, :self.position].nbytes for v, b in zip(self.values, buffers))


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


# --------------------------------------------------------------------------- kinds


class StateKind:
    """How one kind of carried state starts, is carried through a graph call, and is decoded."""

    name: ClassVar[str]
    families: ClassVar[tuple[str, ...]]  # the model families whose graphs carry this kind

    def __init__(self, session: ModelSession):
        self.s = session

    def initial(self) -> State:
        zeros = initial_state(self.s.bundle, batch=1)
        return State([ort.OrtValue.ortvalue_from_numpy(zeros[spec.input]) for spec in self.s.state_specs])

    def check_room(self, position: int, tokens: int) -> None:
        """Refuse tokens that would not fit (only a fixed-capacity kind has a limit)."""

    @staticmethod
    def check_graph(where: str, name: str, past: list, present: list) -> None:
        """Refuse graph state shapes this kind cannot carry (past/present: the graph's dims)."""

    def _bind_tokens(self, binding: ort.IOBinding, ids: np.ndarray, position: int, positions: dict) -> None:
        """The inputs every graph call binds besides the state: ids (1, T), the attention mask and
        position ids where the graph takes them, and `positions` (which positions' logits)."""
        s = self.s
        T = ids.shape[1]
        binding.bind_cpu_input(s.input_ids, ids)
        if s.attention_mask:
            binding.bind_cpu_input(s.attention_mask, np.ones((1, position + T), dtype=np.int64))
        if s.position_ids:
            binding.bind_cpu_input(s.position_ids, np.arange(position, position + T, dtype=np.int64)[None])
        for name, value in positions.items():
            binding.bind_cpu_input(name, value)

    def run(self, sess: ort.InferenceSession, ids: np.ndarray, state: State,
            positions: dict) -> tuple[np.ndarray, State]:
        """One graph call on ids (1, T); logits (1, T, V) as numpy (fewer rows where `positions`,
        ModelSession's feeds of io.logits_start, says so), the new state as OrtValues."""
        s = self.s
        binding = sess.io_binding()
        T = ids.shape[1]
        self._bind_tokens(binding, ids, state.position, positions)
        for spec, value in zip(s.state_specs, state.values):
            binding.bind_ortvalue_input(spec.input, value)
        binding.bind_output(s.logits, "cpu")
        for spec in s.state_specs:
            binding.bind_output(spec.output, s.ort_device)
        if s.hidden:
            binding.bind_output(s.hidden, "cpu")
        sess.run_with_iobinding(binding)
        outs = binding.get_outputs()
        n_state = len(s.state_specs)
        logits = outs[0].numpy()
        if s.hidden:
            logits = s.retriever(logits[0], outs[1 + n_state].numpy()[0])[None]
        return logits, State(list(outs[1:1 + n_state]), state.position + T)

    def decoder(self, state: State) -> Decoder:
        return GrowingDecoder(self.s, state)

    def snapshot(self, state: State) -> State:
        """`state` as it is now, still valid after a decoder has run on it.

        Graph calls and the growing decoder return new OrtValues and never write their inputs,
        so a view is enough here; kinds whose decoder writes in place override this.
        """
        return State(list(state.values), state.position, state.buffers)

    def from_arrays(self, arrays: list[np.ndarray], position: int) -> State:
        """A state from numpy arrays in manifest order (what `State.numpy()` gave), batch 1."""
        return State([ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in arrays], position)


class SsmState(StateKind):
    """Itera-Lite's conv and SSM state per layer: a fixed shape, whatever the position."""

    name = "ssm"
    families = ("itera",)

    def decoder(self, state: State) -> Decoder:
        if self.s.attention_mask or self.s.position_ids:
            return GrowingDecoder(self.s, state)
        return DoubleBufferedDecoder(self.s, state)

    def snapshot(self, state: State) -> State:
        # The double-buffered decoder writes its input set from the second step on: copy.
        return self.from_arrays([v.numpy().copy() for v in state.values], state.position)


class KvCacheState(StateKind):
    """Past keys and values that grow by one position per token (older baseline bundles)."""

    name = "kv_cache"
    families = ("baseline",)


class KvBufferState(StateKind):
    """Keys and values in a preallocated buffer of max_seq_len positions, written in place."""

    name = "kv_buffer"
    families = ("baseline",)

    def __init__(self, session: ModelSession):
        super().__init__(session)
        self.capacity = int(session.bundle.manifest.state.capacity)
        if session.device != "cpu":
            raise DeviceError(f"{session.bundle.path}: this bundle's KV buffer runs on the cpu device only "
                              f"in this runtime")

    def initial(self) -> State:
        shapes = [[1 if d == "batch" else d for d in spec.shape] for spec in self.s.state_specs]
        return _buffer_state([_unbacked_zeros(shape, spec.dtype) for shape, spec in zip(shapes, self.s.state_specs)], 0)

    def check_room(self, position: int, tokens: int) -> None:
        if position + tokens > self.capacity:
            raise ValueError(f"{position} + {tokens} tokens exceed this model's KV buffer of {self.capacity} "
                             f"positions (its max_seq_len)")

    @staticmethod
    def check_graph(where: str, name: str, past: list, present: list) -> None:
        if past[KV_BUFFER_AXIS] != present[KV_BUFFER_AXIS]:
            raise BundleError(f"{where}: kv_buffer state {name} differs in capacity between input and output "
                              f"({past} vs {present}); the buffer is written in place")

    def snapshot(self, state: State) -> State:
        # The in-place decoder writes rows at and after the position only: rows before it,
        # which are all this state reads, stay as they are, so a view is enough.
        return State(list(state.values), state.position, state.buffers)

    def from_arrays(self, arrays: list[np.ndarray], position: int) -> State:
        """The filled rows (what `State.numpy()` gave) written into buffers of full capacity."""
        self.check_room(0, position)
        fresh = []
        for a, spec in zip(arrays, self.s.state_specs):
            shape = [1 if d == "batch" else d for d in spec.shape]
            b = _unbacked_zeros(shape, spec.dtype)
            b[:, :, :position] = a
            fresh.append(b)
        return _buffer_state(fresh, position)

    def _copy(self, state: State) -> State:
        """New buffers holding `state`'s rows, so that running on them leaves `state` usable."""
        fresh = []
        for b in state.buffers:
            c = _unbacked_zeros(b.shape, b.dtype)
            c[:, :, :state.position] = b[:, :, :state.position]
            fresh.append(c)
        return _buffer_state(fresh, state.position)

    def run(self, sess: ort.InferenceSession, ids: np.ndarray, state: State,
            positions: dict) -> tuple[np.ndarray, State]:
        s = self.s
        T = ids.shape[1]
        self.check_room(state.position, T)
        state = self._copy(state)
        binding = sess.io_binding()
        self._bind_tokens(binding, ids, state.position, positions)
        binding.bind_output(s.logits, "cpu")
        for spec, value in zip(s.state_specs, state.values):  # bound as both past and present
            binding.bind_ortvalue_input(spec.input, value)
            binding.bind_ortvalue_output(spec.output, value)
        sess.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        return logits, State(state.values, state.position + T, state.buffers)

    def decoder(self, state: State) -> Decoder:
        return InPlaceDecoder(self.s, state)


class HybridState(StateKind):
    """A hybrid's per-layer mix: (conv, ssm) tensors of fixed shape, and KV buffers written in place.

    The SSM tensors are carried as SsmState carries them (new outputs per call; double-buffered
    when decoding), the KV buffers as KvBufferState carries them (bound as both input and output).
    """

    name = "hybrid"
    families = ("hybrid",)

    def __init__(self, session: ModelSession):
        super().__init__(session)
        self.kv = [spec.is_kv_buffer for spec in session.state_specs]
        self.capacity = session.bundle.manifest.state.capacity  # None: no attention layer
        if any(self.kv) and session.device != "cpu":
            raise DeviceError(f"{session.bundle.path}: this bundle's KV buffers run on the cpu device only "
                              f"in this runtime")

    def _shape(self, spec) -> list[int]:
        return [1 if d == "batch" else int(d) for d in spec.shape]

    def _state(self, arrays: list[np.ndarray], position: int) -> State:
        return State([ort.OrtValue.ortvalue_from_numpy(a) for a in arrays], position,
                     [a if kv else None for a, kv in zip(arrays, self.kv)])

    def _buffer(self, spec, rows: np.ndarray | None = None) -> np.ndarray:
        b = _unbacked_zeros(self._shape(spec), spec.dtype)
        if rows is not None:
            b[:, :, :rows.shape[KV_BUFFER_AXIS]] = rows
        return b

    def initial(self) -> State:
        return self._state([self._buffer(spec) if kv else np.zeros(self._shape(spec), dtype=spec.dtype)
                            for spec, kv in zip(self.s.state_specs, self.kv)], 0)

    def check_room(self, position: int, tokens: int) -> None:
        if self.capacity is not None and position + tokens > self.capacity:
            raise ValueError(f"{position} + {tokens} tokens exceed this model's KV buffers of {self.capacity} "
                             f"positions (its max_seq_len)")

    @staticmethod
    def check_graph(where: str, name: str, past: list, present: list) -> None:
        if past != present:
            raise BundleError(f"{where}: hybrid state {name} differs in shape between input and output "
                              f"({past} vs {present}); each layer's state keeps its shape")

    def from_arrays(self, arrays: list[np.ndarray], position: int) -> State:
        self.check_room(0, position)
        return self._state([self._buffer(spec, a) if kv else np.ascontiguousarray(a)
                            for a, spec, kv in zip(arrays, self.s.state_specs, self.kv)], position)

    def snapshot(self, state: State) -> State:
        # SSM tensors: the double-buffered decoder writes them, so copy; KV rows before the
        # position are never rewritten (as KvBufferState.snapshot), so the buffers are shared.
        values = [v if kv else ort.OrtValue.ortvalue_from_numpy(v.numpy().copy())
                  for v, kv in zip(state.values, self.kv)]
        return State(values, state.position, state.buffers)

    def run(self, sess: ort.InferenceSession, ids: np.ndarray, state: State,
            positions: dict) -> tuple[np.ndarray, State]:
        s = self.s
        T = ids.shape[1]
        self.check_room(state.position, T)
        arrays = [self._buffer(spec, b[:, :, :state.position]) if kv else np.zeros(self._shape(spec), spec.dtype)
                  for spec, kv, b in zip(s.state_specs, self.kv, state.buffers or [None] * len(self.kv))]
        new = self._state(arrays, state.position + T)  # KV: copies (the caller's state stays usable)
        binding = sess.io_binding()
        self._bind_tokens(binding, ids, state.position, positions)
        binding.bind_output(s.logits, "cpu")
        for spec, kv, old, fresh in zip(s.state_specs, self.kv, state.values, new.values):
            binding.bind_ortvalue_input(spec.input, fresh if kv else old)
            binding.bind_ortvalue_output(spec.output, fresh)
        sess.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy(), new

    def decoder(self, state: State) -> Decoder:
        return HybridDecoder(self.s, state)


STATE_KINDS: dict[str, type[StateKind]] = {k.name: k for k in (SsmState, KvBufferState, KvCacheState, HybridState)}
assert set(STATE_KINDS) == set(MANIFEST_STATE_KINDS), "every kind a manifest may name has its class"


# --------------------------------------------------------------------------- decode loops


class Decoder:
    """Token-by-token decoding with bindings made once; each kind's subclass binds its state.

    The token and logits live in preallocated buffers bound to the graph, so a step is a
    write of one int64, one onnxruntime call and a view of the logits, which the next step
    overwrites.
    """

    def __init__(self, session: ModelSession, state: State):
        self.session = session
        self.graph = session.graphs["decode"]
        self._token = np.zeros((1, 1), dtype=np.int64)
        self._logits = np.zeros((1, 1, session.bundle.vocab_size), dtype=np.float32)
        self._token_ov = ort.OrtValue.ortvalue_from_numpy(self._token)
        self._logits_ov = ort.OrtValue.ortvalue_from_numpy(self._logits)
        if session.hidden:  # the retrieval query, read after every step
            width = next(t.shape[-1] for t in session.bundle.graph("decode", session.graph_set).outputs
                         if t.name == session.hidden)
            self._hidden = np.zeros((1, 1, int(width)), dtype=np.float32)
            self._hidden_ov = ort.OrtValue.ortvalue_from_numpy(self._hidden)
        self.position = state.position
        self.values = list(state.values)
        self.buffers = state.buffers

    def _bind(self, inputs, outputs) -> ort.IOBinding:
        s = self.session
        b = self.graph.io_binding()
        b.bind_ortvalue_input(s.input_ids, self._token_ov)
        for name, value in s.position_feeds("decode", last_only=True).items():  # a baseline's one graph takes it
            b.bind_cpu_input(name, value)
        b.bind_ortvalue_output(s.logits, self._logits_ov)
        if s.hidden:
            b.bind_ortvalue_output(s.hidden, self._hidden_ov)
        for spec, src, dst in zip(s.state_specs, inputs, outputs):
            b.bind_ortvalue_input(spec.input, src)
            b.bind_ortvalue_output(spec.output, dst)
        return b

    def _run(self) -> None:
        raise NotImplementedError

    def step(self, token: int) -> np.ndarray:
        """Feed one token; logits (V,) for the next (a view, valid until the next step)."""
        self._token[0, 0] = token
        self._run()
        self.position += 1
        if self.session.hidden:
            return self.session.retriever(self._logits[0, 0], self._hidden[0, 0])
        return self._logits[0, 0]

    @property
    def state(self) -> State:
        return State(list(self.values), self.position, self.buffers)


class DoubleBufferedDecoder(Decoder):
    """A fixed-shape state: two sets of OrtValues and two bindings that read one set and write
    the other, alternating, so no state is allocated or copied per step."""

    def __init__(self, session: ModelSession, state: State):
        super().__init__(session, state)
        other = [ort.OrtValue.ortvalue_from_numpy(np.zeros(v.shape(), dtype=v.numpy().dtype)) for v in self.values]
        self._sets = [self.values, other]
        self._bindings = [self._bind(self._sets[i], self._sets[1 - i]) for i in (0, 1)]
        self._parity = 0

    def _run(self) -> None:
        self.graph.run_with_iobinding(self._bindings[self._parity])
        self._parity ^= 1
        self.values = self._sets[self._parity]


class InPlaceDecoder(Decoder):
    """A KV buffer bound once as both input and output; only the attention mask (one longer each
    step) is rebound."""

    def __init__(self, session: ModelSession, state: State):
        super().__init__(session, state)
        kind = session.state_kind
        assert isinstance(kind, KvBufferState)  # only KvBufferState.decoder makes this decoder
        self.kind = kind
        self._mask = np.ones((1, self.kind.capacity), dtype=np.int64)
        self._binding = self._bind(self.values, self.values)

    def _run(self) -> None:
        self.kind.check_room(self.position, 1)
        mask = ort.OrtValue.ortvalue_from_numpy(self._mask[:, :self.position + 1])
        self._binding.bind_ortvalue_input(self.session.attention_mask, mask)
        self.graph.run_with_iobinding(self._binding)


class HybridDecoder(Decoder):
    """Double-buffered SSM tensors (as DoubleBufferedDecoder) and KV buffers bound once as both
    input and output of both bindings (as InPlaceDecoder); the mask is rebound each step."""

    def __init__(self, session: ModelSession, state: State):
        super().__init__(session, state)
        kind = session.state_kind
        assert isinstance(kind, HybridState)  # only HybridState.decoder makes this decoder
        self.kind = kind
        other = [v if kv else ort.OrtValue.ortvalue_from_numpy(np.zeros(v.shape(), dtype=v.numpy().dtype))
                 for v, kv in zip(self.values, kind.kv)]
        self._sets = [self.values, other]
        self._bindings = [self._bind(self._sets[i], self._sets[1 - i]) for i in (0, 1)]
        self._parity = 0
        self._mask = np.ones((1, kind.capacity or 1), dtype=np.int64)

    def _run(self) -> None:
        binding = self._bindings[self._parity]
        if self.session.attention_mask:
            self.kind.check_room(self.position, 1)
            mask = ort.OrtValue.ortvalue_from_numpy(self._mask[:, :self.position + 1])
            binding.bind_ortvalue_input(self.session.attention_mask, mask)
        self.graph.run_with_iobinding(binding)
        self._parity ^= 1
        self.values = self._sets[self._parity]


class GrowingDecoder(Decoder):
    """A state whose shape changes per step (a KV cache of growing length): run_with_ort_values,
    one call with no IOBinding to build; the OrtValues it returns are fed straight back, never
    copied through numpy."""

    def __init__(self, session: ModelSession, state: State):
        super().__init__(session, state)
        self._mask = np.ones((1, 1024), dtype=np.int64)
        self._state_inputs = [spec.input for spec in session.state_specs]
        self._positions = {k: ort.OrtValue.ortvalue_from_numpy(v)
                           for k, v in session.position_feeds("decode", last_only=True).items()}
        self._output_names = [session.logits, *(spec.output for spec in session.state_specs)]
        if session.hidden:
            self._output_names.append(session.hidden)

    def _run(self) -> None:
        s = self.session
        feeds = {s.input_ids: self._token_ov, **self._positions}
        if s.attention_mask:
            total = self.position + 1
            if total > self._mask.shape[1]:
                self._mask = np.ones((1, 2 * total), dtype=np.int64)
            feeds[s.attention_mask] = ort.OrtValue.ortvalue_from_numpy(self._mask[:, :total])
        if s.position_ids:
            feeds[s.position_ids] = ort.OrtValue.ortvalue_from_numpy(np.array([[self.position]], dtype=np.int64))
        feeds.update(zip(self._state_inputs, self.values))
        outs = self.graph.run_with_ort_values(self._output_names, feeds)
        self._logits[...] = outs[0].numpy()
        n_state = len(s.state_specs)
        if s.hidden:
            self._hidden[...] = outs[1 + n_state].numpy()
        self.values = outs[1:1 + n_state]
