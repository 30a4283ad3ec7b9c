"""The bundle: the on-disk contract between the exporter (torch world) and the runtime.

A bundle is a folder holding `manifest.json`, `tokenizer.json`, ONNX graphs and their
external weights. The manifest is the typed `Manifest` below, with one `to_json` and one
`from_json`: the exporter builds it, `write_manifest` hashes the files and writes it, and
`load_bundle` reads and verifies it. Nothing in a bundle is pickled, and every file any
graph needs is pinned by its sha256 and size.

Manifest JSON, format_version 1 (paths are relative to the bundle folder, "/"-separated,
and may not leave it; dtypes are numpy names such as "float32", "int64"; a shape dim is an
int or a symbolic name such as "batch", "seq", "past_sequence"):

    {
      "format": "itera-bundle", "format_version": 1,
      "family": "itera" | "baseline",
      "model_config": {...},                 # architecture, as ModelConfig saved it
      "params": {"total": int, "active_per_token": int, ...} | null,
      "tokenizer": "tokenizer.json", "vocab_size": int,
      "files": {"<name>": {"sha256": "<hex>", "bytes": int}, ...},   # every file but the manifest
      "graphs": {"prefill": {"file": "prefill.onnx", "inputs": [TensorSpec], "outputs": [...],
                             "external_data": ["weights.bin"]},    # files the graph reads
                 "decode": {...}},           # prefill and decode may name the same file
      "io": {"input_ids": str, "logits": str, "attention_mask": str | null, "position_ids": str | null,
             "hidden": str | null},          # the head's input, an output only when retrieval needs it
      "state": {"kind": "ssm" | "kv_cache" | "kv_buffer",  # carried from one step to the next
                "tensors": [{"input": "past.0.conv", "output": "present.0.conv",
                             "dtype": "float32", "shape": ["batch", 384, 3]}, ...]},
                # kv_cache: past (.., "past_sequence", ..) in, present one longer out, each step.
                # kv_buffer: (batch, kv_heads, capacity, head_dim) buffers, capacity static; the
                # runtime binds one buffer as both input and output and the graph writes the new
                # rows in place; rows [0, tokens seen) are filled (the graph reads the count from
                # attention_mask). Older runtimes refuse the kind in one line.
      "ssm_path": "function" | "lowered" | null,
      "graph_set": "fused" | "portable" | "default",   # name of the set in "graphs"
      "requires": {"onnxruntime": "1.24.4",  # lowest release that runs "graphs" (runtime/requires.py)
                   "ops": {"decode": ["com.microsoft::LinearAttention", ...], ...}},  # contrib ops per graph
      "alt_graph_sets": {"portable": {"graphs": {...}, "requires": {...}}},  # fallbacks, in order
      "opset": int, "custom_domains": {"ai.itera": 1, ...},
      "quantization": {"mode": "none" | "int8" | "int4", "method": ..., "settings": {...}, ...},
      "graph_checks": {"<graph file>": {"nodes": int, "functions": int, "bytes": int}},
      "shared_weights": {"file", "tensors", "bytes", "bytes_if_inline"} | null,
      "validation": {"text", "tolerance", "max_abs_diff", "decode_top1_agreement", ...},
      "retrieval": {"keys": "retrieval/keys.npy", "values": "retrieval/values.npy",  # kNN-LM datastore
                    "n_entries", "dim", "key_dtype", "metric": "l2" | "ip", "k", "lambda", "temperature",
                    "tokenizer_sha256", "model_sha256", "source": {...}} | null,
      "versions": {...}, "created": "<ISO 8601>", "source_checkpoint": {"path", "step", "metrics"}
    }

A bundle may carry a second graph set over the same weights (`--lower dual`): "graphs" is
the preferred one (fused onnxruntime kernels), "alt_graph_sets" the fallbacks (portable
standard ops), and the runtime runs the first set the installed onnxruntime can. Bundles
written before "requires" existed load as one set with nothing to check.

Keys this runtime does not know are kept (and written back) untouched. A runtime refuses a
bundle whose format_version is newer than BUNDLE_FORMAT_VERSION; a change that old
runtimes could misread must bump it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from .errors import UserError

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST_NAME",
    "FAMILIES",
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
    "sha256_file",
    "file_entry",
    "write_manifest",
    "load_bundle",
    "is_bundle",
    "initial_state",
]

BUNDLE_FORMAT = "itera-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAMILIES = ("itera", "baseline")
STATE_KINDS = ("ssm", "kv_cache", "kv_buffer")
KV_BUFFER_AXIS = 2  # the sequence axis of a kv_buffer tensor (batch, kv_heads, capacity, head_dim)

_CHUNK = 1 << 20


class BundleError(UserError):
    """A bundle that cannot be used; the message is one line meant for the user."""


# ------------------------------------------------------------------------------- parsing


def _need(d: Any, keys: Iterable[str], where: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise BundleError(f"{where}: expected an object, got {d!r}"[:300])
    missing = [k for k in keys if k not in d]
    if missing:
        raise BundleError(f"{where}: missing {', '.join(missing)}")
    return d


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


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise BundleError(f"{where}: expected an integer, got {v!r}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise BundleError(f"{where}: expected a non-empty string, got {v!r}")
    return v


# ----------------------------------------------------------------------------- the types


@dataclass(frozen=True)
class FileEntry:
    """A file of the bundle pinned by content."""

    sha256: str
    bytes: int

    @classmethod
    def from_dict(cls, d: Any, where: str) -> FileEntry:
        d = _need(d, ("sha256", "bytes"), where)
        return cls(_str(d["sha256"], where), _int(d["bytes"], where))


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, shape with symbolic dims."""

    name: str
    dtype: str
    shape: list[int | str]

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TensorSpec:
        d = _need(d, ("name", "dtype", "shape"), where)
        return cls(_str(d["name"], where), _dtype(d["dtype"], where), _shape(d["shape"], where))


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the bundle: its file, declared inputs/outputs and the data files it reads."""

    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> GraphSpec:
        d = _need(d, ("file",), where)
        ext = d.get("external_data", [])
        if not isinstance(ext, list):
            raise BundleError(f"{where}: external_data must be a list of file names")
        return cls(
            file=_str(d["file"], where),
            inputs=[TensorSpec.from_dict(t, where) for t in d.get("inputs", [])],
            outputs=[TensorSpec.from_dict(t, where) for t in d.get("outputs", [])],
            external_data=[_str(e, where) for e in ext],
        )


@dataclass(frozen=True)
class StateTensor:
    """One carried state tensor: fed as `input`, read back from `output` after each step."""

    input: str
    output: str
    dtype: str
    shape: list[int | str]

    @classmethod
    def from_dict(cls, d: Any, where: str) -> StateTensor:
        d = _need(d, ("input", "output", "dtype", "shape"), where)
        return cls(_str(d["input"], where), _str(d["output"], where), _dtype(d["dtype"], where),
                   _shape(d["shape"], where))

    def nbytes(self, batch: int = 1, past_sequence: int = 0) -> int:
        """Bytes of this tensor at a batch size and KV-cache length (other symbolic dims: error)."""
        dims = {"batch": batch, "past_sequence": past_sequence}
        n = 1
        for d in self.shape:
            if isinstance(d, str) and d not in dims:
                raise BundleError(f"state {self.input}: cannot size symbolic dim {d!r}")
            n *= dims[d] if isinstance(d, str) else d
        return n * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class StateSpec:
    """What a step carries to the next: a fixed-size SSM state or a growing KV cache."""

    kind: str | None = None
    tensors: list[StateTensor] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> StateSpec:
        if d is None:
            return cls()
        d = _need(d, (), where)
        kind = d.get("kind")
        if kind is not None and kind not in STATE_KINDS:
            raise BundleError(f"{where}.kind is {kind!r}, expected one of {', '.join(STATE_KINDS)}")
        tensors = [StateTensor.from_dict(t, where) for t in d.get("tensors", [])]
        if kind == "kv_buffer":
            for t in tensors:
                cap = t.shape[KV_BUFFER_AXIS] if len(t.shape) == 4 else None
                if not isinstance(cap, int) or cap < 1:
                    raise BundleError(f"{where}: kv_buffer tensor {t.input} must be (batch, kv_heads, capacity, "
                                      f"head_dim) with a fixed capacity, got {t.shape}")
        return cls(kind, tensors)

    def nbytes(self, batch: int = 1, past_sequence: int = 0) -> int:
        """Bytes of the whole carried state after `past_sequence` tokens (KV) or at any depth (SSM).

        A kv_buffer counts its filled rows: the rest of the buffer is zero pages that were
        never written, which the OS does not back with memory.
        """
        if self.kind == "kv_buffer":
            return sum(dataclasses.replace(t, shape=[*t.shape[:KV_BUFFER_AXIS], past_sequence,
                                                     *t.shape[KV_BUFFER_AXIS + 1:]]).nbytes(batch)
                       for t in self.tensors)
        return sum(t.nbytes(batch, past_sequence) for t in self.tensors)

    @property
    def capacity(self) -> int | None:
        """Positions a kv_buffer holds (None for other kinds)."""
        if self.kind != "kv_buffer" or not self.tensors:
            return None
        return min(int(t.shape[KV_BUFFER_AXIS]) for t in self.tensors)  # ints: checked at load


@dataclass(frozen=True)
class IoNames:
    """Names of the model's well-known inputs and outputs."""

    input_ids: str = "input_ids"
    logits: str = "logits"
    attention_mask: str | None = None
    position_ids: str | None = None
    hidden: str | None = None  # final-norm output (the head's input): the query of kNN retrieval

    @classmethod
    def from_dict(cls, d: Any, where: str) -> IoNames:
        d = _need(d, ("input_ids", "logits"), where)
        opt = {k: (None if d.get(k) is None else _str(d[k], where))
               for k in ("attention_mask", "position_ids", "hidden")}
        return cls(_str(d["input_ids"], where), _str(d["logits"], where), **opt)


