"""What a bundle needs from onnxruntime, checked before any session is made.

Graphs with onnxruntime's contrib kernels (the fused SSM/MoE path, the quantized kernels)
fail to load on releases older than a kernel with an error that says neither what is needed
nor what to do. So the manifest records each graph set's contrib ops and the lowest
onnxruntime that runs them (`requires_for`); `check_requires` compares that with the
installed onnxruntime, and `choose_graph_set` picks the first set it runs.

The versions below were measured, not read from release notes: for each onnxruntime
release (last patch of every minor from 1.15, CPU wheels, Python 3.11) a throwaway venv
tried to create a session on one node of each op, cut from our exported graphs with the
attributes we emit. Re-check with (network, minutes):

    python -m itera_export.opcheck BUNDLE_FUSED BUNDLE_INT8 BUNDLE_INT4 BUNDLE_PORTABLE BASELINE_BUNDLE

An op whose first release is X.Y.Z here may also have run on an earlier patch of X.Y.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping

from .manifest import Requires

__all__ = [
    "FIRST_VERSION",
    "SESSIONS_FROM",
    "OLDEST_PROBED",
    "PROBED_VERSIONS",
    "PORTABLE_FLOOR",
    "FUSED_FLOOR",
    "KNOWN_BAD",
    "LAST_WHEEL",
    "device_onnxruntime",
    "op_key",
    "node_key",
    "registered_op",
    "parse_version",
    "installed_version",
    "available_ops",
    "requires_for",
    "check_requires",
    "refusal",
    "choose_graph_set",
]

# "domain::op" (or "ir::N", "opset::N" for the graph format) → first onnxruntime release
# whose CPU build created a session on it, among those probed (see the module docstring).
FIRST_VERSION: dict[str, str] = {
    # Graph format: IR version, default-domain opset (an Identity stamped with each).
    "ir::8": "1.15.1",
    "ir::9": "1.15.1",
    "ir::10": "1.18.1",
    "ir::11": "1.23.2",
    "ir::12": "1.24.4",
    "ir::13": "1.24.4",
    "ir::14": "1.32.0",
    "opset::17": "1.15.1",
    "opset::18": "1.15.1",
    "opset::19": "1.16.3",
    "opset::20": "1.17.3",
    "opset::21": "1.18.1",
    "opset::22": "1.21.1",
    "opset::23": "1.23.2",
    "opset::24": "1.24.4",
    "opset::25": "1.24.4",
    "opset::26": "1.25.1",
    "opset::27": "1.32.0",
    "opset::28": "1.32.0",
    # Contrib kernels (com.microsoft), with the attributes our exporters write: the fused
    # SSM/MoE path, then the quantized kernels.
    "com.microsoft::LinearAttention": "1.25.1",  # update_rule="gated"
    "com.microsoft::CausalConvWithState": "1.30.0",  # activation="silu", channels_last=1
    # dt's softplus and decay in one kernel: checked in 1.30.0 (the fused floor) and 1.32.0,
    # older releases not probed.
    "com.microsoft::LinearAttentionGate": "1.30.0",
    "com.microsoft::MoE": "1.23.2",  # swiglu_fusion=1 (1.22 has MoE but refuses these attributes)
    # The residual Add + RMSNorm of the fused graphs (export/graph_passes.py fuse_skip_rms_norms):
    # the oldest release opcheck ran it on (older ones not probed for it).
    "com.microsoft::SkipSimplifiedLayerNormalization": "1.18.1",
    "com.microsoft::QMoE": "1.28.0",  # 8- and 4-bit experts, weights_prepacked=0, per channel or blocks of 32
    # int8 activations in a decode graph's experts (export/quantize.py SETTINGS
    # moe_step_accuracy_level): 1.28.0-1.30.0 refuse the attribute ("Unrecognized attribute:
    # accuracy_level for operator QMoE"); 1.31.0 not probed.
    "com.microsoft::QMoE[accuracy_level]": "1.31.1",
    "com.microsoft::MatMulNBits": "1.17.3",  # 4 bits, block 32, accuracy_level 4
    "com.microsoft::GatherBlockQuantized": "1.22.1",  # uint8-packed 4-bit table, block 32
    "com.microsoft::DynamicQuantizeMatMul": "1.15.1",
    # The baseline's attention over a KV buffer shared by past and present (do_rotary=1 with
    # cos/sin caches, seqlens_k and total_sequence_length from the mask). Sessions are made
    # from 1.18.1, but 1.18.1 and 1.19.0 compute a prefill chunk that follows earlier tokens
    # wrong (opcheck's numeric run of a tiny baseline bundle: logits off by ~1 against 1.32.0,
    # within 1e-6 from 1.20.1), so the entry is the first release that was right (SESSIONS_FROM).
    "com.microsoft::GroupQueryAttention": "1.20.1",
    # The portable path's model-local functions (their bodies are standard ops): one call of
    # each with its function, at the model's opset 18.
    # 1.19.0 while its body's masks were boolean (1.18 has no boolean Trilu); float since stop 36
    "ai.itera::SelectiveScan": "1.18.1",
    "ai.itera::SsmStep": "1.15.1",
    "ai.itera::CausalConv1d": "1.15.1",
    "ai.itera::TopKMoE": "1.16.3",
}
# Ops whose entry above is later than the first release that made a session on them, because
# the releases between computed them wrong: {op: first release that made the session}.
# opcheck (session creation only) reports such an entry as agreeing when sessions start no
# later than this.
SESSIONS_FROM = {"com.microsoft::GroupQueryAttention": "1.18.1"}
OLDEST_PROBED = "1.15.1"  # older releases have no CPython 3.11 wheels; not probed
PROBED_VERSIONS = ("1.15.1", "1.16.3", "1.17.3", "1.18.1", "1.19.0", "1.19.2", "1.20.1", "1.21.1", "1.22.1", "1.23.2",
                   "1.24.4", "1.25.1", "1.26.0", "1.27.0", "1.28.0", "1.29.0", "1.30.0", "1.31.1", "1.32.0")
# The oldest release the portable graph set (ai.itera functions over standard ops) is installed
# and tested on: 1.19.0, the first built against numpy 2 (the graphs alone also run on 1.18.1,
# with numpy < 2). pyproject's onnxruntime floor is this, and a slow+network test runs a bundle on it.
PORTABLE_FLOOR = "1.19.0"
# The Itera-Lite fused graph set's contrib kernels; its floor is the newest of their entries
# (CausalConvWithState; a test checks the two agree).
FUSED_OPS = ("com.microsoft::LinearAttention", "com.microsoft::CausalConvWithState", "com.microsoft::MoE",
             "com.microsoft::SkipSimplifiedLayerNormalization", "com.microsoft::LinearAttentionGate")
FUSED_FLOOR = "1.30.0"
# Releases that must never be installed: pyproject's dependency excludes each (a test checks).
KNOWN_BAD = {"1.21.0": "crashes with 'Illegal instruction' on import on a Raspberry Pi 4 "
                       "(onnxruntime issues 23957, 24112, 24512)"}
# The newest onnxruntime with wheels for a Python, where that is older than the newest release:
# `pip index versions onnxruntime --python-version 310 --only-binary=:all:` for
# manylinux_2_28_aarch64 and _x86_64 said 1.23.2 on 2026-12-03 (Python 3.11: 1.32.0). So
# Ubuntu 22.04 on a Pi and JetPack 6 (Python 3.10) run the portable graph set only.
LAST_WHEEL: dict[tuple[int, ...], str] = {(3, 10): "1.23.2"}


def op_key(domain: str, op_type: str) -> str:
    """The name an op goes by in the table and in manifests: "com.microsoft::MoE"."""
    return f"{domain or 'ai.onnx'}::{op_type}"


# Attributes a later onnxruntime added to an op that older releases refuse: a node that sets
# one goes by "domain::op[attr]" in the table and in manifests (`node_key`).
LATER_ATTRIBUTES = {"com.microsoft::QMoE": ("accuracy_level",)}


def node_key(domain: str, op_type: str, attributes: Iterable[str] = ()) -> str:
    """op_key, qualified by the LATER_ATTRIBUTES the node sets: "com.microsoft::QMoE[accuracy_level]"."""
    key, present = op_key(domain, op_type), set(attributes)
    later = [a for a in LATER_ATTRIBUTES.get(key, ()) if a in present]
    return f"{key}[{','.join(later)}]" if later else key


def registered_op(key: str) -> str:
    """The op a (possibly attribute-qualified) key names, as onnxruntime registers it."""
    return key.split("[", 1)[0]


def parse_version(v: str) -> tuple[int, ...]:
    """"1.20.1" → (1, 20, 1); local or pre-release tails ("1.22.0+cu12", "1.24.0.dev1") are dropped."""
    m = re.match(r"\s*(\d+(?:\.\d+)*)", str(v))
    if not m:
        raise ValueError(f"not a version: {v!r}")
    parts = [int(p) for p in m.group(1).split(".")]
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


def installed_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def available_ops() -> set[str] | None:
    """Contrib ops (domain::op) the installed onnxruntime registers, or None when it cannot say."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    except ImportError:
        return None
    return {op_key(s.domain, s.name) for s in get_all_operator_schema() if s.domain not in ("", "ai.onnx")}


