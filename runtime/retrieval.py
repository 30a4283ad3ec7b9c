"""kNN-LM retrieval at inference, without torch: exact search over a bundle's datastore and the mix.

A datastore (built by `itera-train retrieval-index`, stored in the bundle by
`itera-export --retrieval`) holds, for positions of the training split, the model's own
final hidden state (the head's input, `io.hidden`) as key and the token that came next as
value. At each position the runtime takes the k keys nearest to the current hidden state
and mixes (Khandelwal et al. 2020, "Generalization through Memorization"):

    p_knn(v) = Σ_{i ∈ top-k, value_i = v} softmax_i(score_i / T),   score = −‖q − key‖² (l2) or q·key (ip)
    p(v)     = λ · p_knn(v) + (1 − λ) · p_model(v)

and hands log p on as the "logits" (a normalised log-distribution is a valid logit vector,
so sampling, scoring and the generate loop stay as they are).

Search is exact, as chunked matrix products in numpy with a running top-k: for the 10K-100K
entry stores of these models it needs no index to build or ship, and gives the same
neighbours on every machine. Keys are stored float16 (half the bytes) and widened to
float32 once at load, since numpy has no fast float16 matmul (100K×128: ~0.1 s per query in
float16 against ~0.5-5 ms in float32 on the 2-core dev VM).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, BundleError, Retrieval, _safe_member
from .errors import UsageError

__all__ = ["DATASTORE_DIR", "KEYS_FILE", "VALUES_FILE", "MixSettings", "Datastore", "Retriever",
           "knn_log_mix", "check_spec", "datastore_spec", "load_arrays", "check_datastore", "open_retriever"]

DATASTORE_DIR = "retrieval"
KEYS_FILE = f"{DATASTORE_DIR}/keys.npy"
VALUES_FILE = f"{DATASTORE_DIR}/values.npy"

# Scores per search block: bounds the (queries × keys) matrix of one block to ~32 MB.
_BLOCK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class MixSettings:
    """How to mix: k neighbours, weight lam of the kNN distribution, softmax temperature."""

    k: int
    lam: float
    temperature: float

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise UsageError(f"retrieval k must be an integer >= 1, got {self.k!r}")
        # λ = 1 would give every token outside the k neighbours probability 0 (infinite loss).
        if not 0.0 <= self.lam < 1.0:
            raise UsageError(f"retrieval lambda must be in [0, 1), got {self.lam!r}")
        if not self.temperature > 0:
            raise UsageError(f"retrieval temperature must be > 0, got {self.temperature!r}")

    @classmethod
    def of(cls, spec: Retrieval, k: int | None = None, lam: float | None = None,
           temperature: float | None = None) -> MixSettings:
        """The datastore's own (validation-tuned) settings with any of them replaced."""
        return cls(spec.k if k is None else k, spec.lam if lam is None else lam,
                   spec.temperature if temperature is None else temperature)


