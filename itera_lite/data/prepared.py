"""Tokenizer and prepared ids: a byte-level BPE trained on the train split, every split encoded
to a flat ``.bin`` of token ids (cached by content), and the windows cut out of those ids.

``prepare_data`` trains the tokenizer on train only, encodes every split (documents joined
with ``DOC_SEPARATOR``) and caches the result; ``get_batch`` / ``iter_eval_batches`` cut
windows out of the ids.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from .corpus import DOC_SEPARATOR, SPLITS, DataError, Document, publish_dir, cache_dir, load_corpus

# Bump when the on-disk layout or the encoding of prepared data changes: old caches are
# then rebuilt instead of being read with the wrong assumptions.
DATA_FORMAT_VERSION = 1


# ------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with no special tokens; vocab_size 256 means bytes only (no merges)."""
    if vocab_size < 256:
        raise DataError(f"vocab_size must be at least 256 (the byte alphabet), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # No prefix space and no normaliser: decode(encode(text)) must give back text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _chunks(docs: list[Document], target_chars: int = 1 << 20) -> Iterator[str]:
    """The split's joined text in pieces of about target_chars, cut after a newline."""
    # Pieces let encode_batch use every core on a single huge document. A seam can
    # tokenise differently from the whole text, but decoding stays exact.
    for i, doc in enumerate(docs):
        text = doc.text if i == len(docs) - 1 else doc.text + DOC_SEPARATOR
        start = 0
        while len(text) - start > target_chars:
            cut = text.find("\n", start + target_chars)
            if cut == -1:
                break
            yield text[start:cut + 1]
            start = cut + 1
        if start < len(text):
            yield text[start:]


def _encode_split(tokenizer: Tokenizer, docs: list[Document], dtype: np.dtype, out: Path,
                  desc: str, progress: bool = True) -> tuple[int, int]:
    """Write the split's token ids to ``out``; return (n_tokens, n_bytes)."""
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    n_bytes += len(DOC_SEPARATOR.encode("utf-8")) * max(0, len(docs) - 1)
    n_tokens = 0
    batch: list[str] = []
    with open(out, "wb") as f, tqdm(total=n_bytes, unit="B", unit_scale=True, desc=desc,
                                    file=sys.stderr, leave=False, disable=not progress) as bar:

        def flush() -> None:
            nonlocal n_tokens
            for enc in tokenizer.encode_batch(batch):
                np.asarray(enc.ids, dtype=dtype).tofile(f)
                n_tokens += len(enc.ids)
            bar.update(sum(len(p.encode("utf-8")) for p in batch))
            batch.clear()

        for piece in _chunks(docs):
            batch.append(piece)
            if len(batch) >= 64:
                flush()
        flush()
    return n_tokens, n_bytes


# --------------------------------------------------------------------- prepared data


@dataclass(frozen=True)
class PreparedData:
    """A prepared folder: tokenizer.json, meta.json and one <split>.bin of ids per split."""

    path: Path
    tokenizer: Tokenizer
    tokenizer_json: str
    meta: dict

    @classmethod
    def load(cls, path: str | Path) -> PreparedData:
        """Open a folder written by prepare_data."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
            tokenizer_json = (path / "tokenizer.json").read_text()
        except (OSError, ValueError):
            raise DataError(f"{path} is not a prepared data folder (run prepare_data)") from None
        if meta.get("format_version") != DATA_FORMAT_VERSION:
            raise DataError(f"{path} was prepared by another version; prepare it again")
        return cls(path, Tokenizer.from_str(tokenizer_json), tokenizer_json, meta)

    @property
    def vocab_size(self) -> int:
        """Number of tokens the tokenizer actually has (at most the requested size)."""
        return self.tokenizer.get_vocab_size()

    def split(self, name: str) -> np.ndarray:
        """The split's token ids, memory-mapped read-only."""
        if self.n_tokens(name) == 0:  # np.memmap refuses empty files
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(self.path / f"{name}.bin", dtype=self.meta["dtype"], mode="r")

    def n_tokens(self, name: str) -> int:
        """Tokens in the split."""
        return self.meta["splits"][name]["n_tokens"]

    def n_bytes(self, name: str) -> int:
        """UTF-8 bytes of the split's joined text, the denominator of bits per byte."""
        return self.meta["splits"][name]["n_bytes"]


def _default_out_dir(corpus_name: str, vocab_size: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", corpus_name).strip("_")[-48:] or "corpus"
    key = hashlib.sha256(f"{corpus_name}|{vocab_size}|{DATA_FORMAT_VERSION}".encode())
    return cache_dir() / "prepared" / f"{safe}-v{vocab_size}-{key.hexdigest()[:10]}"


def prepare_data(spec: str = "shakespeare", vocab_size: int = 2048,
                 out_dir: str | Path | None = None, progress: bool = True) -> PreparedData:
    """Load a corpus, train the tokenizer on train, encode all splits; cached by content.

    out_dir defaults to <cache>/prepared/<spec>-v<vocab>-<hash>. A folder whose meta.json
    records the same format version, vocab size and corpus fingerprint is reused as is.
    """
    corpus = load_corpus(spec)
    fingerprint = corpus.fingerprint()
    out = Path(out_dir) if out_dir is not None else _default_out_dir(corpus.name, vocab_size)
    if (out / "meta.json").is_file():
        try:
            cached = PreparedData.load(out)
        except DataError:
            cached = None
        if (cached is not None and cached.meta.get("requested_vocab_size") == vocab_size
                and cached.meta.get("corpus_sha256") == fingerprint):
            return cached

    tokenizer = train_tokenizer((doc.text for doc in corpus.splits["train"]), vocab_size)
    actual_vocab = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16 if actual_vocab <= 1 << 16 else np.uint32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        tokenizer.save(str(tmp / "tokenizer.json"))
        splits = {}
        for split in SPLITS:
            docs = corpus.splits[split]
            n_tokens, n_bytes = _encode_split(tokenizer, docs, dtype, tmp / f"{split}.bin",
                                              desc=f"encode {split}", progress=progress)
            splits[split] = {"n_tokens": n_tokens, "n_bytes": n_bytes,
                             "documents": [doc.name for doc in docs]}
        meta = {"format_version": DATA_FORMAT_VERSION, "spec": spec, "corpus": corpus.name,
                "corpus_sha256": fingerprint, "requested_vocab_size": vocab_size,
                "vocab_size": actual_vocab, "dtype": dtype.name,
                "doc_separator": DOC_SEPARATOR, "splits": splits}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData.load(out)


def encode_documents(tokenizer: Tokenizer, docs: list[Document]) -> np.ndarray:
    """Ids of the documents joined with DOC_SEPARATOR, encoded exactly as prepare_data encodes a split.

    Used by torch-free evaluation (itera-bench quality), so a bundle is scored on the same
    ids training evaluated on; this package imports no torch.
    """
    pieces = list(_chunks(docs))
    if not pieces:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(pieces)])