def requires_for(ops_by_graph: Mapping[str, Iterable[str]], ir_version: int | None = None,
                 opset: int | None = None, made_with: str | None = None,
                 functions: Iterable[str] = ()) -> Requires:
    """What running these graphs needs: their contrib ops and the lowest onnxruntime that has them all.

    functions: model-local functions the graphs call ("ai.itera::SelectiveScan"); they raise
    the version floor (their bodies need kernels) but are not ops onnxruntime registers.

    made_with: the onnxruntime the exporter validated with; an op (or format) the table does
    not know needs at least that one, since it is the only release known to run it.
    """
    ops = {g: sorted(set(o)) for g, o in ops_by_graph.items()}
    keys = {k for o in ops.values() for k in o} | set(functions)
    if ir_version is not None:
        keys.add(f"ir::{ir_version}")
    if opset is not None:
        keys.add(f"opset::{opset}")
    floor = parse_version(OLDEST_PROBED)
    version = OLDEST_PROBED
    for k in sorted(keys):
        first = FIRST_VERSION.get(k, made_with)
        if first is not None and parse_version(first) > floor:
            floor, version = parse_version(first), first
    return Requires(onnxruntime=version, ops=ops)


def check_requires(requires: Requires | None, ort_version: str | None = None,
                   have_ops: set[str] | None = None) -> list[str]:
    """Why this onnxruntime cannot run graphs with these requirements; empty when it can.

    ort_version: default the installed one (whose registered ops are then asked too); pass a
    device's version to check a bundle against an onnxruntime elsewhere (`itera-devices check`).
    have_ops: contrib ops that onnxruntime registers, when known; an op missing from it is a
    problem whatever the version says (a build without contrib ops).
    """
    if requires is None:  # a bundle from before `requires` existed: nothing to check
        return []
    if ort_version is None:
        ort_version = installed_version()
        if have_ops is None:
            have_ops = available_ops()
    problems = []  # (needed version, line)
    installed = parse_version(ort_version)
    ops = sorted({(op, g) for g, o in requires.ops.items() for op in o}, key=lambda x: (x[0], x[1]))
    seen = set()
    for op, graph in ops:
        if op in seen:
            continue
        first = FIRST_VERSION.get(op, requires.onnxruntime)
        missing = have_ops is not None and registered_op(op) not in have_ops
        if missing or parse_version(first) > installed:
            seen.add(op)
            graphs = sorted(g for g, o in requires.ops.items() if op in o)
            problems.append((parse_version(first), f"{op} (graphs {', '.join(graphs)}) needs onnxruntime >= {first}"))
    if not problems and parse_version(requires.onnxruntime) > installed:
        problems.append((parse_version(requires.onnxruntime),
                         f"the graphs (format, opset, functions) need onnxruntime >= {requires.onnxruntime}"))
    # The op that needs the newest release first: it is the one the upgrade is for.
    return [line for _, line in sorted(problems, key=lambda p: p[0], reverse=True)]