class Datastore:
    """Keys (N, D) float32 and values (N,) token ids, searched exactly."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, metric: str = "l2"):
        if metric not in ("l2", "ip"):
            raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
        self.keys = np.ascontiguousarray(keys, dtype=np.float32)
        self.values = np.asarray(values, dtype=np.int64)
        self.metric = metric
        # ‖q − k‖² = ‖q‖² − 2 q·k + ‖k‖²: the key norms once, the rest per query block.
        self._sqnorm = np.einsum("nd,nd->n", self.keys, self.keys) if metric == "l2" else None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        """Bytes this store holds in memory (keys, values, key norms)."""
        return self.keys.nbytes + self.values.nbytes + (0 if self._sqnorm is None else self._sqnorm.nbytes)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (B, D) → (scores (B, k), indices (B, k)) of the k best keys, best first.

        score is −squared L2 distance (l2) or the inner product (ip): higher is nearer.
        """
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)  # (B, D)
        B, N = len(q), len(self.keys)
        k = min(k, N)
        best_s = np.full((B, 0), -np.inf, dtype=np.float32)
        best_i = np.zeros((B, 0), dtype=np.int64)
        qn = np.einsum("bd,bd->b", q, q)[:, None] if self.metric == "l2" else None
        rows = max(k, _BLOCK_ELEMENTS // max(B, 1))
        for start in range(0, N, rows):
            block = self.keys[start:start + rows]
            # One query (decode): numpy's own single-threaded loop. BLAS gemv woke OpenBLAS's
            # threads, which fought onnxruntime's for 2 cores (10K keys: ~10 ms vs ~1 ms).
            s = np.einsum("nd,d->n", block, q[0])[None] if B == 1 else q @ block.T  # (B, n)
            if qn is not None:  # −‖q − key‖², in place: no block-sized temporaries
                s *= 2.0
                s -= self._sqnorm[start:start + rows]
                s -= qn
            kk = min(k, s.shape[1])
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < s.shape[1] else np.broadcast_to(
                np.arange(s.shape[1]), s.shape)
            cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], axis=1)
            cand_i = np.concatenate([best_i, part + start], axis=1)
            if cand_s.shape[1] > k:
                keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
                cand_s, cand_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
            best_s, best_i = cand_s, cand_i
        order = np.argsort(-best_s, axis=1, kind="stable")
        return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def knn_log_mix(logits: np.ndarray, scores: np.ndarray, neighbour_values: np.ndarray,
                settings: MixSettings) -> np.ndarray:
    """log(λ·p_knn + (1 − λ)·p_model) per row: logits (B, V), scores and values (B, k) → (B, V) float32."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    p_model = np.exp(x)
    p_model /= p_model.sum(axis=1, keepdims=True)
    s = np.asarray(scores, dtype=np.float64) / settings.temperature
    w = np.exp(s - s.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)  # (B, k)
    p_knn = np.zeros_like(p_model)
    rows = np.broadcast_to(np.arange(len(x))[:, None], w.shape)
    np.add.at(p_knn, (rows, neighbour_values), w)  # neighbours with the same next token add up
    with np.errstate(divide="ignore"):
        return np.log(settings.lam * p_knn + (1.0 - settings.lam) * p_model).astype(np.float32)


class Retriever:
    """A datastore and mix settings: model logits and hidden states in, mixed log-probabilities out."""

    def __init__(self, store: Datastore, settings: MixSettings, notes: tuple[str, ...] = ()):
        self.store, self.settings = store, settings
        self.notes = notes  # what was changed from what was asked (a k beyond the store's size), to be said
        # Time spent searching and mixing, and positions served: the cost retrieval adds.
        self.ns, self.positions = 0, 0

    @property
    def us_per_position(self) -> float | None:
        """Measured search + mix time per position so far (µs), None before the first call."""
        return self.ns / self.positions / 1e3 if self.positions else None

    def __call__(self, logits: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """logits (B, V) or (V,), hidden (B, D) or (D,) → mixed log-probabilities of the same shape as logits."""
        start = time.perf_counter_ns()
        out = self._mix(logits, hidden)
        self.ns += time.perf_counter_ns() - start
        self.positions += 1 if np.ndim(logits) == 1 else len(logits)
        return out

    def _mix(self, logits: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        one = np.ndim(logits) == 1
        logits2, hidden2 = np.atleast_2d(logits), np.atleast_2d(hidden)
        if self.settings.lam == 0.0:
            out = knn_log_mix(logits2, np.zeros((len(logits2), 1)), np.zeros((len(logits2), 1), np.int64),
                              self.settings)
        else:
            scores, idx = self.store.search(hidden2, self.settings.k)
            out = knn_log_mix(logits2, scores, self.store.values[idx], self.settings)
        return out[0] if one else out


_NPY_MAGIC = b"\x93NUMPY"
_KEY_DTYPES = ("float16", "float32")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _load_array(root: Path, name: str, where: str) -> np.ndarray:
    path = _safe_member(root, name, where, f"the folder {root}")  # no path or symbolic link out of it
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise BundleError(f"{path}: {e.strerror or e}") from None
    if head != _NPY_MAGIC:
        what = "an empty file" if not head else "no NumPy header"
        raise BundleError(f"{path}: not a readable .npy array ({what})")
    try:
        # No pickle: a datastore is plain arrays; memory-mapped so a large one is paged in.
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        pickled = "pickle" in str(e) or "Python objects" in str(e)  # numpy's words without and with mmap
        why = ("it holds pickled objects, which are never loaded" if pickled
               else "its header or size does not read as an array")
        raise BundleError(f"{path}: not a readable .npy array ({why})") from None
    except (OSError, EOFError):  # a header cut short
        raise BundleError(f"{path}: not a readable .npy array (cut short)") from None


def check_spec(spec: Retrieval, where: str) -> Retrieval:
    """Refuse, in one line, a datastore description the runtime cannot use (beyond the manifest's types)."""
    if spec.n_entries < 1:
        raise BundleError(f"{where}: n_entries is {spec.n_entries}; an empty datastore retrieves nothing")
    if spec.dim < 1:
        raise BundleError(f"{where}: dim must be >= 1, got {spec.dim}")
    if spec.key_dtype not in _KEY_DTYPES:
        raise BundleError(f"{where}: key_dtype {spec.key_dtype!r} is not one of {', '.join(_KEY_DTYPES)}")
    try:
        MixSettings.of(spec)
    except ValueError as e:
        raise BundleError(f"{where}: {e}") from None
    return spec


def datastore_spec(d: Any, where: str) -> Retrieval:
    """A datastore's description (a manifest's retrieval entry, or datastore.json with its file names) checked."""
    spec = Retrieval.from_dict(d, where)
    if spec is None:
        raise BundleError(f"{where}: expected a datastore description, got null")
    return check_spec(spec, where)


def load_arrays(root: str | os.PathLike, spec: Retrieval, vocab_size: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values of a datastore folder, checked exactly as the runtime uses them; BundleError in one line.

    Shapes and dtypes as described, token ids inside the vocabulary, keys finite and small
    enough that their squared norms stay finite in float32 (the search's precision).
    """
    root = Path(root)
    check_spec(spec, where)
    keys, values = _load_array(root, spec.keys, where), _load_array(root, spec.values, where)
    if keys.shape != (spec.n_entries, spec.dim) or str(keys.dtype) != spec.key_dtype:
        raise BundleError(f"{root / spec.keys}: keys are {keys.dtype}{list(keys.shape)}, {where} says "
                          f"{spec.key_dtype}{[spec.n_entries, spec.dim]}")
    if values.shape != (spec.n_entries,) or values.dtype.kind not in "iu":
        raise BundleError(f"{root / spec.values}: values are {values.dtype}{list(values.shape)}, expected "
                          f"integers [{spec.n_entries}]")
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= vocab_size:
        raise BundleError(f"{root / spec.values}: token ids {low}..{high} reach outside the vocabulary of {vocab_size}")
    rows = max(1, (1 << 20) // spec.dim)  # float64 blocks of 8 MB: a large store is checked in pieces
    for start in range(0, spec.n_entries, rows):
        block = np.asarray(keys[start:start + rows], dtype=np.float64)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            raise BundleError(f"{root / spec.keys}: key row {start + int(np.argmin(finite))} holds NaN or Inf "
                              f"({int((~finite).sum())} such row(s) in this block); refused")
        norms = np.einsum("nd,nd->n", block, block)
        if norms.max(initial=0.0) > _FLOAT32_MAX / 4:
            raise BundleError(f"{root / spec.keys}: key row {start + int(np.argmax(norms))} is too large for "
                              "float32 distances; refused")
    return keys, values


def check_datastore(bundle: Bundle) -> Retrieval:
    """The bundle's retrieval spec, refused in one line if it does not belong to this bundle's model."""
    m = bundle.manifest
    spec, where = m.retrieval, f"{bundle.manifest_path}: retrieval"
    if spec is None:
        raise BundleError(f"{bundle.path}: this bundle has no retrieval datastore (export it with --retrieval)")
    check_spec(spec, where)
    if m.io.hidden is None:
        raise BundleError(f"{where}: the graphs do not output the hidden state (io.hidden) the search needs")
    tokenizer = m.files.get(m.tokenizer)
    if tokenizer is None or tokenizer.sha256 != spec.tokenizer_sha256:
        raise BundleError(f"{where}: the datastore was built with another tokenizer than this bundle's; refused")
    model_sha = (m.source_checkpoint or {}).get("model_sha256")
    if model_sha != spec.model_sha256:
        raise BundleError(f"{where}: the datastore was built from another model (weights sha256 "
                          f"{spec.model_sha256[:12]}…, this bundle's {str(model_sha)[:12]}…); refused")
    return spec


def open_retriever(bundle: Bundle, k: int | None = None, lam: float | None = None,
                   temperature: float | None = None) -> Retriever:
    """Load and check the bundle's datastore; mix settings default to the ones tuned on validation text."""
    spec = check_datastore(bundle)
    settings = MixSettings.of(spec, k, lam, temperature)
    notes: tuple[str, ...] = ()
    if settings.k > spec.n_entries:  # the search would return them all anyway: say so, record the k used
        notes = (f"retrieval k {settings.k:,} is more than the datastore's {spec.n_entries:,} entries; "
                 f"using k {spec.n_entries:,}",)
        settings = dataclasses.replace(settings, k=spec.n_entries)
    keys, values = load_arrays(bundle.path, spec, bundle.vocab_size, f"{bundle.manifest_path}: retrieval")
    return Retriever(Datastore(keys, values, spec.metric), settings, notes)
