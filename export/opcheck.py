"""Re-measure `itera_runtime.requires.FIRST_VERSION`: which onnxruntime release first runs each op.

    python -m itera_export.opcheck BUNDLE... [--versions 1.20.1,1.24.4] [--venvs /tmp/ortv]

For every onnxruntime version (default: the last patch of each minor on the package index
from the table's oldest to the newest), a throwaway venv gets `onnxruntime==V` and numpy
only (`pip install --no-deps`), and tries to create a CPU session on:
- one single-node graph per contrib op, cut out of the given bundles' graphs with the
  attributes and input types our exporters emit (plus hand-made nodes for the contrib ops
  `EXTRA_PROBES` names, which no bundle given may hold);
- every graph file of the given bundles whole (the portable floor is a whole-graph fact:
  IR version, opset, model-local functions).
Session creation is the test because onnxruntime resolves kernels (and checks their
attributes) there: "not a registered function/op" and "could not find an implementation"
both fail it. A baseline bundle's KV-buffer graph is also run (NUMERIC_SCRIPT) and its logits
compared with the installed onnxruntime's; its set's row counts that run too. It prints each op's first version and whether the table agrees, and exits 1
when it does not. Needs network (pip) and minutes; the slow+network test runs a subset.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from itera_runtime.bundle import load_bundle
from itera_runtime.requires import FIRST_VERSION, SESSIONS_FROM, node_key, op_key, parse_version

from .graph_passes import all_nodes
from .graphfile import graph_functions, graph_ops

# The probe each venv runs: onnxruntime and numpy only, so it works on any version.
PROBE_SCRIPT = r"""
import json, sys, onnxruntime as ort
out = {"version": ort.__version__, "results": {}}
for path in sys.argv[1:]:
    try:
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        out["results"][path] = "ok"
    except Exception as e:
        lines = str(e).strip().splitlines()
        out["results"][path] = (lines[0] if lines else type(e).__name__)[:300]
print(json.dumps(out))
"""

# A baseline graph over a KV buffer, run the way the runtime runs it (buffers bound as past and
# present; two prompt chunks, the second after the first, then single tokens): its logits,
# saved for comparison with the installed onnxruntime's. Session creation is not enough here:
# GroupQueryAttention made sessions on releases that computed the second chunk wrong.
NUMERIC_SCRIPT = r"""
import json, sys, numpy as np, onnxruntime as ort
path, out, io = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
shapes = {i.name: [1 if not isinstance(d, int) else d for d in i.shape] for i in sess.get_inputs()}
values = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shapes[i], np.float32)) for i, _ in io["state"]]
ids = np.random.default_rng(0).integers(0, 256, 16)  # byte-level: every vocab has 256 ids
pos, logits = 0, []
for chunk in (ids[:5], ids[5:12], *(ids[i:i + 1] for i in range(12, 16))):
    b = sess.io_binding()
    b.bind_cpu_input(io["input_ids"], chunk[None].astype(np.int64))
    b.bind_cpu_input(io["attention_mask"], np.ones((1, pos + len(chunk)), np.int64))
    for name, value in io.get("fixed", {}).items():  # every position's logits (io.logits_start = 0)
        b.bind_cpu_input(name, np.array(value, np.int64))
    b.bind_output(io["logits"], "cpu")
    for (i, o), v in zip(io["state"], values):
        b.bind_ortvalue_input(i, v)
        b.bind_ortvalue_output(o, v)
    sess.run_with_iobinding(b)
    logits.append(b.get_outputs()[0].numpy()[0])
    pos += len(chunk)
