"""Next-token loss of logits computed through onnxruntime: the one definition, torch-free.

Export validation (bits/byte of a bundle vs torch) and `itera-bench quality` both score
rows of logits against the tokens that followed; they share this so the two cannot drift.
"""

from __future__ import annotations

import numpy as np


def nll_nats(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum over rows of -log softmax(logits)[target], in nats; logits (T, V), targets (T,).

    Computed in float64 with the max subtracted (log-sum-exp), so long texts sum exactly.
    """
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=1)
    lse = top + np.log(np.exp(x - top[:, None]).sum(axis=1))
    return float((lse - x[np.arange(len(targets)), targets]).sum())


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis in float64, the max subtracted."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_nats(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(reference || model) of each row, in nats; both (T, V) over the same vocabulary."""
    ref, mod = log_softmax(reference_logits), log_softmax(logits)
    return (np.exp(ref) * (ref - mod)).sum(axis=-1)
