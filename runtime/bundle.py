"""The bundle folder: `manifest.json`, `tokenizer.json`, ONNX graphs and their external weights.

`write_manifest` hashes the files and writes the manifest atomically; `load_bundle` reads it
and checks every file against it. Nothing in a bundle is pickled, and every file any graph
needs is pinned by its sha256 and size. The manifest's types are in `manifest.py`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .errors import UsageError

# The manifest's names, importable from here as from their home: the bundle is what users open.
from .manifest import (BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, DEFAULT_SET, FAMILIES, FUSED, GRAPH_SETS,
                       KV_BUFFER_AXIS, MANIFEST_NAME, PORTABLE, RETRIEVAL_METRICS, STATE_KINDS, BundleError, FileEntry, GraphSet, GraphSpec, IoNames,
                       Manifest, Quantization, Requires, Retrieval, StateSpec, StateTensor, TensorSpec, Validation)

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST_NAME",
    "FAMILIES",
    "STATE_KINDS",
    "KV_BUFFER_AXIS",
    "FUSED",
    "PORTABLE",
    "DEFAULT_SET",
    "GRAPH_SETS",
    "RETRIEVAL_METRICS",
    "BundleError",
    "FileEntry",
    "TensorSpec",
    "GraphSpec",
    "StateTensor",
    "StateSpec",
    "IoNames",
    "Quantization",
    "Validation",
    "Retrieval",
    "Requires",
    "GraphSet",
    "Manifest",
    "Bundle",
    "ContextError",
    "sha256_file",
    "file_entry",
    "write_manifest",
    "load_bundle",
    "is_bundle",
    "initial_state",
]

_CHUNK = 1 << 20


class ContextError(UsageError):
    """More tokens of context than the model was built for; one line."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: str | os.PathLike) -> FileEntry:
    """The manifest entry of one file."""
    return FileEntry(sha256=sha256_file(path), bytes=os.path.getsize(path))


