"""Decode speed of a bundle at a given context length: the project's first number.

Method (pyperf / llama-bench style): build the context with one prefill of real text,
then time `new_tokens` greedy decode steps; one warm-up run, then `repeats` timed runs;
report the median tokens/s with min/max and a warning when the spread is too wide to trust.
Each run starts from a fresh prefill, so every run decodes at the same depth.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from itera_runtime.bundle import Bundle, load_bundle
from itera_runtime.session import ModelSession

SPREAD_WARNING = 0.10  # (max - min) / median above this: say the number is noisy


def context_tokens(tokenizer_path, text: str, n: int) -> np.ndarray:
    """The first n tokens of text (repeated if it is short)."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_path)).encode(text).ids
    if not ids:
        raise ValueError("context text encodes to no tokens")
    return np.resize(np.asarray(ids, dtype=np.int64), n)


def measure_decode(bundle: Bundle | str, context: int, new_tokens: int = 64, threads: int = 1, repeats: int = 5,
                   text: str = "", session: ModelSession | None = None) -> dict:
    """Median decode tokens/s after a `context`-token prefill; one record.

    bundle: a loaded Bundle (verified once by the caller) or a path to load and verify.
    """
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    session = session or ModelSession(bundle, threads=threads)
    ids = context_tokens(bundle.tokenizer_path, text or "To be, or not to be, that is the question.\n", context)
    rates, prefill_s = [], []
    for run in range(repeats + 1):
        t0 = time.perf_counter()
        logits, state = session.prefill(ids)
        t1 = time.perf_counter()
        token = int(logits[-1].argmax())
        decoder = session.decoder(state)  # the generate loop's own fast path
        for _ in range(new_tokens):
            token = int(decoder.step(token).argmax())
        t2 = time.perf_counter()
        if run:  # run 0 is the warm-up
            rates.append(new_tokens / (t2 - t1))
            prefill_s.append(t1 - t0)
    median = statistics.median(rates)
    spread = (max(rates) - min(rates)) / median
    return {
        "family": bundle.family, "bundle": str(bundle.path), "quantization": bundle.quantization,
        "ssm_path": bundle.manifest.get("ssm_path"), "context": context, "new_tokens": new_tokens,
        "threads": threads, "repeats": repeats,
        "decode_tokens_per_s": median, "decode_tokens_per_s_min": min(rates),
        "decode_tokens_per_s_max": max(rates), "ms_per_token": 1000 / median,
        "prefill_tokens_per_s": context / statistics.median(prefill_s),
        "spread": spread, "noisy": spread > SPREAD_WARNING, "estimated": False,
    }