np.save(out, np.concatenate(logits))
"""
NUMERIC_TOLERANCE = 1e-4

PROBE_IR_VERSION = 8  # loadable by every onnxruntime we probe, so only the op is tested
PROBE_OPSET = 13


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return {v.name: v.type for v in [*g.value_info, *g.input, *g.output]}


def _single_node_model(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                       types: dict[str, onnx.TypeProto], source: onnx.ModelProto) -> onnx.ModelProto:
    """`node` alone: initializers it reads kept, every other input a graph input of its inferred type.

    A call of a model-local function (ai.itera) keeps that function and the model's opsets,
    so the probe tests the standard ops of its body.
    """
    inputs, initializers = [], []
    for name in node.input:
        if not name:
            continue
        if name in inits:
            initializers.append(inits[name])
        else:
            vi = onnx.ValueInfoProto(name=name)
            if name in types:
                vi.type.CopyFrom(types[name])
            else:  # written by a contrib op onnx cannot infer (LinearAttentionGate): float, any shape
                vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            inputs.append(vi)
    outputs = []
    for name in node.output:
        if not name:
            continue
        vi = onnx.ValueInfoProto(name=name)
        if name in types:
            vi.type.CopyFrom(types[name])
        outputs.append(vi)
    graph = helper.make_graph([node], f"probe_{node.op_type}", inputs, outputs, initializer=initializers)
    functions = [f for f in source.functions if (f.domain, f.name) == (node.domain, node.op_type)]
    if functions:
        return helper.make_model(graph, opset_imports=list(source.opset_import), ir_version=PROBE_IR_VERSION,
                                 functions=functions)
    opsets = [helper.make_opsetid("", PROBE_OPSET)]
    if node.domain not in ("", "ai.onnx"):
        opsets.append(helper.make_opsetid(node.domain, 1))
    return helper.make_model(graph, opset_imports=opsets, ir_version=PROBE_IR_VERSION)


def probes_from_graph(path: Path) -> dict[str, onnx.ModelProto]:
    """One single-node model per contrib op and model-local function of a graph file (first node of each)."""
    model = onnx.load(str(path))  # with external data: the probes carry real weights
    wanted = set(graph_ops(model)) | set(graph_functions(model))
    types = _value_types(model)
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in all_nodes(model.graph.node):  # If branches too: a probe reads their outer-scope values
        key = node_key(node.domain, node.op_type, [a.name for a in node.attribute])
        if key in wanted and key not in out:
            out[key] = _single_node_model(node, inits, types, model)
    return out


def _tensor(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def extra_probes() -> dict[str, onnx.ModelProto]:
    """Hand-made nodes for contrib ops a bundle may use that the given bundles need not hold."""
    ms = "com.microsoft"
    rng = np.random.default_rng(0)
    probes = {}
    # DynamicQuantizeMatMul: fp32 activations × int8 weights (what ORT fuses MatMulInteger into).
    node = helper.make_node("DynamicQuantizeMatMul", ["a", "b", "b_scale", "b_zp"], ["y"], domain=ms)
    inits = [numpy_helper.from_array(rng.integers(-8, 8, (16, 8), dtype=np.int8), "b"),
             numpy_helper.from_array(np.array(0.1, np.float32), "b_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "b_zp")]
    graph = helper.make_graph([node], "probe", [_tensor("a", TensorProto.FLOAT, [1, 16])],
                              [_tensor("y", TensorProto.FLOAT, [1, 8])], initializer=inits)
    probes[op_key(ms, "DynamicQuantizeMatMul")] = graph
    # GatherBlockQuantized: a 4-bit (uint8-packed) embedding table, blocks of 32 along the row.
    node = helper.make_node("GatherBlockQuantized", ["data", "ids", "scales"], ["y"], domain=ms,
                            gather_axis=0, quantize_axis=1, block_size=32)
    inits = [numpy_helper.from_array(rng.integers(0, 255, (16, 32), dtype=np.uint8), "data"),
             numpy_helper.from_array(np.full((16, 2), 0.1, np.float32), "scales")]
    graph = helper.make_graph([node], "probe", [_tensor("ids", TensorProto.INT64, [1, 3])],
                              [_tensor("y", TensorProto.FLOAT, [1, 3, 64])], initializer=inits)
    probes[op_key(ms, "GatherBlockQuantized")] = graph
    out = {k: helper.make_model(g, ir_version=PROBE_IR_VERSION,
                                opset_imports=[helper.make_opsetid("", PROBE_OPSET), helper.make_opsetid(ms, 1)])
           for k, g in probes.items()}
    # The graph format alone: an Identity stamped with each IR version and default opset.
    for key, ir, opset in [*((f"ir::{i}", i, PROBE_OPSET) for i in range(8, onnx.IR_VERSION + 1)),
                           *((f"opset::{o}", PROBE_IR_VERSION, o) for o in range(17, onnx.defs.onnx_opset_version() + 1))]:
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                                  [_tensor("x", TensorProto.FLOAT, [1])], [_tensor("y", TensorProto.FLOAT, [1])])
        opsets = [helper.make_opsetid("", opset)]
        out[key] = helper.make_model(graph, opset_imports=opsets,
                                     ir_version=max(ir, helper.find_min_ir_version_for(opsets)))
    return out


def index_versions(python: str = sys.executable) -> list[str]:
    """The last patch release of every onnxruntime minor on the package index."""
    out = subprocess.run([python, "-m", "pip", "index", "versions", "onnxruntime"], capture_output=True,
                         text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("Available versions:"))
    versions = [v.strip() for v in line.split(":", 1)[1].split(",")]
    last: dict[tuple, str] = {}
    for v in versions:
        minor = parse_version(v)[:2]
        if minor not in last or parse_version(v) > parse_version(last[minor]):
            last[minor] = v
    return sorted(last.values(), key=parse_version)


def venv_python(version: str, root: Path) -> Path:
    """A venv with onnxruntime==version and numpy only, made once under root."""
    venv = root / version
    python = venv / "bin" / "python"
    if (venv / "ok").exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    # numpy 2 needs onnxruntime >= 1.19 (the first release built against it).
    numpy = "numpy<2" if parse_version(version) < (1, 19) else "numpy>=2"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", f"onnxruntime=={version}", numpy,
                    "packaging"], check=True)
    (venv / "ok").touch()
    return python


def run_probe(python: Path, paths: list[Path]) -> dict:
    """Session creation on each path under that python's onnxruntime: {path: "ok" | first error line}."""
    proc = subprocess.run([str(python), "-c", PROBE_SCRIPT, *map(str, paths)], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"version": None, "results": {str(p): f"probe failed: {first}" for p in paths}}
    return json.loads(proc.stdout)