# -------------------------------------------------------------------------- batches


def get_batch(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int,
              rank: int = 0, world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random windows for one training step: int64 x, y of shape (batch_size, seq_len).

    The offsets are a pure function of (seed, step): no RNG state to checkpoint, so a
    resumed run sees exactly the batches it would have seen. The global batch of
    batch_size * world_size rows is drawn once and each rank takes its own slice, so the
    data of a step does not depend on how it is sharded.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if len(tokens) <= seq_len:
        raise DataError(f"only {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    rng = np.random.default_rng([seed, step])
    offsets = rng.integers(0, len(tokens) - seq_len, size=batch_size * world_size)
    offsets = offsets[rank * batch_size:(rank + 1) * batch_size]
    windows = tokens[offsets[:, None] + np.arange(seq_len + 1)].astype(np.int64)  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


def iter_eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                      max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Contiguous non-overlapping windows from the start; every token predicted once.

    The last batch may have fewer rows, so weight batch losses by rows when averaging.
    """
    n_windows = (len(tokens) - 1) // seq_len
    for i, start in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        rows = min(batch_size, n_windows - start)
        span = np.asarray(tokens[start * seq_len:(start + rows) * seq_len + 1], dtype=np.int64)
        yield (span[:-1].reshape(rows, seq_len),  # (B, T)
               span[1:].reshape(rows, seq_len))
