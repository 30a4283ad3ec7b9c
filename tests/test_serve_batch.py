"""itera-serve's decode batch (runtime/serve_batch.py) against the single-row decoder, on the committed
Itera-Lite golden bundle: each row's logits are the ones that request gets alone, through joins,
leaves (rows moving) and a row run by itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from itera_runtime.generate import Generator
from itera_runtime.serve_batch import DecodeBatch, can_batch

DATA = Path(__file__).resolve().parent / "data"


def test_each_batched_row_decodes_as_its_request_alone_through_joins_and_leaves():
    gen = Generator(DATA / "golden-itera", threads=1)
    session = gen.session
    assert can_batch(session) and not can_batch(Generator(DATA / "golden-baseline", threads=1).session)
    prompts = ["To be, or not", "Whether 'tis", "The slings"]
    batch = DecodeBatch(session, capacity=4)
    rows, alone, tokens = [], [], []
    for p in prompts:
        logits, state = session.prefill(gen.encode(p))
        rows.append(batch.join(state))  # copies the state in before the single decoder consumes it
        alone.append(session.decoder(state))
        tokens.append(int(np.argmax(logits)))

    def step(i: int) -> None:
        got = rows[i].step(tokens[i]).copy()
        want = alone[i].step(tokens[i])
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert int(np.argmax(got)) == int(np.argmax(want))
        tokens[i] = int(np.argmax(want))

    live = [0, 1, 2]
    for n in range(12):
        if n == 4:  # the first request leaves: the last row moves into its place
            batch.leave(rows[0])
            live = [1, 2]
            assert rows[2].row == 0 and len(batch.slots) == 2
        batch.run({rows[i]: tokens[i] for i in live})
        for i in live:
            step(i)
    step(1)  # a row stepped without a batch run is run by itself, the other rows untouched
    batch.run({rows[i]: tokens[i] for i in live})
    for i in live:
        step(i)