@dataclass(frozen=True)
class Quantization:
    """How the graphs were quantized ("none" for fp32); settings are the method's own."""

    mode: str = "none"
    method: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    bytes_before: int | None = None
    bytes_after: int | None = None
    nodes_quantized: int | None = None
    # The exporter's short decode of this bundle next to its fp32 source on the exporting
    # machine: tokens_per_s, fp32_tokens_per_s, ratio, slower, threads, tokens, rounds.
    decode_vs_fp32: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Quantization:
        if d is None:
            return cls()
        d = _need(d, ("mode",), where)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Validation:
    """The exporter's check of the written bundle against torch (worst absolute differences)."""

    text: str
    max_abs_diff: float
    tolerance: float | None = None
    reference_scale: float | None = None  # largest |torch value| compared; fp32 tolerance scales with it
    prefill_logits: float | None = None
    prefill_state: float | None = None
    decode_logits: float | None = None
    decode_steps: int = 0
    decode_top1_agreement: float | None = None
    # Next-token loss on the validation text in bits per UTF-8 byte, through the bundle and
    # through torch: what quantization costs in quality, comparable across vocabularies.
    bits_per_byte: float | None = None
    bits_per_byte_torch: float | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Validation | None:
        if d is None:
            return None
        d = _need(d, ("text", "max_abs_diff"), where)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


