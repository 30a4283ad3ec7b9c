"""Next-token sampling: greedy, temperature, top-k, top-p and repetition penalty.

The order (`Sampler.__call__`): repetition penalty (CTRL-style, as HF's
`RepetitionPenaltyLogitsProcessor`: a positive logit divided by it, a negative one
multiplied), then greedy at temperature 0 (ties to the lowest id), else temperature, top-k,
top-p (the smallest nucleus reaching top_p, at least one token) and a draw from the
renormalised softmax of what is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import UsageError

__all__ = [
    "SamplingConfig",
    "Sampler",
    "apply_repetition_penalty",
    "top_k_filter",
    "top_p_filter",
    "softmax",
]

# Cumulative sums of float probabilities land a few ulps either side of the exact value
# (0.5 + 0.3 is not exactly 0.8); this slack keeps "cumulative >= top_p" meaning what a
# reader expects without changing the nucleus for any real distribution.
_TOP_P_SLACK = 1e-9


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings; the defaults sample from the model's plain softmax.

    temperature: 0 selects greedy decoding. top_k: 0 turns it off. top_p: 1 turns it off.
    repetition_penalty: 1 turns it off. seed: None draws fresh OS entropy.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise UsageError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0:
            raise UsageError(f"top_k must be an integer >= 0 (0 means off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1] (1 means off), got {self.top_p}")
        if not np.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise UsageError(
                f"repetition_penalty must be > 0 (1 means off), got {self.repetition_penalty}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities (float64) of a 1-D logit vector; -inf entries get probability 0."""
    x = np.asarray(logits, dtype=np.float64)
    top = np.max(x)
    if not np.isfinite(top):
        raise ValueError("cannot sample: every logit is -inf (or one is +inf/nan)")
    e = np.exp(x - top)
    return e / e.sum()


def apply_repetition_penalty(
    logits: np.ndarray, history: Sequence[int], penalty: float
) -> np.ndarray:
    """Return a float64 copy of `logits` with CTRL-style penalty on every id in `history`."""
    out = np.array(logits, dtype=np.float64)
    if penalty == 1.0 or len(history) == 0:
        return out
    ids = np.unique(np.asarray(history, dtype=np.int64))
    if ids[0] < 0 or ids[-1] >= out.shape[-1]:
        raise ValueError(
            f"history holds token id {ids[0] if ids[0] < 0 else ids[-1]} "
            f"outside the vocabulary (size {out.shape[-1]})"
        )
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Return a float64 copy of `logits` keeping only the k largest (others -inf); k=0 is off.

    Ties at the k-th value are broken arbitrarily, so exactly k entries stay.
    """
    out = np.array(logits, dtype=np.float64)
    if k <= 0 or k >= out.shape[-1]:
        return out
    # argpartition is O(V); a full sort would be O(V log V) per generated token.
    drop = np.argpartition(out, -k)[:-k]
    out[drop] = -np.inf
    return out


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Return a float64 copy of `logits` keeping the nucleus of mass `p` (others -inf).

    The nucleus is the smallest set of highest-probability tokens whose cumulative
    probability is >= p; it always holds at least one token. p=1 is off.
    """
    out = np.array(logits, dtype=np.float64)
    if p >= 1.0:
        return out
    # Work on the live entries only: after top-k that is k of them, not the whole vocab.
    live = np.flatnonzero(np.isfinite(out))
    n = live.size
    if n <= 1:
        return out
    probs = softmax(out[live])
    # The nucleus is usually a few dozen tokens: sort only the top m (argpartition is
    # O(n)) and widen m until the mass is reached, instead of sorting the whole vocab.
    m = min(64, n)
    while True:
        top = np.argpartition(probs, n - m)[n - m:] if m < n else np.arange(n)
        top = top[np.argsort(-probs[top])]  # ties in any order
        cumulative = np.cumsum(probs[top])
        if m == n or cumulative[-1] >= p - _TOP_P_SLACK:
            break
        m = 16 * m if 16 * m < n // 2 else n
    keep = min(int(np.searchsorted(cumulative, p - _TOP_P_SLACK, side="left")) + 1, m)
    kept = live[top[:keep]]
    filtered = np.full_like(out, -np.inf)
    filtered[kept] = out[kept]
    return filtered


class Sampler:
    """Picks the next token from one step's logits; owns a seeded random generator.

    One Sampler per generation stream: its generator advances with every draw, so the
    same seed, prompt and model give the same tokens.
    """

    def __init__(self, config: SamplingConfig | None = None) -> None:
        self.config = config if config is not None else SamplingConfig()
        self.rng = np.random.default_rng(self.config.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """Return the next token id.

        logits: (vocab,) scores of the next token. history: ids seen so far (prompt and
        generated), used only by the repetition penalty.
        """
        cfg = self.config
        x = np.asarray(logits)
        if cfg.greedy and cfg.repetition_penalty == 1.0 and x.ndim == 1:
            # The per-token hot path of greedy decoding: no copies, one pass.
            idx = int(np.argmax(x))
            if np.isnan(x[idx]):
                raise ValueError("cannot sample: logits contain nan")
            return idx
        if x.ndim != 1:
            raise ValueError(f"expected logits of shape (vocab,), got {x.shape}")
        x = apply_repetition_penalty(x, history, cfg.repetition_penalty)
        if np.isnan(x).any():
            raise ValueError("cannot sample: logits contain nan")
        if cfg.greedy:
            return int(np.argmax(x))
        # Top-k first as a gather of k candidates, so temperature, top-p and the draw work
        # on k values instead of the whole vocabulary (same distribution as filtering).
        ids = None
        if 0 < cfg.top_k < x.shape[0]:
            ids = np.argpartition(x, -cfg.top_k)[-cfg.top_k:]
            return int(ids[self._draw_sorted(x[ids])])
        x /= cfg.temperature
        x = top_p_filter(x, cfg.top_p)
        probs = softmax(x)
        # Inverse-CDF draw: one uniform and a binary search, cheaper than rng.choice,
        # which re-validates the whole probability vector on every call.
        cdf = np.cumsum(probs)
        idx = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        idx = min(idx, x.shape[0] - 1)
        # A zero-probability id can only be picked through rounding at the top end of
        # the CDF; step back to the last live one.
        if probs[idx] == 0.0:
            idx = int(np.flatnonzero(probs)[-1])
        return idx

    def _draw_sorted(self, cand: np.ndarray) -> int:
        """Index into a small candidate set (the top k): temperature, nucleus, draw.

        One sort of k values replaces the general filters, which are built for the whole
        vocabulary; the distribution is the same.
        """
        order = np.argsort(-cand)
        z = cand[order] / self.config.temperature
        if not np.isfinite(z[0]):
            raise ValueError("cannot sample: every logit is -inf (or one is +inf/nan)")
        probs = np.exp(z - z[0])
        cdf = np.cumsum(probs)
        cdf /= cdf[-1]
        if self.config.top_p < 1.0:
            keep = min(int(np.searchsorted(cdf, self.config.top_p - _TOP_P_SLACK, side="left")) + 1, len(cdf))
            cdf = cdf[:keep] / cdf[keep - 1]
        idx = min(int(np.searchsorted(cdf, self.rng.random(), side="right")), len(cdf) - 1)
        return int(order[idx])
