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
