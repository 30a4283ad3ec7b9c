"""The bundle manifest as typed dataclasses: `Manifest.from_json` parses and checks, `to_json` writes.

tests/data/manifest.example.json is a manifest with every field filled in, parsed and
round-tripped by tests/test_bundle.py. Paths are relative to the bundle folder and
"/"-separated; dtypes are numpy names; a shape dim is an int or a symbolic name ("batch",
"seq", "past_sequence"). Keys this runtime does not know are kept and written back
untouched. A runtime refuses a manifest whose format_version is newer than
BUNDLE_FORMAT_VERSION; a change that old runtimes could misread must bump it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import UserError

BUNDLE_FORMAT = "itera-bundle"
# 2: prompt graphs take io.logits_start (a runtime that did not know it would not feed it).
BUNDLE_FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
FAMILIES = ("itera", "baseline", "hybrid")
STATE_KINDS = ("ssm", "kv_cache", "kv_buffer", "hybrid")
# A hybrid state names each tensor's kind: a Mamba layer's (conv, ssm) or an attention layer's
# (key, value), the latter kv_buffer-shaped buffers written in place.
HYBRID_TENSOR_KINDS = ("conv", "ssm", "key", "value")
KV_TENSOR_KINDS = ("key", "value")
KV_BUFFER_AXIS = 2  # the sequence axis of a kv_buffer tensor (batch, kv_heads, capacity, head_dim)

# Graph sets: a bundle's graphs over one weights file, "fused" (onnxruntime's contrib kernels)
# or "portable" (standard ops, older onnxruntime). A manifest that names no set has one, "default".
FUSED, PORTABLE, DEFAULT_SET = "fused", "portable", "default"
GRAPH_SETS = (FUSED, PORTABLE)
# Manifests before graph sets said `ssm_path` for the same thing (Itera-Lite only); records still do.
SSM_PATHS = {FUSED: "lowered", PORTABLE: "function"}


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
    """One carried state tensor: fed as `input`, read back from `output` after each step.

    kind: in a hybrid state, what the tensor is (HYBRID_TENSOR_KINDS); None in the other kinds.
    """

    input: str
    output: str
    dtype: str
    shape: list[int | str]
    kind: str | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str) -> StateTensor:
        d = _need(d, ("input", "output", "dtype", "shape"), where)
        kind = d.get("kind")
        if kind is not None and kind not in HYBRID_TENSOR_KINDS:
            raise BundleError(f"{where}: state tensor kind {kind!r}, expected one of {', '.join(HYBRID_TENSOR_KINDS)}")
        return cls(_str(d["input"], where), _str(d["output"], where), _dtype(d["dtype"], where),
                   _shape(d["shape"], where), kind)

    def to_dict(self) -> dict[str, Any]:
        d = {"input": self.input, "output": self.output, "dtype": self.dtype, "shape": list(self.shape)}
        return d if self.kind is None else {**d, "kind": self.kind}  # manifests of other kinds stay as they were

    @property
    def is_kv_buffer(self) -> bool:
        return self.kind in KV_TENSOR_KINDS

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
    """What a step carries to the next, fed as `input` and read back from `output` each step.

    ssm: fixed-size conv and SSM states. kv_cache: past keys/values (.., "past_sequence", ..)
    in, one position longer out. kv_buffer: (batch, kv_heads, capacity, head_dim) buffers of
    static capacity that the runtime binds as both input and output; the graph writes the
    new rows in place and reads how many are filled from attention_mask.
    """

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
        if kind == "hybrid" and any(t.kind is None for t in tensors):
            raise BundleError(f"{where}: every tensor of a hybrid state names its kind "
                              f"({', '.join(HYBRID_TENSOR_KINDS)})")
        if kind in ("kv_buffer", "hybrid"):
            for t in tensors:
                if kind == "hybrid" and not t.is_kv_buffer:
                    continue
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
        return sum(dataclasses.replace(t, shape=[*t.shape[:KV_BUFFER_AXIS], past_sequence,
                                                 *t.shape[KV_BUFFER_AXIS + 1:]]).nbytes(batch)
                   if self._is_buffer(t) else t.nbytes(batch, past_sequence)
                   for t in self.tensors)

    def _is_buffer(self, t: StateTensor) -> bool:
        return self.kind == "kv_buffer" or (self.kind == "hybrid" and t.is_kv_buffer)

    @property
    def capacity(self) -> int | None:
        """Positions a kv_buffer (or a hybrid's KV buffers) hold; None for other kinds."""
        buffers = [t for t in self.tensors if self._is_buffer(t)]
        if not buffers:
            return None
        return min(int(t.shape[KV_BUFFER_AXIS]) for t in buffers)  # ints: checked at load


@dataclass(frozen=True)
class IoNames:
    """Names of the model's well-known inputs and outputs (None: the graphs have no such input)."""

    input_ids: str = "input_ids"
    logits: str = "logits"
    attention_mask: str | None = None
    position_ids: str | None = None
    hidden: str | None = None  # final-norm output (the head's input): the query of kNN retrieval
    # int64 [1] input of the prompt graph (format 2): the first position whose logits (and hidden)
    # are computed, as a Python slice start: -1 the last only (generation), 0 every one (scoring)
    logits_start: str | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str) -> IoNames:
        d = _need(d, ("input_ids", "logits"), where)
        opt = {k: (None if d.get(k) is None else _str(d[k], where))
               for k in ("attention_mask", "position_ids", "hidden", "logits_start")}
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
    if isinstance(obj, (Retrieval, StateTensor)):
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
    """The typed manifest; `to_json` / `from_json` are the only (de)serialisation.

    `graphs` is the preferred graph set (named `graph_set`), `alt_graph_sets` the fallbacks
    over the same weights, in order; the runtime runs the first set the installed
    onnxruntime can (`requires`). `files` pins every file but the manifest by sha256 and size.
    """

    family: str
    model_config: dict[str, Any]
    vocab_size: int
    graphs: dict[str, GraphSpec]
    io: IoNames
    state: StateSpec
    tokenizer: str = "tokenizer.json"
    files: dict[str, FileEntry] = field(default_factory=dict)
    params: dict[str, int] | None = None
    graph_set: str | None = None  # name of the set in `graphs` (None: a bundle from before graph sets)
    requires: Requires | None = None  # what `graphs` needs from onnxruntime (runtime/requires.py)
    alt_graph_sets: dict[str, GraphSet] = field(default_factory=dict)
    opset: int | None = None
    custom_domains: dict[str, int] = field(default_factory=dict)
    quantization: Quantization = field(default_factory=Quantization)
    graph_checks: dict[str, dict[str, Any]] = field(default_factory=dict)  # per graph file: nodes, functions, bytes
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
        if (graph_set or DEFAULT_SET) in alts:
            raise BundleError(f"{where}: alt_graph_sets repeats the main graph set {graph_set or DEFAULT_SET!r}")
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
        return self.graph_set or DEFAULT_SET

    @property
    def ssm_path(self) -> str | None:
        """The main set in the words of manifests before graph sets: "lowered" (fused) or "function"."""
        if self.family != "itera":
            return None
        # a manifest of before graph sets names none; its ssm_path stays in `extra` as written
        return SSM_PATHS.get(self.main_set, self.extra.get("ssm_path"))

    def only_set(self, name: str) -> Manifest:
        """This manifest with one graph set, `name`, as its only one: a run that asks for that set."""
        sets = self.graph_sets()
        if name not in sets:
            raise BundleError(f"no graph set {name!r} (has: {', '.join(sets)})")
        if name == self.main_set:
            return dataclasses.replace(self, alt_graph_sets={})
        alt = self.alt_graph_sets[name]
        return dataclasses.replace(self, graph_set=name, graphs=alt.graphs, requires=alt.requires,
                                   validation=alt.validation, alt_graph_sets={})

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


