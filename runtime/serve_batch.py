"""One decode graph call for every generation of a bundle that is decoding (itera-serve's batch).

The decode graphs have a symbolic batch axis. For a fixed-shape state (Itera-Lite's SSM state)
the rows of all decoding requests live in one pair of buffers of `capacity` rows, rows
[0, n) in use: each worker round runs the graph once on those n rows, each with the token its
request sampled last, reading one buffer and writing the other (as the single-row decoder
does), and each request's `step(token)` then returns its row of the logits. A request joins
with one copy of its state after the prompt into row n and leaves by moving the last row into
its place, so rows stay packed and the graph never computes an empty row.

A KV buffer is not batched: its rows would each need their own position (attention mask).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .session import ModelSession, State

__all__ = ["DecodeBatch", "BatchSlot", "can_batch"]


def can_batch(session: ModelSession) -> bool:
    """A fixed-shape state and a decode graph that takes only ids and state (no mask, positions, hidden)."""
    return (session.bundle.state_kind == "ssm" and not session.attention_mask and not session.position_ids
            and session.hidden is None)


class BatchSlot:
    """One request's row in the batch; `step` hands back the logits the batch computed for it."""

    def __init__(self, batch: DecodeBatch, row: int):
        self.batch, self.row = batch, row
        self.fed: int | None = None  # the token the last batch run fed this row
        self.ready = False  # the logits row is that run's and not yet taken
        self.position = 0

    def step(self, token: int) -> np.ndarray:
        if not self.ready or self.fed != token:  # not in the last run (never by the worker's order): run alone
            self.batch.run({self: token}, alone=True)
        self.ready = False
        self.position += 1
        return self.batch.logits[self.row, 0]


class DecodeBatch:
    """The state rows of every decoding request of one bundle, and one graph call over them."""

    def __init__(self, session: ModelSession, capacity: int):
        self.session, self.capacity = session, capacity
        self.graph = session.graphs["decode"]
        specs = session.state_specs
        shapes = [[capacity if d == "batch" else int(d) for d in spec.shape] for spec in specs]
        self._sets = [[np.zeros(shape, dtype=spec.dtype) for shape, spec in zip(shapes, specs)] for _ in (0, 1)]
        self._parity = 0  # rows in use live in _sets[_parity]
        self.tokens = np.zeros((capacity, 1), dtype=np.int64)
        self.logits = np.zeros((capacity, 1, session.bundle.vocab_size), dtype=np.float32)
        self.slots: list[BatchSlot] = []
        self._bindings: dict[tuple[int, int, int], ort.IOBinding] = {}

    def _binding(self, lo: int, hi: int, parity: int) -> ort.IOBinding:
        """The binding of rows [lo, hi) read from set `parity`, written to the other; made once, as the
        single-row decoder's are (the buffers never move, so a binding stays valid)."""
        key = (lo, hi, parity)
        binding = self._bindings.get(key)
        if binding is None:
            s = self.session
            src, dst = self._sets[parity], self._sets[1 - parity]
            binding = self.graph.io_binding()
            binding.bind_ortvalue_input(s.input_ids, ort.OrtValue.ortvalue_from_numpy(self.tokens[lo:hi]))
            for name, value in s.position_feeds("decode", last_only=True).items():
                binding.bind_cpu_input(name, value)
            binding.bind_ortvalue_output(s.logits, ort.OrtValue.ortvalue_from_numpy(self.logits[lo:hi]))
            for spec, a, b in zip(s.state_specs, src, dst):
                binding.bind_ortvalue_input(spec.input, ort.OrtValue.ortvalue_from_numpy(a[lo:hi]))
                binding.bind_ortvalue_output(spec.output, ort.OrtValue.ortvalue_from_numpy(b[lo:hi]))
            self._bindings[key] = binding
        return binding

    def join(self, state: State) -> BatchSlot:
        """Put a state after a prompt (batch 1) into the next free row."""
        if len(self.slots) >= self.capacity:
            raise RuntimeError(f"the batch is full ({self.capacity} rows); the worker admits at most that many")
        row = len(self.slots)
        for buf, value in zip(self._sets[self._parity], state.values):
            buf[row] = value.numpy()[0]
        slot = BatchSlot(self, row)
        slot.position = state.position
        self.slots.append(slot)
        return slot

    def leave(self, slot: BatchSlot) -> None:
        """Free a row: the last row moves into it, so rows [0, n) stay the ones in use."""
        if slot not in self.slots:
            return
        last = self.slots[-1]
        if last is not slot:
            for buf in self._sets[self._parity]:
                buf[slot.row] = buf[last.row]
            self.logits[slot.row] = self.logits[last.row]
            last.row = slot.row
            self.slots[slot.row] = last
        self.slots.pop()

    def run(self, feed: dict[BatchSlot, int], alone: bool = False) -> None:
        """One graph call: each slot of `feed` fed its token; rows not fed are not computed.

        With every slot in `feed` (the worker's round) all n rows run at once. `alone` runs
        one slot by itself and copies its row back, leaving the other rows as they were.
        """
        if alone:
            (slot, token), = feed.items()
            lo, hi = slot.row, slot.row + 1
        else:
            if len(feed) != len(self.slots):
                raise ValueError("a batch run feeds every row in use")
            lo, hi = 0, len(self.slots)
        if hi <= lo:
            return
        for slot, token in feed.items():
            self.tokens[slot.row, 0] = token
        src, dst = self._sets[self._parity], self._sets[1 - self._parity]
        self.graph.run_with_iobinding(self._binding(lo, hi, self._parity))
        if alone:  # the other rows were not run: bring this one back to the set they are in
            for a, b in zip(src, dst):
                a[lo:hi] = b[lo:hi]
        else:
            self._parity ^= 1
        for slot, token in feed.items():
            slot.fed, slot.ready = token, True
