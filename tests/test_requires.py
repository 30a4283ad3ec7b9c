"""What a bundle needs from onnxruntime: `requires` computed from the graphs, the one-line
refusal when the installed onnxruntime lacks it, and dual bundles that fall back to their
portable graphs. The slow+network tests install other onnxruntime releases into venvs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from itera_runtime import BundleError, Generator, SamplingConfig, load_bundle
from itera_runtime import requires as req
from itera_runtime.bundle import Manifest, Requires, write_manifest
from itera_runtime.cli import main as run_main
from itera_runtime.session import ModelSession

GREEDY = SamplingConfig(temperature=0)
ROOT = Path(__file__).resolve().parents[1]
FUSED_OPS = {"com.microsoft::LinearAttention", "com.microsoft::CausalConvWithState", "com.microsoft::MoE",
             "com.microsoft::SkipSimplifiedLayerNormalization", "com.microsoft::LinearAttentionGate"}


def _fused_here() -> bool:
    have = req.available_ops() or set()
    return FUSED_OPS <= have


needs_fused = pytest.mark.skipif(not _fused_here(), reason="this onnxruntime has no fused SSM/MoE kernels")


def _pyproject_floor() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return next(re.search(r'>=([\d.]+)', line)[1] for line in text.splitlines() if '"onnxruntime>=' in line)


# ----------------------------------------------------------------------------- the table


def test_table_versions_parse_and_portable_floor_is_the_install_floor():
    for key, version in req.FIRST_VERSION.items():
        assert "::" in key and req.parse_version(version) >= req.parse_version(req.OLDEST_PROBED), key
    # The exporters' contrib ops are all in the table (an unknown op would pin bundles to
    # the exporting onnxruntime).
    for op in [*FUSED_OPS, "com.microsoft::QMoE", "com.microsoft::MatMulNBits"]:
        assert op in req.FIRST_VERSION, op
    assert req.PORTABLE_FLOOR == _pyproject_floor()


def test_parse_version_orders_releases():
    assert req.parse_version("1.20.1") < req.parse_version("1.22.0+cu12") < req.parse_version("1.24")
    assert req.parse_version("1.24.0.dev20250101") == (1, 24, 0)
    with pytest.raises(ValueError):
        req.parse_version("latest")


def test_check_requires_names_the_op_and_the_version():
    first = req.FIRST_VERSION["com.microsoft::LinearAttention"]
    r = Requires(onnxruntime=first, ops={"decode": ["com.microsoft::LinearAttention"], "prefill": []})
    older = ".".join(map(str, (req.parse_version(first)[0], req.parse_version(first)[1] - 1, 0)))
    problems = req.check_requires(r, older, have_ops=set())
    assert problems == [f"com.microsoft::LinearAttention (graphs decode) needs onnxruntime >= {first}"]
    assert req.check_requires(r, first, have_ops=FUSED_OPS) == []
    # Registered ops decide even when the version looks new enough (a build without contrib ops).
    assert req.check_requires(r, "99.0.0", have_ops=set())
    assert req.check_requires(None, older, have_ops=set()) == []  # bundles from before `requires`


def test_an_attribute_older_releases_refuse_raises_the_floor_of_its_graph_only():
    # QMoE with accuracy_level (int8 activations, the quantized decode graphs) needs a later
    # release than QMoE itself; the key names the attribute, the check asks the registry for
    # the op.
    assert req.node_key("com.microsoft", "QMoE", ["k", "block_size"]) == "com.microsoft::QMoE"
    key = req.node_key("com.microsoft", "QMoE", ["k", "accuracy_level"])
    assert key == "com.microsoft::QMoE[accuracy_level]" and req.registered_op(key) == "com.microsoft::QMoE"
    assert req.node_key("com.microsoft", "MatMulNBits", ["accuracy_level"]) == "com.microsoft::MatMulNBits"
    plain, later = req.FIRST_VERSION["com.microsoft::QMoE"], req.FIRST_VERSION[key]
    assert req.parse_version(later) > req.parse_version(plain)
    r = req.requires_for({"decode": [key], "prefill": ["com.microsoft::QMoE"]})
    assert r.onnxruntime == later
    problems = req.check_requires(r, plain, have_ops={"com.microsoft::QMoE"})
    assert problems == [f"{key} (graphs decode) needs onnxruntime >= {later}"]
    assert req.check_requires(r, later, have_ops={"com.microsoft::QMoE"}) == []
    assert req.check_requires(r, later, have_ops=set())  # not registered at all


def test_requires_for_takes_the_newest_need():
    r = req.requires_for({"decode": ["com.microsoft::MoE"], "prefill": ["com.microsoft::MatMulNBits"]},
                         ir_version=10, opset=18)
    needed = max((req.FIRST_VERSION[k] for k in ("com.microsoft::MoE", "com.microsoft::MatMulNBits",
                                                   "ir::10", "opset::18")), key=req.parse_version)
    assert r.onnxruntime == needed
    # An op the table does not know needs the onnxruntime the exporter ran.
    assert req.requires_for({"decode": ["com.example::New"]}, made_with="7.1.0").onnxruntime == "7.1.0"


# --------------------------------------------------------------------- bundles and graphs


def test_requires_recomputed_from_the_graphs_equals_the_manifest(tiny_itera, tiny_baseline):
    pytest.importorskip("onnx")
    from itera_export.exporter import graphs_requires

    for tb in (tiny_itera, tiny_baseline):
        m = load_bundle(tb.bundle).manifest
        for set_name, graphs in m.graph_sets().items():
            assert m.set_requires()[set_name] == graphs_requires(tb.bundle, graphs), (tb.family, set_name)
    m = load_bundle(tiny_itera.bundle).manifest
    if _fused_here():
        assert list(m.graph_sets()) == ["fused", "portable"]
        assert set(m.requires.ops["decode"]) == FUSED_OPS
        assert m.alt_graph_sets["portable"].requires.ops == {"decode": [], "prefill": []}
        # its graphs' own floor (IR 10, the scan's function); the install floor can only be later
        assert m.alt_graph_sets["portable"].requires.onnxruntime == req.FIRST_VERSION["ir::10"]
        assert req.parse_version(req.FIRST_VERSION["ir::10"]) <= req.parse_version(req.PORTABLE_FLOOR)
        assert m.alt_graph_sets["portable"].validation.max_abs_diff < 1e-4
    gqa = ["com.microsoft::GroupQueryAttention"]
    assert load_bundle(tiny_baseline.bundle).manifest.requires.ops == {"decode": gqa, "prefill": gqa}


@needs_fused
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_decode_graph_needs_the_release_that_takes_int8_expert_activations(mode, tiny_itera_exports):
    pytest.importorskip("onnx")
    from itera_export.exporter import graphs_requires

    tb = tiny_itera_exports[mode]
    m = load_bundle(tb.bundle).manifest
    later = "com.microsoft::QMoE[accuracy_level]"
    assert later in m.requires.ops["decode"] and "com.microsoft::QMoE" not in m.requires.ops["decode"]
    assert later not in m.requires.ops["prefill"]
    # int8 prompt experts are routed to DynamicQuantizeMatMul (export/route_experts.py); int4 keep QMoE.
    assert ("com.microsoft::QMoE" in m.requires.ops["prefill"]) == (mode == "int4")
    assert m.requires.onnxruntime == req.FIRST_VERSION[later]
    for set_name, graphs in m.graph_sets().items():
        assert m.set_requires()[set_name] == graphs_requires(tb.bundle, graphs), (mode, set_name)
    # An onnxruntime before that release is told which op and release in one line.
    problems = req.check_requires(m.requires, "1.30.0", have_ops=req.available_ops())
    assert problems == [f"{later} (graphs decode) needs onnxruntime >= {req.FIRST_VERSION[later]}"]


@needs_fused
def test_dual_bundle_shares_weights_and_adds_only_graph_files(tiny_itera):
    m = load_bundle(tiny_itera.bundle).manifest
    graph_files = {g.file for graphs in m.graph_sets().values() for g in graphs.values()}
    assert graph_files == {"prefill.onnx", "decode.onnx", "prefill.portable.onnx", "decode.portable.onnx"}
    assert {e for graphs in m.graph_sets().values() for g in graphs.values() for e in g.external_data} == \
        {"weights.bin"}
    # The portable set reads the fused layout: the weights file holds each parameter once.
    from itera_lite.checkpoint import load_model
    from itera_lite.models import count_params

    model, _ = load_model(tiny_itera.checkpoint)
    assert m.files["weights.bin"].bytes <= 1.02 * 4 * count_params(model)["total"]


@needs_fused
def test_dual_bundle_picks_fused_here_and_portable_when_the_ops_are_missing(tiny_itera, monkeypatch):
    bundle = load_bundle(tiny_itera.bundle)
    fused = Generator(bundle, threads=1)
    assert fused.session.graph_set == "fused"
    prompt = fused.encode("To be, or not to be")
    expected = fused.generate_ids(prompt, 32, GREEDY)
    # An onnxruntime without the contrib kernels (as 1.20 is): the portable graphs run.
    monkeypatch.setattr(req, "available_ops", lambda: set())
    portable = Generator(bundle, threads=1)
    assert portable.session.graph_set == "portable"
    assert portable.generate_ids(prompt, 32, GREEDY) == expected
    # Asking for the fused set on such an onnxruntime is the one-line refusal.
    with pytest.raises(BundleError, match="LinearAttention|CausalConvWithState|MoE"):
        ModelSession(bundle, threads=1, graph_set="fused")


def test_itera_run_json_says_which_graph_set_ran(tiny_itera):
    res = CliRunner().invoke(run_main, [str(tiny_itera.bundle), "-p", "To be", "-n", "4", "--json",
                                        "--temperature", "0", "--threads", "1"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    sets = list(load_bundle(tiny_itera.bundle).manifest.graph_sets())
    assert record["graph_set"] == sets[0] and record["onnxruntime"] == req.installed_version()
    res = CliRunner().invoke(run_main, [str(tiny_itera.bundle), "-p", "To be", "-n", "4", "--json",
                                        "--graph-set", sets[-1], "--threads", "1"])
    assert json.loads(res.stdout)["graph_set"] == sets[-1]
    res = CliRunner().invoke(run_main, [str(tiny_itera.bundle), "-p", "x", "--graph-set", "gpu"])
    assert res.exit_code == 1 and "no graph set 'gpu'" in res.stderr


def test_bench_records_say_which_graph_set_ran(tiny_itera):
    from itera_bench.latency import Target, gen_case

    bundle = load_bundle(tiny_itera.bundle)
    sets = list(bundle.manifest.graph_sets())
    for name in sets:
        record = gen_case(Target(bundle.with_graph_set(name), threads=1), 4, 0).record
        assert record.graph_set == name
        assert record.ssm_path == {"fused": "lowered", "portable": "function"}[name]


def _future_bundle(src: Path, dst: Path) -> Path:
    """A fused-only copy of `src` whose graphs need an op no onnxruntime has yet (re-hashed)."""
    shutil.copytree(src, dst)
    m = load_bundle(dst).manifest
    for name, alt in m.alt_graph_sets.items():
        for g in alt.graphs.values():
            (dst / g.file).unlink()
    m.alt_graph_sets = {}
    m.requires = Requires(onnxruntime="99.0.0", ops={"decode": ["com.microsoft::FutureScan"], "prefill": []})
    write_manifest(dst, m, names=[n for n in m.files if (dst / n).exists()])
    return dst


def test_a_bundle_needing_a_newer_onnxruntime_is_refused_in_one_line(tiny_itera, tmp_path):
    bundle = _future_bundle(tiny_itera.bundle, tmp_path / "future")
    load_bundle(bundle)  # hashes and files are consistent: only the requirement refuses it
    res = CliRunner().invoke(run_main, [str(bundle), "-p", "To be", "-n", "2"])
    assert res.exit_code == 1
    line = res.stderr.strip()
    assert "\n" not in line and line.startswith("error: ")
    for part in ("com.microsoft::FutureScan", "99.0.0", f"installed onnxruntime is {req.installed_version()}",
                 "pip install -U", "--graph-set portable"):
        assert part in line, (part, line)


def test_old_manifest_without_requires_loads_as_one_set(tiny_itera):
    d = json.loads((tiny_itera.bundle / "manifest.json").read_text())
    for key in ("requires", "graph_set", "alt_graph_sets"):
        d.pop(key, None)
    m = Manifest.from_json(json.dumps(d))
    assert m.requires is None and list(m.graph_sets()) == ["default"] and m.set_requires() == {"default": None}
    assert json.loads(m.to_json())["alt_graph_sets"] == {}


# ----------------------------------------------------- other onnxruntime releases (network)


def _venv(tmp: Path, ort_version: str) -> Path:
    """A venv with onnxruntime==ort_version and this checkout (base dependencies only)."""
    venv = tmp / f"ort-{ort_version}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    numpy = "numpy<2" if req.parse_version(ort_version) < (1, 19) else "numpy"
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"onnxruntime=={ort_version}", numpy, "tokenizers",
                    "psutil", "click", "tqdm"], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)], check=True)
    return venv


@pytest.mark.slow
@pytest.mark.network
@needs_fused
def test_oldest_supported_onnxruntime_runs_the_portable_set_and_refuses_fused_only(tiny_itera, tmp_path):
    """The pyproject floor is tested: a dual bundle runs there (portable), a fused-only one is refused."""
    floor = _pyproject_floor()
    venv = _venv(tmp_path, floor)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    run = subprocess.run([str(venv / "bin" / "itera-run"), str(tiny_itera.bundle), "-p", "To be", "-n", "16",
                          "--temperature", "0", "--json", "--threads", "1"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["onnxruntime"] == floor and record["graph_set"] == "portable"
    here = Generator(tiny_itera.bundle, threads=1)
    assert record["text"] == here.generate("To be", 16, GREEDY).text  # the same greedy text as fused here
    bench = subprocess.run([str(venv / "bin" / "itera-bench"), "latency", str(tiny_itera.bundle), "-p", "16",
                            "-n", "8", "-d", "16", "-r", "2", "-o", "json"], capture_output=True, text=True, env=env)
    assert bench.returncode == 0, bench.stderr
    assert {r["graph_set"] for r in json.loads(bench.stdout)} == {"portable"}
    fused_only = tmp_path / "fused-only"
    shutil.copytree(tiny_itera.bundle, fused_only)
    m = load_bundle(fused_only).manifest
    m.alt_graph_sets = {}
    write_manifest(fused_only, m, names=[n for n in m.files if "portable" not in n])
    refused = subprocess.run([str(venv / "bin" / "itera-run"), str(fused_only), "-p", "To be", "-n", "2"],
                             capture_output=True, text=True, env=env)
    assert refused.returncode == 1
    assert "needs onnxruntime >=" in refused.stderr and f"installed onnxruntime is {floor}" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.network
def test_the_table_still_holds_for_the_floor_and_the_fused_ops(tiny_itera, tmp_path):
    """Re-measure a slice of the table: the release before and at each first version."""
    pytest.importorskip("onnx")
    wanted = {req.PORTABLE_FLOOR, req.FIRST_VERSION["com.microsoft::LinearAttention"]}
    for v in list(wanted):
        idx = req.PROBED_VERSIONS.index(v)
        if idx:
            wanted.add(req.PROBED_VERSIONS[idx - 1])
    proc = subprocess.run([sys.executable, "-m", "itera_export.opcheck", str(tiny_itera.bundle), "--versions",
                           ",".join(sorted(wanted, key=req.parse_version)), "--venvs", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.network
def test_group_query_attention_entry_holds_for_the_baseline(tiny_baseline, tmp_path):
    """The release before GroupQueryAttention's entry makes sessions but computes the buffer graph wrong; the entry's is right."""
    pytest.importorskip("onnx")
    first = req.FIRST_VERSION["com.microsoft::GroupQueryAttention"]
    before = req.PROBED_VERSIONS[req.PROBED_VERSIONS.index(first) - 1]
    proc = subprocess.run([sys.executable, "-m", "itera_export.opcheck", str(tiny_baseline.bundle), "--versions",
                           f"{before},{first}", "--venvs", str(tmp_path), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(proc.stdout)["results"]
    numeric = next(v for k, v in results.items() if k.endswith(":numeric"))
    assert numeric[first] == "ok" and numeric[before].startswith("logits differ by"), numeric
    assert results["com.microsoft::GroupQueryAttention"] == {before: "ok", first: "ok"}


@pytest.mark.network
def test_the_base_install_resolves_on_aarch64(tmp_path):
    """What a Raspberry Pi (64-bit OS, Python 3.11) gets from `pip install itera-lite`: wheels exist."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    # Raspberry Pi OS 12 has glibc 2.36: wheels tagged manylinux_2_28 and older all install.
    platforms = [a for p in ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
                 for a in ("--platform", p)]
    proc = subprocess.run([sys.executable, "-m", "pip", "download", *platforms, "--only-binary=:all:",
                           "--python-version", "3.11", "-d", str(tmp_path), *deps], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = [p.name for p in tmp_path.iterdir()]
    assert any(w.startswith("onnxruntime-") and "aarch64" in w for w in wheels), wheels


def test_fused_floor_is_the_newest_fused_kernel_and_known_bad_releases_are_excluded():
    import tomllib

    assert req.FUSED_FLOOR == max((req.FIRST_VERSION[op] for op in req.FUSED_OPS), key=req.parse_version)
    assert set(req.FUSED_OPS) == FUSED_OPS
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ort = next(d for d in deps if d.startswith("onnxruntime"))
    for bad in req.KNOWN_BAD:
        assert f"!={bad}" in ort
    readme = (ROOT / "devices" / "README.md").read_text()
    assert "1.21.0" in readme and "1.23.2" in readme and req.FUSED_FLOOR in readme


def test_a_python_310_arm_board_gets_1_23_2_and_the_portable_graphs():
    plan = req.device_onnxruntime("3.10.12", "aarch64")
    assert plan["version"] == "1.23.2" and plan["graph_set"] == "portable" and plan["blocker"] is None
    assert any("fused graphs need onnxruntime >= 1.30.0" in n for n in plan["notes"])
    plan = req.device_onnxruntime("3.11.2", "aarch64", wheel="1.32.0")
    assert plan == {"version": "1.32.0", "source": "pip index on the device", "graph_set": "fused", "notes": [],
                    "blocker": None}
    assert req.device_onnxruntime("3.11.2", "aarch64")["version"] is None  # not asked, nothing known: no guess
    bad = req.device_onnxruntime("3.11.2", "aarch64", installed="1.21.0", wheel="1.32.0")
    assert bad["source"] == "installed" and "Illegal instruction" in bad["blocker"]
    old = req.device_onnxruntime("3.12.1", "x86_64", installed="1.18.1")
    assert old["graph_set"] is None and "older than 1.19.0" in old["notes"][0]
    assert req.device_onnxruntime("3.11.2", "armv7l", python_bits=32)["notes"] == [
        "PyPI has no onnxruntime wheels for 32-bit Python"]
