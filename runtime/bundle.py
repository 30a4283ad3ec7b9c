"""The bundle: the on-disk contract between the exporter (torch world) and the runtime.

A bundle is a folder holding `manifest.json`, `tokenizer.json` and one or more ONNX graphs.
The exporter writes it with `write_manifest` (from this module, so both sides share one
definition); the runtime reads and verifies it with `load_bundle`. Nothing in a bundle is
pickled, and every file is pinned by its sha256 and size.

Manifest schema, format_version 1 (paths are relative to the bundle folder, "/"-separated,
and may not leave it; dtypes are numpy names such as "float32", "int64"; a shape dim is an
int or a symbolic name such as "batch", "sequence", "past_sequence"):

    {
      "format": "itera-bundle",
      "format_version": 1,
      "family": "itera" | "baseline",
      "model_config": {...},                 # architecture, as ModelConfig saved it
      "tokenizer": "tokenizer.json",         # HF tokenizers file
      "vocab_size": int,
      "files": {                             # every file of the bundle but the manifest
        "tokenizer.json": {"sha256": "<hex>", "bytes": int},
        "decode.onnx": {"sha256": "<hex>", "bytes": int},
        ...
      },
      "graphs": {                            # each "file" must also be listed in "files"
        "prefill": {"file": "prefill.onnx",
                    "inputs":  [{"name": str, "dtype": str, "shape": [int | str, ...]}, ...],
                    "outputs": [...]},
        "decode":  {"file": "decode.onnx", "inputs": [...], "outputs": [...]}
      },                                     # prefill and decode may name the same file
      "io": {"input_ids": "input_ids", "logits": "logits",
             "attention_mask": null | "attention_mask",
             "position_ids": null | "position_ids"},
      "state": {"kind": "ssm" | "kv_cache",  # carried from one step to the next
                "tensors": [{"input": "past.0.conv", "output": "present.0.conv",
                             "dtype": "float32", "shape": ["batch", 384, 3]},
                            ...]},           # KV cache: ["batch", 4, "past_sequence", 32]
      "ssm_path": "function" | "lowered" | null,
      "opset": int,
      "custom_domains": {"ai.itera": 1, ...},
      "quantization": {"mode": "none" | "int8" | "int4", ...},
      "versions": {...}, "validation": {...}, "created": "<ISO 8601>",
      "source_checkpoint": {...}
    }

A runtime refuses a bundle whose format_version is newer than BUNDLE_FORMAT_VERSION; a
change that old runtimes could misread must bump it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST_NAME",
    "BundleError",
    "TensorSpec",
    "StateSpec",
    "GraphSpec",
    "Bundle",
    "sha256_file",
    "file_entry",
    "write_manifest",
    "load_bundle",
    "initial_state",
]

BUNDLE_FORMAT = "itera-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAMILIES = ("itera", "baseline")
STATE_KINDS = ("ssm", "kv_cache")

_CHUNK = 1 << 20


class BundleError(Exception):
    """A bundle that cannot be used; the message is one line meant for the user."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, shape with symbolic dims."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class StateSpec:
    """One carried state tensor: fed as `input`, read back from `output` after each step."""

    input: str
    output: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the bundle (absolute file path) and its declared inputs/outputs."""

    file: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest entry of one file: {"sha256": hex, "bytes": size}."""
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def _safe_member(root: Path, name: Any, where: str) -> Path:
    """Resolve a manifest path inside `root`, refusing anything that could leave it."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"{where}: file name must be a non-empty string, got {name!r}")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name or Path(name).is_absolute():
        raise BundleError(f"{where}: file path {name!r} escapes the bundle folder; refused")
    path = root / rel
    # Also catch a symlink inside the bundle pointing out of it.
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise BundleError(f"{where}: file path {name!r} escapes the bundle folder; refused") from None
    return path


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash the files named in manifest["files"] and write manifest.json atomically.

    manifest["files"] may be a list of relative names or a dict keyed by them; it is
    replaced by {name: file_entry}. Returns the (mutated) manifest.
    """
    root = Path(directory)
    names = manifest.get("files", [])
    names = list(names.keys()) if isinstance(names, Mapping) else list(names)
    files = {}
    for name in sorted(names):
        path = _safe_member(root, name, str(root / MANIFEST_NAME))
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but not found")
        files[name] = file_entry(path)
    manifest["files"] = files
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".manifest.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, root / MANIFEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return manifest


