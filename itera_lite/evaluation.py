"""Evaluation and its metrics: mean loss, perplexity and bits per byte over held-out ids."""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from .data.prepared import iter_eval_batches


def bits_per_byte(mean_loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Mean token loss in nats converted to bits per UTF-8 byte of text.

    Unlike loss or perplexity per token, bits per byte does not depend on the tokenizer,
    so models with different vocab sizes can be compared on the same text.
    """
    return mean_loss_nats * n_tokens / (n_bytes * math.log(2))


def perplexity(mean_loss_nats: float) -> float:
    """Per-token perplexity, exp(mean loss); only comparable at equal vocab size."""
    return math.exp(mean_loss_nats)


def token_byte_lengths(tokenizer_json: str) -> np.ndarray:
    """UTF-8 byte length of every token id (the runtime's one definition), so bits/byte is exact."""
    from tokenizers import Tokenizer

    from itera_runtime.textstream import token_byte_lengths as lengths

    return lengths(Tokenizer.from_str(tokenizer_json))


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, byte_len: np.ndarray, batch_size: int, seq_len: int,
             max_batches: int | None, deadline: float | None = None, progress: str | None = None) -> dict:
    """Mean loss, perplexity and bits/byte over contiguous windows from the split's start.

    The split must hold at least seq_len + 1 tokens (training checks this up front).
    deadline: a time.perf_counter() value after which no further batch starts (the first
    always runs); the result says how many windows it covered ("windows", "complete").
    progress: a progress bar on stderr with this description (None: none).
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    nats, n_tok, n_bytes, windows = 0.0, 0, 0, 0
    in_split = max(0, (len(tokens) - 1) // seq_len)
    batches = math.ceil(in_split / batch_size)
    batches = batches if max_batches is None else min(batches, max_batches)
    with tqdm(total=batches, desc=progress, unit="batch", file=sys.stderr, leave=False,
              disable=progress is None, dynamic_ncols=True) as bar:
        for x, y in iter_eval_batches(tokens, batch_size, seq_len, max_batches):
            if windows and deadline is not None and time.perf_counter() >= deadline:
                break
            logits = model(torch.from_numpy(x)).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), torch.from_numpy(y).flatten(), reduction="sum")
            nats += loss.item()
            n_tok += y.size
            n_bytes += int(byte_len[y].sum())
            windows += len(x)
            bar.update(1)
    model.train(was_training)
    if n_tok == 0:
        raise ValueError(f"{len(tokens)} tokens cannot fill one window of seq_len {seq_len}")
    mean = nats / n_tok
    return {"loss": mean, "ppl": perplexity(mean), "bpb": bits_per_byte(mean, n_tok, n_bytes),
            "tokens": n_tok, "bytes": n_bytes, "windows": windows, "windows_in_split": in_split,
            "complete": windows == in_split}