RETRIEVAL_METRICS = ("l2", "ip")


def _number(v: Any, where: str, low: float, high: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= low and (high is None or v <= high)):
        raise BundleError(f"{where}: expected a number in [{low}, {high if high is not None else 'inf'}], got {v!r}")
    return float(v)


@dataclass(frozen=True)
class Retrieval:
    """A kNN-LM datastore in the bundle: keys (hidden states) → values (next token), and how to mix.

    The runtime mixes p = lam·p_knn + (1 − lam)·p_model, p_knn = softmax over the k nearest
    keys of −distance/temperature, summed per value token (`itera_runtime.retrieval`).
    tokenizer_sha256 / model_sha256 say which tokenizer and weights made the keys: the
    runtime refuses a datastore whose tokenizer is not the bundle's own or whose model is
    not the bundle's source (source_checkpoint.model_sha256).
    """

    keys: str
    values: str
    n_entries: int
    dim: int
    key_dtype: str
    metric: str
    k: int
    lam: float
    temperature: float
    tokenizer_sha256: str
    model_sha256: str
    source: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Retrieval | None:
        if d is None:
            return None
        d = _need(d, ("keys", "values", "n_entries", "dim", "key_dtype", "metric", "k", "lambda", "temperature",
                      "tokenizer_sha256", "model_sha256"), where)
        if d["metric"] not in RETRIEVAL_METRICS:
            raise BundleError(f"{where}.metric is {d['metric']!r}, expected one of {', '.join(RETRIEVAL_METRICS)}")
        k = _int(d["k"], f"{where}.k")
        if k < 1:
            raise BundleError(f"{where}.k must be >= 1, got {k}")
        return cls(_str(d["keys"], where), _str(d["values"], where), _int(d["n_entries"], f"{where}.n_entries"),
                   _int(d["dim"], f"{where}.dim"), _dtype(d["key_dtype"], where), d["metric"], k,
                   _number(d["lambda"], f"{where}.lambda", 0.0, 1.0),
                   _number(d["temperature"], f"{where}.temperature", 1e-9),
                   _str(d["tokenizer_sha256"], where), _str(d["model_sha256"], where), dict(d.get("source") or {}))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["lambda"] = d.pop("lam")  # "lambda" is the name the literature uses; a keyword in Python
        return d