def _tensor_spec(d: Any, where: str) -> TensorSpec:
    if not isinstance(d, Mapping) or not {"name", "dtype", "shape"} <= d.keys():
        raise BundleError(f"{where}: each tensor needs name, dtype and shape, got {d!r}")
    return TensorSpec(str(d["name"]), _dtype(d["dtype"], where), _shape(d["shape"], where))


def _dtype(name: Any, where: str) -> str:
    try:
        np.dtype(name)
    except (TypeError, ValueError):
        raise BundleError(f"{where}: unknown dtype {name!r}") from None
    return str(name)


def _shape(shape: Any, where: str) -> list[int | str]:
    if not isinstance(shape, list) or not all(
        isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
        for d in shape
    ):
        raise BundleError(f"{where}: shape must be a list of ints and names, got {shape!r}")
    return list(shape)


@dataclass
class Bundle:
    """A loaded (and, by default, verified) bundle folder."""

    path: Path
    manifest: dict[str, Any]

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    @property
    def format_version(self) -> int:
        return int(self.manifest["format_version"])

    @property
    def family(self) -> str:
        """"itera" (SSM+MoE) or "baseline" (transformer with KV cache)."""
        return self.manifest["family"]

    @property
    def model_config(self) -> dict[str, Any]:
        return self.manifest.get("model_config", {})

    @property
    def vocab_size(self) -> int | None:
        return self.manifest.get("vocab_size")

    @property
    def tokenizer_path(self) -> Path:
        return _safe_member(self.path, self.manifest["tokenizer"], str(self.manifest_path))

    @property
    def io(self) -> dict[str, str | None]:
        """Names of the model's well-known inputs/outputs (input_ids, logits, ...)."""
        return dict(self.manifest.get("io", {}))

    @property
    def graph_names(self) -> list[str]:
        return list(self.manifest.get("graphs", {}))

    def graph(self, name: str) -> GraphSpec:
        """The graph called `name` ("prefill", "decode", ...)."""
        graphs = self.manifest.get("graphs", {})
        if name not in graphs:
            have = ", ".join(graphs) or "none"
            raise BundleError(f"{self.manifest_path}: no graph {name!r} (has: {have})")
        g = graphs[name]
        where = f"{self.manifest_path}: graphs.{name}"
        if not isinstance(g, Mapping) or "file" not in g:
            raise BundleError(f"{where}: needs a \"file\"")
        return GraphSpec(
            file=_safe_member(self.path, g["file"], where),
            inputs=[_tensor_spec(t, where) for t in g.get("inputs", [])],
            outputs=[_tensor_spec(t, where) for t in g.get("outputs", [])],
        )

    @property
    def state_kind(self) -> str | None:
        """"ssm", "kv_cache", or None for a stateless graph."""
        return (self.manifest.get("state") or {}).get("kind")

    @property
    def state(self) -> list[StateSpec]:
        """The tensors carried between steps, in manifest order."""
        where = f"{self.manifest_path}: state"
        specs = []
        for t in (self.manifest.get("state") or {}).get("tensors", []):
            if not isinstance(t, Mapping) or not {"input", "output", "dtype", "shape"} <= t.keys():
                raise BundleError(f"{where}: each tensor needs input, output, dtype, shape; got {t!r}")
            specs.append(
                StateSpec(str(t["input"]), str(t["output"]), _dtype(t["dtype"], where), _shape(t["shape"], where))
            )
        return specs

    @property
    def quantization(self) -> str:
        return (self.manifest.get("quantization") or {}).get("mode", "none")