def run_numeric(python: Path, path: Path, io: dict, out: Path) -> np.ndarray | str:
    """A KV-buffer graph's logits under that python's onnxruntime, or the first error line."""
    proc = subprocess.run([str(python), "-c", NUMERIC_SCRIPT, str(path), str(out), json.dumps(io)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return np.load(out)


def first_versions(results: dict[str, dict[str, str]], versions: list[str]) -> dict[str, str | None]:
    """Per probe, the oldest version from which every newer probed version created the session."""
    out = {}
    for name, by_version in results.items():
        first = None
        for v in sorted(versions, key=parse_version, reverse=True):
            if by_version.get(v) != "ok":
                break
            first = v
        out[name] = first
    return out


def consistent(first: str, by_version: dict[str, str]) -> bool:
    """True when exactly the probed releases >= `first` ran the probe (any subset of releases works)."""
    return all((parse_version(v) >= parse_version(first)) == (r == "ok") for v, r in by_version.items())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundles", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--versions", default=None, help="comma-separated onnxruntime versions [default: last patch of "
                                               "every minor on the index, from 1.15]")
@click.option("--venvs", type=click.Path(path_type=Path), default=None,
              help="folder to keep the per-version venvs in [default: a temp folder, removed]")
@click.option("--json", "as_json", is_flag=True, help="print every probe's result per version as JSON")
def main(bundles, versions, venvs, as_json):
    """Find the first onnxruntime that runs each contrib op (and each graph of BUNDLES); compare to the table."""
    with tempfile.TemporaryDirectory(prefix="itera-opcheck-") as tmp:
        tmp = Path(tmp)
        root = venvs or tmp / "venvs"
        root.mkdir(parents=True, exist_ok=True)
        probes = dict(extra_probes())
        whole: dict[str, Path] = {}
        claimed: dict[str, str | None] = {}  # bundle:set → the onnxruntime its manifest requires
        numeric: dict[str, tuple[Path, dict]] = {}  # bundle:set:numeric → KV-buffer graph and its io names
        for b in bundles:
            bundle = load_bundle(b)
            for set_name, graphs in bundle.manifest.graph_sets().items():
                req = bundle.manifest.set_requires()[set_name]
                claimed[f"{b.name}:{set_name}"] = req.onnxruntime if req else None
                if bundle.manifest.state.kind == "kv_buffer":
                    m = bundle.manifest
                    numeric[f"{b.name}:{set_name}:numeric"] = (bundle.path / graphs["prefill"].file, {
                        "input_ids": m.io.input_ids, "attention_mask": m.io.attention_mask, "logits": m.io.logits,
                        "state": [[t.input, t.output] for t in m.state.tensors],
                        "fixed": {k: v.tolist() for k, v in bundle.position_feeds("prefill", set_name).items()}})
                for gname, spec in graphs.items():
                    path = bundle.path / spec.file
                    whole[f"{b.name}:{set_name}:{gname}"] = path
                    for key, model in probes_from_graph(path).items():
                        probes.setdefault(key, model)
        paths: dict[str, Path] = dict(whole)
        for key, model in probes.items():
            path = tmp / f"{key.replace('::', '.')}.onnx"
            onnx.save_model(model, str(path))
            paths[key] = path
        wanted = versions.split(",") if versions else [v for v in index_versions() if parse_version(v) >= (1, 15)]
        results: dict[str, dict[str, str]] = {name: {} for name in [*paths, *numeric]}
        reference = {name: run_numeric(Path(sys.executable), path, io, tmp / "reference.npy")
                     for name, (path, io) in numeric.items()}
        for v in wanted:
            click.echo(f"· onnxruntime {v}", err=True)
            python = venv_python(v, root)
            got = run_probe(python, list(paths.values()))["results"]
            for name, path in paths.items():
                results[name][v] = got.get(str(path), "not run")
            for name, (path, io) in numeric.items():
                logits, ref = run_numeric(python, path, io, tmp / "logits.npy"), reference[name]
                if isinstance(ref, str) or isinstance(logits, str):
                    results[name][v] = f"not compared: {ref if isinstance(ref, str) else logits}"
                    continue
                diff = float(np.abs(logits - ref).max())
                results[name][v] = "ok" if diff <= NUMERIC_TOLERANCE else f"logits differ by {diff:.3g}"
        whole.update({name: path for name, (path, _) in numeric.items()})
    firsts = first_versions(results, wanted)
    if as_json:
        click.echo(json.dumps({"versions": wanted, "results": results, "first": firsts}, indent=2))
    disagree = 0
    for name in sorted(firsts):
        table = FIRST_VERSION.get(name)
        note = ""
        if name in probes:
            ok = table is not None and consistent(table, results[name])
            if not ok and name in SESSIONS_FROM:
                # Raised by a numeric check: sessions start at SESSIONS_FROM, before the table's release.
                ok = consistent(SESSIONS_FROM[name], results[name])
            note = "agrees" if ok else f"TABLE SAYS {table}"
            disagree += not ok
        click.echo(f"{name:45s} first runs on {firsts[name] or 'none probed'}  {note}", err=as_json)
    # A graph set's recorded requirement must split the probed releases the way its graphs did.
    for key, table in sorted(claimed.items()):
        graphs = [results[name] for name in whole if name.rsplit(":", 1)[0] == key]
        together = {v: "ok" if all(r[v] == "ok" for r in graphs) else "fails" for v in wanted}
        ok = table is not None and consistent(table, together)
        disagree += not ok
        first = first_versions({key: together}, wanted)[key]
        click.echo(f"{key:45s} all graphs run from {first or 'none probed'}  "
                   f"{'agrees' if ok else f'MANIFEST SAYS {table}'}", err=as_json)
    sys.exit(1 if disagree else 0)


if __name__ == "__main__":
    main()
