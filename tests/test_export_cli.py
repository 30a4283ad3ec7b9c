"""itera-export as users run it: bundles of both families and every quantization mode,
and bad inputs that end in one clear line, a non-zero exit and nothing left on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from itera_lite.checkpoint import load_checkpoint, load_model
from itera_runtime import Generator, SamplingConfig, load_bundle


def export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "itera_export.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def export_here(*args) -> subprocess.CompletedProcess:
    """itera-export in this process (tests/clirun.py), for its error lines."""
    from clirun import invoke

    from itera_export.cli import main

    return invoke(main, *args)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_bundles_of_both_families_run(tmp_path, tiny_bundle, quantize):
    out = tmp_path / f"{tiny_bundle.family}-{quantize}"
    proc = export(tiny_bundle.checkpoint, "-o", out, "--quantize", quantize)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = load_bundle(out).manifest
    assert manifest.quantization.mode == quantize
    assert manifest.quantization.nodes_quantized > 0
    fp32 = load_bundle(tiny_bundle.bundle).manifest
    assert manifest.total_bytes < 0.6 * fp32.total_bytes
    for f, check in manifest.graph_checks.items():
        assert check["bytes"] < fp32.graph_checks[f]["bytes"], (f, check)
    v = manifest.validation
    # Untrained weights give near-tied logits, so top-1 agreement is only meaningful for the
    # baseline here; a broken quantized graph shows as logits off by far more than 3.
    assert v.tolerance is None and v.max_abs_diff < 3.0
    if tiny_bundle.family == "baseline":
        assert v.decode_top1_agreement >= 0.9
    gen = Generator(out, threads=1)
    ids = gen.generate_ids(gen.encode("To be"), 16, SamplingConfig(temperature=0))
    assert len(ids) == 16 and all(0 <= i < gen.bundle.vocab_size for i in ids)
    assert proc.stdout.startswith(f"{out}: {tiny_bundle.family} bundle, quantization {quantize}")
    # From quantization on, progress lines only: no quantizer advice or per-tensor INFO logs.
    # (optimum's own tied-weight note during the baseline's graph export comes before.)
    lines = proc.stderr.splitlines()
    after = lines[lines.index(f"· quantizing to {quantize}"):]
    assert all(line.startswith("· ") for line in after), proc.stderr[-2000:]


@pytest.mark.slow
def test_refuses_to_overwrite_without_force(tmp_path, tiny_baseline):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = export(tiny_baseline.checkpoint, "-o", out)
    assert proc.returncode == 1 and "--force" in proc.stderr
    assert leftovers(out) == ["keep.txt"] and leftovers(tmp_path) == ["b"]
    # With --force too: a folder that is not a bundle is never replaced.
    proc = export(tiny_baseline.checkpoint, "-o", out, "--force")
    assert proc.returncode == 1 and "not an itera bundle" in proc.stderr
    assert leftovers(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_default_output_derives_from_checkpoint(tmp_path, tiny_baseline):
    run = tmp_path / "runs" / "my-run"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(Path(tiny_baseline.checkpoint).read_bytes())
    proc = subprocess.run([sys.executable, "-m", "itera_export.cli", str(run / "best.pt")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "bundles" / "my-run" / "manifest.json").exists()


def _bad_checkpoint(tmp_path: Path, kind: str, good: Path) -> Path:
    path = tmp_path / "bad.pt"
    if kind == "missing":
        return tmp_path / "nope.pt"
    if kind == "not-a-checkpoint":
        path.write_text("hello, I am text")
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "newer":
        ckpt = load_checkpoint(good)
        ckpt["format_version"] = 99
        torch.save(ckpt, path)
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[:5000])
    return path


@pytest.mark.parametrize("kind", ["missing", "not-a-checkpoint", "foreign", "newer", "truncated"])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, tiny_baseline, kind):
    src = _bad_checkpoint(tmp_path, kind, Path(tiny_baseline.checkpoint))
    before = leftovers(tmp_path)
    proc = export_here(src, "-o", tmp_path / "out")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    assert str(src.name) in lines[0]
    if kind == "newer":
        assert "upgrade" in lines[0]
    assert leftovers(tmp_path) == before  # no bundle, no temp folder


def test_failed_validation_deletes_temp_output(tmp_path, tiny_itera, monkeypatch):
    # Force a validation failure: the exporter must remove everything it wrote.
    from itera_export import exporter

    monkeypatch.setattr(exporter, "FP32_TOLERANCE", -1.0)
    with pytest.raises(exporter.ExportError, match="validation failed"):
        exporter.export_checkpoint(tiny_itera.checkpoint, tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_manifest_records_what_the_contract_promises(tiny_itera, tiny_baseline):
    for tb in (tiny_itera, tiny_baseline):
        m = json.loads((Path(tb.bundle) / "manifest.json").read_text())
        for key in ("format_version", "family", "model_config", "tokenizer", "files", "graphs", "io", "state",
                    "opset", "custom_domains", "quantization", "versions", "validation", "graph_checks", "params"):
            assert key in m, (tb.family, key)
        v = m["validation"]
        assert v["reference_scale"] >= 1 and v["tolerance"] == pytest.approx(1e-4 * v["reference_scale"])
        assert v["max_abs_diff"] <= v["tolerance"]
        assert m["versions"]["onnxruntime"] and m["versions"]["torch"]
        for spec in m["state"]["tensors"]:
            assert spec["shape"][0] == "batch"
        model, _ = load_model(tb.checkpoint)
        assert m["params"]["total"] == sum(p.numel() for p in model.parameters())
        # Every file on disk but the manifest is listed and pinned; nothing else is.
        on_disk = sorted(p.name for p in Path(tb.bundle).iterdir() if p.name != "manifest.json")
        assert sorted(m["files"]) == on_disk
    assert load_bundle(tiny_itera.bundle).manifest.ssm_path in ("lowered", "function")
    assert np.isfinite(load_bundle(tiny_baseline.bundle).manifest.validation.decode_logits)


def test_itera_graphs_share_one_copy_of_the_weights(tiny_itera):
    from itera_lite.checkpoint import load_model
    from itera_lite.models import count_params

    m = load_bundle(tiny_itera.bundle).manifest
    shared = m.shared_weights
    assert shared and shared["file"] in m.files
    model, _ = load_model(tiny_itera.checkpoint)
    param_bytes = 4 * count_params(model)["total"]
    # Two graphs over the same parameters: stored once (plus the lowered MoE's interleaved
    # copy of gate/up, which replaces them), never twice.
    assert shared["bytes"] <= 1.15 * param_bytes, (shared, param_bytes)
    assert shared["bytes"] <= 0.6 * shared["bytes_if_inline"]
    assert m.total_bytes <= 1.3 * param_bytes


def test_lower_is_the_hidden_former_name_of_graph_set_and_not_given_with_it(tmp_path):
    from itera_export.cli import main

    assert "--graph-set" in export_here("--help").stdout and "--lower" not in export_here("--help").stdout
    (tmp_path / "model.pt").write_bytes(b"")
    res = export_here(tmp_path / "model.pt", "-o", tmp_path / "b", "--lower", "none", "--graph-set", "fused")
    assert res.returncode == 1 and res.stderr.startswith("error: --lower is the former name of --graph-set")
    assert not (tmp_path / "b").exists()
    assert {o.name: o.hidden for o in main.params if o.name in ("lower", "graph_set")} == \
        {"lower": True, "graph_set": False}