def _read_manifest(root: Path) -> dict[str, Any]:
    if not root.exists():
        raise BundleError(f"{root}: bundle not found")
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory (a bundle is a folder with {MANIFEST_NAME})")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"{root}: no {MANIFEST_NAME}; not an itera bundle")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: expected a JSON object")
    return manifest


def _check_header(mpath: Path, manifest: Mapping[str, Any]) -> None:
    fmt = manifest.get("format")
    if fmt != BUNDLE_FORMAT:
        raise BundleError(f"{mpath}: format is {fmt!r}, expected {BUNDLE_FORMAT!r}")
    version = manifest.get("format_version")
    if version is None:
        raise BundleError(f"{mpath}: format_version is missing")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BundleError(f"{mpath}: format_version must be a positive integer, got {version!r}")
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{mpath}: bundle format version {version} is newer than this itera-runtime "
            f"supports ({BUNDLE_FORMAT_VERSION}); upgrade itera-lite"
        )
    family = manifest.get("family")
    if family not in FAMILIES:
        raise BundleError(f"{mpath}: family is {family!r}, expected one of {', '.join(FAMILIES)}")
    kind = (manifest.get("state") or {}).get("kind")
    if kind is not None and kind not in STATE_KINDS:
        raise BundleError(f"{mpath}: state.kind is {kind!r}, expected one of {', '.join(STATE_KINDS)}")


def _check_files(root: Path, manifest: Mapping[str, Any], verify: bool) -> None:
    mpath = root / MANIFEST_NAME
    files = manifest.get("files")
    if not isinstance(files, Mapping) or not files:
        raise BundleError(f"{mpath}: \"files\" must map file names to {{sha256, bytes}}")
    for name, entry in files.items():
        path = _safe_member(root, name, str(mpath))
        if not path.is_file():
            raise BundleError(f"{path}: missing (listed in {MANIFEST_NAME})")
        if not isinstance(entry, Mapping) or "sha256" not in entry or "bytes" not in entry:
            raise BundleError(f"{mpath}: files.{name} needs sha256 and bytes")
        if not verify:
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(
                f"{path}: size mismatch, {size} bytes but manifest says {entry['bytes']} "
                "(file changed after export?)"
            )
        if sha256_file(path) != entry["sha256"]:
            raise BundleError(f"{path}: sha256 mismatch (file changed after export?)")

    # Every file the runtime will open must be pinned by a hash.
    tok = manifest.get("tokenizer")
    if tok is None:
        raise BundleError(f"{mpath}: \"tokenizer\" is missing")
    referenced = [("tokenizer", tok)]
    graphs = manifest.get("graphs")
    if not isinstance(graphs, Mapping) or not graphs:
        raise BundleError(f"{mpath}: \"graphs\" must name at least one graph")
    for gname, g in graphs.items():
        if not isinstance(g, Mapping) or "file" not in g:
            raise BundleError(f"{mpath}: graphs.{gname} needs a \"file\"")
        referenced.append((f"graphs.{gname}", g["file"]))
    for key, name in referenced:
        _safe_member(root, name, str(mpath))
        if name not in files:
            raise BundleError(f"{mpath}: {key} names {name!r}, which is not listed in \"files\"")


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read a bundle folder and check it against its manifest.

    verify: also check each file's size and sha256 (reads every byte once); with False
    only presence and paths are checked.
    Raises BundleError with a one-line message on any problem.
    """
    root = Path(path)
    manifest = _read_manifest(root)
    _check_header(root / MANIFEST_NAME, manifest)
    _check_files(root, manifest, verify)
    bundle = Bundle(path=root, manifest=manifest)
    # Parse the specs now so that a malformed entry fails at load, not mid-generation.
    for name in bundle.graph_names:
        bundle.graph(name)
    _ = bundle.state
    return bundle


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