def _safe_member(root: Path, name: Any, where: str, what: str = "the bundle folder") -> Path:
    """Resolve a manifest path inside `root`, refusing anything that could leave it."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"{where}: file name must be a non-empty string, got {name!r}")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name or Path(name).is_absolute():
        raise BundleError(f"{where}: file path {name!r} escapes {what}; refused")
    path = root / rel
    # Also catch a symlink inside the bundle pointing out of it.
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise BundleError(f"{where}: file path {name!r} escapes {what}; refused") from None
    return path


def _public_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o644 & ~umask


def write_manifest(directory: str | os.PathLike, manifest: Manifest, names: Iterable[str] | None = None) -> Manifest:
    """Hash the bundle's files and write manifest.json atomically; returns the manifest.

    names: the files to list (default: every file the manifest refers to, plus those it
    already lists). Referenced files must all be listed.
    """
    root = Path(directory)
    where = str(root / MANIFEST_NAME)
    wanted = set(names) if names is not None else set(manifest.files)
    wanted |= {name for _, name in manifest.referenced_files()}
    files = {}
    for name in sorted(wanted):
        path = _safe_member(root, name, where)
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but not found")
        files[name] = file_entry(path)
    manifest.files = files
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{MANIFEST_NAME}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600; a bundle is meant to be copied to other users and devices.
        os.chmod(tmp, _public_mode())
        os.replace(tmp, root / MANIFEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return manifest


# ------------------------------------------------------------------------------- loading


@dataclass
class Bundle:
    """A loaded (and, by default, verified) bundle folder."""

    path: Path
    manifest: Manifest

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    @functools.cached_property
    def sha256(self) -> str:
        """The bundle's identity: sha256 of its manifest.json, which pins every other file's sha256."""
        return sha256_file(self.manifest_path)

    @property
    def format_version(self) -> int:
        return self.manifest.format_version

    @property
    def family(self) -> str:
        """"itera" (SSM+MoE) or "baseline" (transformer with KV cache)."""
        return self.manifest.family

    @property
    def model_config(self) -> dict[str, Any]:
        return self.manifest.model_config

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def max_seq_len(self) -> int | None:
        """Longest context the model was built for (None: no limit, as for the SSM)."""
        return self.manifest.model_config.get("max_seq_len")

    def fits(self, n_tokens: int) -> bool:
        """Whether `n_tokens` of context fit the model (always, for the SSM)."""
        limit = self.max_seq_len
        return not limit or n_tokens <= limit

    def check_context(self, n_tokens: int, what: str) -> None:
        """Refuse `what` (how the `n_tokens` add up, e.g. "depth 2048 + 65 tokens") beyond max_seq_len."""
        if not self.fits(n_tokens):
            raise ContextError(f"{self.path}: {what} exceeds the model's context (max_seq_len {self.max_seq_len})")

    @property
    def tokenizer_path(self) -> Path:
        return _safe_member(self.path, self.manifest.tokenizer, str(self.manifest_path))

    @property
    def io(self) -> IoNames:
        return self.manifest.io

    @property
    def graph_names(self) -> list[str]:
        return list(self.manifest.graphs)

    def with_graph_set(self, name: str) -> Bundle:
        """This bundle with its graph set `name` as the only one (every session of it runs that set)."""
        try:
            return Bundle(self.path, self.manifest.only_set(name))
        except BundleError as e:
            raise BundleError(f"{self.manifest_path}: {e}") from None

    def graph(self, name: str, graph_set: str | None = None) -> GraphSpec:
        """The graph called `name` ("prefill", "decode", ...) of a graph set (default: the preferred one)."""
        sets = self.manifest.graph_sets()
        graph_set = graph_set or self.manifest.main_set
        if graph_set not in sets:
            raise BundleError(f"{self.manifest_path}: no graph set {graph_set!r} (has: {', '.join(sets)})")
        graphs = sets[graph_set]
        if name not in graphs:
            raise BundleError(f"{self.manifest_path}: no graph {name!r} (has: {', '.join(graphs) or 'none'})")
        return graphs[name]

    def position_feeds(self, name: str, graph_set: str | None = None, last_only: bool = False) -> dict[str, np.ndarray]:
        """What graph `name` must be fed to say which positions' logits it computes: {} for a graph
        without io.logits_start (every position, as before format 2), else that input at -1
        (`last_only`: the last position, what generation reads) or 0 (every position)."""
        start = self.io.logits_start
        if start is None or all(t.name != start for t in self.graph(name, graph_set).inputs):
            return {}
        return {start: np.array([-1 if last_only else 0], dtype=np.int64)}

    def graph_path(self, name: str, graph_set: str | None = None) -> Path:
        """Absolute path of the graph called `name` (of a graph set, default the preferred one)."""
        return _safe_member(self.path, self.graph(name, graph_set).file, f"{self.manifest_path}: graphs.{name}")

    @property
    def state_kind(self) -> str | None:
        """"ssm", "kv_cache", "kv_buffer", or None for a stateless graph."""
        return self.manifest.state.kind

    @property
    def state(self) -> list[StateTensor]:
        """The tensors carried between steps, in manifest order."""
        return self.manifest.state.tensors

    @property
    def quantization(self) -> str:
        return self.manifest.quantization.mode

    @property
    def size_bytes(self) -> int:
        return self.manifest.total_bytes

    def load_tokenizer(self):
        """The bundle's tokenizer, checked to fit the model's vocabulary."""
        from tokenizers import Tokenizer

        path = self.tokenizer_path
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"{path}: not a readable tokenizer ({reason[:160]})") from None
        if tok.get_vocab_size() > self.vocab_size:
            raise BundleError(f"{self.path}: tokenizer has {tok.get_vocab_size()} ids, more than the "
                              f"model's vocab_size {self.vocab_size} (manifest edited?)")
        return tok


def is_bundle(path: str | os.PathLike) -> bool:
    """True when `path` is a folder whose manifest says it is a bundle of ours."""
    mpath = Path(path) / MANIFEST_NAME
    try:
        d = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("format") == BUNDLE_FORMAT


def _read_manifest(root: Path) -> Manifest:
    if not root.exists():
        raise BundleError(f"{root}: bundle not found")
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory (a bundle is a folder with {MANIFEST_NAME})")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"{root}: no {MANIFEST_NAME}; not an itera bundle")
    try:
        text = mpath.read_text(encoding="utf-8")
    except PermissionError:
        raise BundleError(f"{mpath}: permission denied (not readable by this user)") from None
    except UnicodeDecodeError as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from None
    return Manifest.from_json(text, str(mpath))


def _check_files(root: Path, manifest: Manifest, verify: bool) -> None:
    mpath = str(root / MANIFEST_NAME)
    for name, entry in manifest.files.items():
        path = _safe_member(root, name, mpath)
        if not path.is_file():
            raise BundleError(f"{path}: missing (listed in {MANIFEST_NAME})")
        if not os.access(path, os.R_OK):
            raise BundleError(f"{path}: permission denied (not readable by this user)")
        if not verify:
            continue
        size = path.stat().st_size
        if size != entry.bytes:
            raise BundleError(f"{path}: size mismatch, {size} bytes but manifest says {entry.bytes} "
                              "(file changed after export?)")
        try:
            digest = sha256_file(path)
        except PermissionError:
            raise BundleError(f"{path}: permission denied (not readable by this user)") from None
        if digest != entry.sha256:
            raise BundleError(f"{path}: sha256 mismatch (file changed after export?)")
    # Every file the runtime (or onnxruntime, for external data) will open is pinned.
    for key, name in manifest.referenced_files():
        _safe_member(root, name, mpath)
        if name not in manifest.files:
            raise BundleError(f"{mpath}: {key} names {name!r}, which is not listed in \"files\"")


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read a bundle folder and check it against its manifest.

    verify: also check each file's size and sha256 (reads every byte once); with False
    only presence and paths are checked. Raises BundleError with a one-line message.
    """
    root = Path(path)
    manifest = _read_manifest(root)
    _check_files(root, manifest, verify)
    return Bundle(path=root, manifest=manifest)


def initial_state(bundle: Bundle, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero state for the first step, keyed by graph input name.

    "batch" becomes `batch`; any other symbolic dim (past_sequence) becomes 0, i.e. an
    empty KV cache.
    """
    return {
        s.input: np.zeros(
            [batch if d == "batch" else 0 if isinstance(d, str) else d for d in s.shape],
            dtype=np.dtype(s.dtype),
        )
        for s in bundle.state
    }