def refusal(where: str, requires: Requires, problems: list[str], ort_version: str | None = None,
            alternatives: Iterable[str] = ()) -> str:
    """The one line a user gets when no graph set of a bundle runs on this onnxruntime."""
    ort_version = ort_version or installed_version()
    tried = list(alternatives)
    also = f" (its {', '.join(tried)} graphs do not run here either)" if tried else ""
    more = f" (and {len(problems) - 1} more op{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    return (f"{where}: {problems[0]}{more}; installed onnxruntime is "
            f"{ort_version}{also}. Either upgrade (pip install -U \"onnxruntime>={requires.onnxruntime}\") "
            f"or use a portable bundle (itera-export --graph-set portable; Itera-Lite bundles can carry both with --graph-set both)")


def choose_graph_set(sets: Mapping[str, Requires | None], ort_version: str | None = None,
                     have_ops: set[str] | None = None) -> tuple[str | None, dict[str, list[str]]]:
    """The first graph set (in preference order) this onnxruntime runs, and every set's problems.

    Returns (name or None when none runs, {set name: problems}). ort_version / have_ops as
    for `check_requires` (default: the installed onnxruntime).
    """
    if ort_version is None:
        ort_version = installed_version()
        if have_ops is None:
            have_ops = available_ops()
    problems = {}
    for name, req in sets.items():
        problems[name] = check_requires(req, ort_version, have_ops)
        if not problems[name]:
            return name, problems
    return None, problems


