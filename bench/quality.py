"""Loss, perplexity and bits per byte of a bundle through onnxruntime (no torch).

Text: the held-out split of a corpus (`--data shakespeare --split test`: the same documents
and the same ids training evaluated on, via `itera_lite.data`, which imports no torch) or a
text file (`--data FILE`: the whole file; `--split` cuts it as training would).

The window rule, the same for both families. Every token after the first is scored once.
Targets are taken in blocks of `stride` tokens; each block is predicted by one prefill of
up to `window` input tokens ending just before its last target, started from an empty state
(fresh SSM state, empty KV cache), and only the block's last `stride` positions are scored.
So every scored token sees between `window - stride` and `window - 1` tokens of context
(fewer at the start of the text). With `stride == window` the blocks are disjoint windows,
exactly what training's `evaluate` computes; with a smaller stride this is the strided
sliding window of Hugging Face's perplexity guide, costing window / stride prefills per token.

`carry_state=True` (SSM only): the whole text runs through the prefill graph once, in
chunks of `window` with the state carried, so every token sees everything before it. A KV
cache cannot grow past the model's context, so KV bundles keep the window rule; the record
says which rule each bundle got (`extra.context`).

Retrieval: a bundle that carries a kNN datastore is scored twice in the same run, the model
alone and mixed with retrieval (`itera_runtime.retrieval`), rows told apart by `test`
("...+knn"), `method` and `extra.retrieval` (settings, entries, datastore bytes, measured
search + mix µs per scored position).

Bits per byte = total nats / ln 2 / UTF-8 bytes of the scored tokens
(`token_byte_lengths`, the same definition as training's), so models with different
tokenizers are compared on the same text.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from itera_runtime.bundle import Bundle
from itera_runtime.errors import UsageError
from itera_runtime.retrieval import open_retriever
from itera_runtime.scoring import kl_nats, nll_nats
from itera_runtime.session import PREFILL_CHUNK, ModelSession

from .record import Record
from .sweep import bundle_fields, stamp

DEFAULT_WINDOW = 256  # training's default seq_len: the context the tiny models were evaluated at
METRICS = (("bits_per_byte", "bit/B"), ("loss", "nat/token"), ("perplexity", "ppl"))
# --reference rows: (metric, unit, higher is better, the divergence() key)
DIVERGENCE = (("kl_divergence", "nat/token", False, "kl_mean"), ("kl_divergence_p99", "nat/token", False, "kl_p99"),
              ("top1_agreement", "fraction", True, "top1_agreement"))


@dataclass
class Score:
    """Summed negative log-likelihood of the scored tokens and what it was over."""

    nats: float
    n_tokens: int
    n_bytes: int

    @property
    def loss(self) -> float:
        return self.nats / self.n_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / (math.log(2) * self.n_bytes)


def _logits(session: ModelSession, ids: np.ndarray, state=None, chunk: int = PREFILL_CHUNK):
    """Per-position logits (T, V) of ids, one prefill chunk at a time (bounded memory)."""
    for logits, state in session.forward_chunks(ids, state, chunk):
        yield logits


def window_blocks(session: ModelSession, ids: np.ndarray, window: int, stride: int):
    """The window rule (module docstring): (logits of the scored positions, their targets) per block."""
    if not 1 <= stride <= window:
        raise UsageError(f"stride must be between 1 and the window ({window}), got {stride}")
    n = len(ids)
    for first in range(1, n, stride):  # first target of the block
        last = min(first + stride, n)  # one past the block's last target
        begin = max(0, last - 1 - window)  # inputs ids[begin:last-1], at most `window` of them
        inputs = ids[begin:last - 1]
        targets = ids[first:last]
        rows = np.concatenate(list(_logits(session, inputs, chunk=min(window, PREFILL_CHUNK))))
        yield rows[len(rows) - len(targets):], targets


def carried_blocks(session: ModelSession, ids: np.ndarray, window: int):
    """The whole text through the prefill graph in chunks of `window`, the state carried."""
    start = 1
    for logits in _logits(session, ids[:-1], chunk=window):
        yield logits, ids[start:start + len(logits)]
        start += len(logits)


def score_windows(session: ModelSession, ids: np.ndarray, byte_len: np.ndarray, window: int,
                  stride: int) -> Score:
    nats, n_tok, n_bytes = 0.0, 0, 0
    for rows, targets in window_blocks(session, ids, window, stride):
        nats += nll_nats(rows, targets)
        n_tok += len(targets)
        n_bytes += int(byte_len[targets].sum())
    return Score(nats, n_tok, n_bytes)


def score_carried(session: ModelSession, ids: np.ndarray, byte_len: np.ndarray, window: int) -> Score:
    nats = sum(nll_nats(logits, targets) for logits, targets in carried_blocks(session, ids, window))
    targets = ids[1:]
    return Score(nats, len(targets), int(byte_len[targets].sum()))


def divergence(reference: Bundle, bundle: Bundle, docs, threads: int | None, window: int, stride: int,
               carry_state: bool = False, max_tokens: int | None = None) -> dict | str:
    """KL(reference || bundle) and top-1 agreement over the same scored positions, both sessions
    in this process; or why they cannot be compared (a one-line reason)."""
    from itera_lite.data import encode_documents

    ids = [encode_documents(b.load_tokenizer(), docs) for b in (reference, bundle)]
    ids = [i[:max_tokens] if max_tokens is not None else i for i in ids]
    if len(ids[0]) != len(ids[1]) or not np.array_equal(*ids):
        return "its tokenizer cuts the text differently from the reference's: no per-token KL"
    ids = ids[0]
    sessions = [ModelSession(b, threads=threads) for b in (reference, bundle)]
    carried = carry_state and reference.state_kind == bundle.state_kind == "ssm"
    blocks = [carried_blocks(s, ids, window) if carried else window_blocks(s, ids, window, stride) for s in sessions]
    per_block: list[np.ndarray] = []
    agree = 0
    for (ref_rows, targets), (rows, _) in zip(*blocks):
        if ref_rows.shape[-1] != rows.shape[-1]:
            return f"vocabularies differ ({ref_rows.shape[-1]} vs {rows.shape[-1]}): no per-token KL"
        per_block.append(kl_nats(ref_rows, rows))
        agree += int((ref_rows.argmax(-1) == rows.argmax(-1)).sum())
    kl = np.concatenate(per_block)
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)), "kl_max": float(kl.max()),
            "top1_agreement": agree / len(kl), "n_positions": int(len(kl)),
            "context": "carried" if carried else f"window {window}, stride {stride}"}


def load_text(data: str, split: str | None):
    """Documents to evaluate: a corpus split (default test), or a whole file unless split is given."""
    from itera_lite.data import DataError, load_corpus, read_document

    if data == "shakespeare" or data.startswith("hf:") or split is not None:
        split = split or "test"
        corpus = load_corpus(data)
        if split not in corpus.splits:
            raise DataError(f"{data} has no {split!r} split")
        return corpus.splits[split], split
    return [read_document(data)], "all"


def first_bytes(docs, max_bytes: int):
    """The documents cut to their first max_bytes UTF-8 bytes (the separators between them
    counted), ending after the last newline within them.

    Unlike a token count, a byte count is the same text for every tokenizer, so bundles of
    different vocabularies are scored on the same text."""
    from itera_lite.data import Document
    from itera_lite.data.corpus import DOC_SEPARATOR

    sep = len(DOC_SEPARATOR.encode("utf-8"))
    kept, left = [], max_bytes
    for doc in docs:
        raw = doc.text.encode("utf-8")
        if len(raw) <= left:
            kept.append(doc)
            left -= len(raw) + sep
            if left <= 0:
                break
            continue
        head = raw[:left].decode("utf-8", "ignore")
        cut = head.rfind("\n")
        if cut >= 0:
            kept.append(Document(doc.name, head[:cut + 1]))
        break
    if not kept:
        raise UsageError(f"--max-bytes {max_bytes}: the text's first line is longer; give more bytes")
    return kept


def evaluate_bundle(bundle: Bundle, docs, threads: int | None, window: int, stride: int,
                    carry_state: bool = False, max_tokens: int | None = None,
                    retrieval: dict | None = None, retriever=None) -> tuple[Score, dict]:
    """Score one bundle on the documents; (score, details for the record's extra).

    retrieval: mix in the bundle's datastore, with these overrides of its settings
    ({"k", "lam", "temperature"}, None values keep the datastore's own).
    """
    from itera_lite.data import encode_documents
    from itera_runtime.textstream import token_byte_lengths

    tokenizer = bundle.load_tokenizer()
    ids = encode_documents(tokenizer, docs)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise UsageError("the text has fewer than 2 tokens: nothing to predict")
    byte_len = token_byte_lengths(tokenizer)
    if retriever is None and retrieval is not None:
        retriever = open_retriever(bundle, **retrieval)
    for note in retriever.notes if retriever is not None else ():
        print(f"note: {bundle.path}: {note}", file=sys.stderr)
    session = ModelSession(bundle, threads=threads, retriever=retriever)
    carried = carry_state and bundle.state_kind == "ssm"
    start = time.perf_counter_ns()
    if carried:
        score = score_carried(session, ids, byte_len, window)
    else:
        score = score_windows(session, ids, byte_len, window, stride)
    ns = time.perf_counter_ns() - start
    context = "carried" if carried else f"window {window}, stride {stride}"
    extra = {"context": context, "window": window, "stride": None if carried else stride,
             "n_tokens": score.n_tokens, "n_bytes": score.n_bytes, "eval_ns": ns,
             "text_tokens_sha256": hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest(), "retrieval": None}
    if retriever is not None:
        spec, mix = bundle.manifest.retrieval, retriever.settings
        extra["retrieval"] = {
            "k": mix.k, "k_asked": (retrieval or {}).get("k"), "lambda": mix.lam, "temperature": mix.temperature, "metric": spec.metric,
            "n_entries": spec.n_entries, "key_dtype": spec.key_dtype,
            "datastore_bytes": sum(bundle.manifest.files[f].bytes for f in (spec.keys, spec.values)),
            "us_per_position": retriever.us_per_position, "positions": retriever.positions}
    return score, extra


def quality_records(bundles: list[Bundle], threads: int | None, data: str, split: str | None,
                    window: int, stride: int | None, carry_state: bool, max_tokens: int | None,
                    reference: str | None, retrieval: dict | None = None,
                    max_bytes: int | None = None) -> list[Record]:
    """bits_per_byte, loss and perplexity rows per bundle; change vs the reference bundle.

    retrieval: settings overrides for bundles with a datastore, each then also scored with
    retrieval mixed in (None: every bundle scored as its model alone).
    """
    from tqdm import tqdm

    stride = stride or max(1, window // 2)
    for b in bundles:  # refused before any progress is shown
        b.check_context(window, f"window {window}")
    asked = [name for name, v in (retrieval or {}).items() if v is not None]
    if asked and not any(b.manifest.retrieval is not None for b in bundles):
        options = ", ".join(f"--retrieval-{'lambda' if n == 'lam' else n}" for n in asked)
        raise UsageError(f"{options}: no bundle given has a retrieval datastore "
                         f"({', '.join(str(b.path) for b in bundles)}); export one with itera-export --retrieval")
    docs, split = load_text(data, split)
    if max_bytes is not None:
        docs = first_bytes(docs, max_bytes)
    records: list[Record] = []
    scores: dict[str, Score] = {}
    runs: list[tuple[Bundle, dict | None]] = [(b, None) for b in bundles]
    if retrieval is not None:
        runs += [(b, retrieval) for b in bundles if b.manifest.retrieval is not None]
    # Datastores are loaded and checked before any progress is shown: a bad one is one line.
    retrievers = {id(b): open_retriever(b, **mix) for b, mix in runs if mix is not None}
    for b, mix in tqdm(runs, desc="quality", file=sys.stderr, leave=False):
        score, extra = evaluate_bundle(b, docs, threads, window, stride, carry_state, max_tokens, mix,
                                       retrievers.get(id(b)) if mix is not None else None)
        if mix is None:
            scores[str(b.path)] = score
        extra = {"data": data, "split": split, "max_bytes": max_bytes, **extra}
        r = extra["retrieval"]
        method = "onnxruntime prefill graph, " + extra["context"] + (
            "" if r is None else f", kNN-LM retrieval over {r['n_entries']:,} entries "
                                 f"(k={r['k']}, lambda={r['lambda']:g}, temperature={r['temperature']:.3g}, {r['metric']})")
        for metric, unit in METRICS:
            records.append(Record(kind="quality", test=f"{os.path.basename(str(data))}:{split}" + ("" if r is None else "+knn"),
                                  metric=metric,
                                  unit=unit, samples=[getattr(score, metric)], higher_is_better=False,
                                  n_threads=threads, repetitions=1, warmup=False, samples_ns=[extra["eval_ns"]],
                                  method=method, extra=dict(extra), **bundle_fields(b)))
    if reference is not None:
        ref = next((s for p, s in scores.items() if os.path.normpath(p) == os.path.normpath(reference)), None)
        for r in records:
            if ref is not None and r.metric == "bits_per_byte":
                r.extra.update(reference=reference, bits_per_byte_reference=ref.bits_per_byte,
                               bits_per_byte_delta=r.median - ref.bits_per_byte,
                               bits_per_byte_change=r.median / ref.bits_per_byte - 1)
        records += divergence_records(bundles, reference, docs, threads, window, stride, carry_state, max_tokens,
                                      test=f"{os.path.basename(str(data))}:{split}")
    stamp(records)
    return records


def divergence_records(bundles: list[Bundle], reference: str, docs, threads: int | None, window: int, stride: int,
                       carry_state: bool, max_tokens: int | None, test: str) -> list[Record]:
    """Mean and p99 KL(reference || bundle) and top-1 agreement rows for each other bundle made
    from the reference's weights (another quantization or graph set of one checkpoint): what
    the export lost. Other models are scored, not diverged."""
    ref = next(b for b in bundles if os.path.normpath(str(b.path)) == os.path.normpath(reference))
    source = lambda b: (b.manifest.source_checkpoint or {}).get("model_sha256")  # noqa: E731
    out = []
    for b in bundles:
        if b is ref:
            continue
        if source(b) is None or source(b) != source(ref):
            print(f"quality: {b.path}: not exported from the reference's checkpoint: no KL against it", file=sys.stderr)
            continue
        start = time.perf_counter_ns()
        d = divergence(ref, b, docs, threads, window, stride, carry_state, max_tokens)
        ns = time.perf_counter_ns() - start
        if isinstance(d, str):
            print(f"quality: {b.path}: {d}", file=sys.stderr)
            continue
        method = f"onnxruntime prefill graphs of both bundles in one process, {d['context']}, float64 log-softmax"
        for metric, unit, higher, key in DIVERGENCE:
            out.append(Record(kind="quality", test=test, metric=metric, unit=unit, samples=[d[key]],
                              higher_is_better=higher, n_threads=threads, repetitions=1, warmup=False,
                              samples_ns=[ns], method=method,
                              extra={"reference": reference, **d}, **bundle_fields(b)))
    return out