@dataclass(frozen=True)
class Requires:
    """What a graph set needs from onnxruntime: the lowest release, and its contrib ops per graph."""

    onnxruntime: str
    ops: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Requires | None:
        if d is None:
            return None
        d = _need(d, ("onnxruntime",), where)
        if not isinstance(d["onnxruntime"], str) or not re.match(r"\d+(\.\d+)*", d["onnxruntime"]):
            raise BundleError(f"{where}: onnxruntime must be a version such as \"1.19.0\", got {d['onnxruntime']!r}")
        ops = d.get("ops", {})
        if not isinstance(ops, Mapping) or not all(isinstance(v, list) for v in ops.values()):
            raise BundleError(f"{where}: ops must map graph names to lists of op names")
        return cls(_str(d["onnxruntime"], where), {str(k): [_str(o, where) for o in v] for k, v in ops.items()})


@dataclass(frozen=True)
class GraphSet:
    """An alternative set of the bundle's graphs (same io and state, other ops) and its needs."""

    graphs: dict[str, GraphSpec]
    requires: Requires | None = None
    validation: Validation | None = None  # the exporter's check of these graphs against torch

    @classmethod
    def from_dict(cls, d: Any, where: str) -> GraphSet:
        d = _need(d, ("graphs",), where)
        graphs = d["graphs"]
        if not isinstance(graphs, Mapping) or not graphs:
            raise BundleError(f"{where}: \"graphs\" must name at least one graph")
        return cls({str(k): GraphSpec.from_dict(v, f"{where}.graphs.{k}") for k, v in graphs.items()},
                   Requires.from_dict(d.get("requires"), f"{where}.requires"),
                   Validation.from_dict(d.get("validation"), f"{where}.validation"))


def _plain(obj: Any) -> Any:
    """Dataclasses → dicts recursively (dataclasses.asdict would also copy unknown dicts)."""
    if isinstance(obj, Retrieval):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