if __name__ == "__main__":  # pragma: no cover - a pointer for people who look here first
    sys.exit("the table is re-checked by: python -m itera_export.opcheck BUNDLE... (needs onnx and network)")


def _graph_set_on(version: str) -> str | None:
    v = parse_version(version)
    if v >= parse_version(FUSED_FLOOR):
        return "fused"
    return "portable" if v >= parse_version(PORTABLE_FLOOR) else None


def device_onnxruntime(python: str, machine: str, installed: str | None = None, wheel: str | None = None,
                       python_bits: int = 64) -> dict:
    """Which onnxruntime a device can have and which Itera-Lite graph set that runs, from its
    Python and architecture (and what it has installed, and the wheel its pip found, if asked).

    Returns {"version", "source", "graph_set", "notes": [...], "blocker": str | None}.
    """
    notes: list[str] = []
    py = parse_version(python)[:2]
    newest = LAST_WHEEL.get(py)
    if python_bits == 32 or machine in ("armv7l", "armv6l", "i686"):
        return {"version": installed, "source": "installed" if installed else None,
                "graph_set": _graph_set_on(installed) if installed else None,
                "notes": ["PyPI has no onnxruntime wheels for 32-bit Python"], "blocker": None}
    if wheel:
        version, source = wheel, "pip index on the device"
    elif newest:
        version, source = newest, f"the newest release with Python {py[0]}.{py[1]} wheels"
    else:
        version, source = None, None
    if newest:
        notes.append(f"onnxruntime wheels for Python {py[0]}.{py[1]} stop at {newest}")
    if installed:
        version, source = installed, "installed"
    blocker = None
    if version in KNOWN_BAD:
        blocker = f"onnxruntime {version} {KNOWN_BAD[version]}: install another release"
    graph_set = _graph_set_on(version) if version else None
    if graph_set == "portable":
        best = f" (newest for Python {py[0]}.{py[1]}: {newest})" if newest and source == "installed" else ""
        notes.append(f"fused graphs need onnxruntime >= {FUSED_FLOOR}: this device runs the portable graph set"
                     + best + (" until Python 3.11 or newer is installed" if newest else ""))
    elif version and graph_set is None:
        notes.append(f"onnxruntime {version} is older than {PORTABLE_FLOOR}: no Itera-Lite graph set runs")
    return {"version": version, "source": source, "graph_set": graph_set, "notes": notes, "blocker": blocker}