@dataclass
class Manifest:
    """The typed manifest; `to_json` / `from_json` are the only (de)serialisation."""

    family: str
    model_config: dict[str, Any]
    vocab_size: int
    graphs: dict[str, GraphSpec]
    io: IoNames
    state: StateSpec
    tokenizer: str = "tokenizer.json"
    files: dict[str, FileEntry] = field(default_factory=dict)
    params: dict[str, int] | None = None
    ssm_path: str | None = None
    graph_set: str | None = None  # name of the set in `graphs` (None: a bundle from before dual sets)
    requires: Requires | None = None
    alt_graph_sets: dict[str, GraphSet] = field(default_factory=dict)
    opset: int | None = None
    custom_domains: dict[str, int] = field(default_factory=dict)
    quantization: Quantization = field(default_factory=Quantization)
    graph_checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    shared_weights: dict[str, Any] | None = None
    validation: Validation | None = None
    retrieval: Retrieval | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    created: str | None = None
    source_checkpoint: dict[str, Any] | None = None
    format: str = BUNDLE_FORMAT
    format_version: int = BUNDLE_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys of newer writers, kept as they are

    def to_dict(self) -> dict[str, Any]:
        d = _plain(self)
        extra = d.pop("extra")
        return {**extra, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any], where: str = MANIFEST_NAME) -> Manifest:
        """Parse and check a manifest; any problem is a one-line BundleError naming `where`."""
        if isinstance(text, str):
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise BundleError(f"{where}: not valid JSON ({e})") from None
        else:
            d = dict(text)
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected a JSON object")
        _check_header(d, where)
        _need(d, ("model_config", "graphs", "io", "tokenizer", "vocab_size"), where)
        graphs = d["graphs"]
        if not isinstance(graphs, Mapping) or not graphs:
            raise BundleError(f"{where}: \"graphs\" must name at least one graph")
        files = d.get("files")
        if not isinstance(files, Mapping) or not files:
            raise BundleError(f"{where}: \"files\" must map file names to {{sha256, bytes}}")
        if not isinstance(d["model_config"], Mapping):
            raise BundleError(f"{where}: model_config must be an object")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        graph_set = d.get("graph_set")
        if graph_set is not None:
            graph_set = _str(graph_set, f"{where}: graph_set")
        alts = d.get("alt_graph_sets")
        alts = {} if alts is None else _need(alts, (), f"{where}: alt_graph_sets")
        if (graph_set or "default") in alts:
            raise BundleError(f"{where}: alt_graph_sets repeats the main graph set {graph_set or 'default'!r}")
        return cls(
            format=d["format"],
            format_version=d["format_version"],
            family=d["family"],
            model_config=dict(d["model_config"]),
            vocab_size=_int(d["vocab_size"], f"{where}: vocab_size"),
            tokenizer=_str(d["tokenizer"], f"{where}: tokenizer"),
            files={str(k): FileEntry.from_dict(v, f"{where}: files.{k}") for k, v in files.items()},
            graphs={str(k): GraphSpec.from_dict(v, f"{where}: graphs.{k}") for k, v in graphs.items()},
            io=IoNames.from_dict(d["io"], f"{where}: io"),
            state=StateSpec.from_dict(d.get("state"), f"{where}: state"),
            params=d.get("params"),
            ssm_path=d.get("ssm_path"),
            graph_set=graph_set,
            requires=Requires.from_dict(d.get("requires"), f"{where}: requires"),
            alt_graph_sets={str(k): GraphSet.from_dict(v, f"{where}: alt_graph_sets.{k}") for k, v in alts.items()},
            opset=d.get("opset"),
            custom_domains=dict(d.get("custom_domains") or {}),
            quantization=Quantization.from_dict(d.get("quantization"), f"{where}: quantization"),
            graph_checks=dict(d.get("graph_checks") or {}),
            shared_weights=d.get("shared_weights"),
            validation=Validation.from_dict(d.get("validation"), f"{where}: validation"),
            retrieval=Retrieval.from_dict(d.get("retrieval"), f"{where}: retrieval"),
            versions=dict(d.get("versions") or {}),
            created=d.get("created"),
            source_checkpoint=d.get("source_checkpoint"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def referenced_files(self) -> list[tuple[str, str]]:
        """(what refers to it, file name) for every file the runtime will open."""
        refs = [("tokenizer", self.tokenizer)]
        for set_name, graphs in self.graph_sets().items():
            prefix = "graphs" if set_name == self.main_set else f"alt_graph_sets.{set_name}.graphs"
            for name, g in graphs.items():
                refs.append((f"{prefix}.{name}", g.file))
                refs += [(f"{prefix}.{name}.external_data", e) for e in g.external_data]
        if self.retrieval is not None:
            refs += [("retrieval.keys", self.retrieval.keys), ("retrieval.values", self.retrieval.values)]
        return refs

    @property
    def main_set(self) -> str:
        """Name of the graph set in `graphs` ("default" for bundles that do not name it)."""
        return self.graph_set or "default"

    def graph_sets(self) -> dict[str, dict[str, GraphSpec]]:
        """Every graph set, preferred first: {set name: {graph name: GraphSpec}}."""
        return {self.main_set: self.graphs, **{k: v.graphs for k, v in self.alt_graph_sets.items()}}

    def set_requires(self) -> dict[str, Requires | None]:
        """What each graph set needs from onnxruntime, preferred first."""
        return {self.main_set: self.requires, **{k: v.requires for k, v in self.alt_graph_sets.items()}}

    @property
    def total_bytes(self) -> int:
        """Bytes on disk of every file of the bundle (the manifest itself aside)."""
        return sum(f.bytes for f in self.files.values())


def _check_header(d: Mapping[str, Any], where: str) -> None:
    fmt = d.get("format")
    if fmt != BUNDLE_FORMAT:
        raise BundleError(f"{where}: format is {fmt!r}, expected {BUNDLE_FORMAT!r}")
    version = d.get("format_version")
    if version is None:
        raise BundleError(f"{where}: format_version is missing")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BundleError(f"{where}: format_version must be a positive integer, got {version!r}")
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{where}: bundle format version {version} is newer than this itera-runtime "
            f"supports ({BUNDLE_FORMAT_VERSION}); upgrade itera-lite"
        )
    family = d.get("family")
    if family not in FAMILIES:
        raise BundleError(f"{where}: family is {family!r}, expected one of {', '.join(FAMILIES)}")


# ------------------------------------------------------------------------------- files


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

    @property
    def tokenizer_path(self) -> Path:
        return _safe_member(self.path, self.manifest.tokenizer, str(self.manifest_path))

    @property
    def io(self) -> IoNames:
        return self.manifest.io

    @property
    def graph_names(self) -> list[str]:
        return list(self.manifest.graphs)

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
