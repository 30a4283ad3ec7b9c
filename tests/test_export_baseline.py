"""Baseline export: one optimum KV-cache graph, its manifest parts, torch parity through the
runtime (validate.compare), and a graph whose weights live in an external data file."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("optimum.exporters.onnx")

from itera_export import graphfile  # noqa: E402
from itera_export.baseline import export_baseline_graphs  # noqa: E402
from itera_export.exporter import export_checkpoint  # noqa: E402
from itera_export.graphfile import graph_spec  # noqa: E402
from itera_export.validate import compare, greedy_tokens  # noqa: E402
from itera_lite.checkpoint import load_model  # noqa: E402
from itera_lite.models import build_model, make_config  # noqa: E402
from itera_runtime import BundleError, Generator, SamplingConfig, load_bundle  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(make_config("baseline", "tiny", vocab_size=256)).eval()
    out = tmp_path_factory.mktemp("baseline")
    return model, out, export_baseline_graphs(model, out, opset=18)


def test_parts_match_graph(exported):
    model, out, parts = exported
    cfg = model.config
    assert sorted(os.listdir(out)) == ["model.onnx"]
    spec = graph_spec(out / "model.onnx")
    assert parts.graphs == {"prefill": spec, "decode": spec} and spec.external_data == []
    n_nodes = len(onnx.load(str(out / "model.onnx")).graph.node)
    assert parts.nodes == {"prefill": n_nodes, "decode": n_nodes}
    assert parts.opset == 18 and parts.ssm_path is None and parts.custom_domains == {}
    names = [t.name for t in spec.inputs]
    assert names[:2] == ["input_ids", "attention_mask"]
    assert (parts.io.input_ids, parts.io.logits, parts.io.attention_mask) == ("input_ids", "logits", "attention_mask")
    assert parts.io.position_ids == ("position_ids" if "position_ids" in names else None)
    by_name = {t.name: t for t in spec.inputs + spec.outputs}
    assert by_name["input_ids"].shape == ["batch", "seq"]
    assert by_name["attention_mask"].shape == ["batch", "total_sequence"]
    assert (by_name["logits"].dtype, by_name["logits"].shape) == ("float32", ["batch", "seq", cfg.vocab_size])
    assert parts.state.kind == "kv_cache" and len(parts.state.tensors) == 2 * cfg.n_layers
    hd = cfg.d_model // cfg.n_heads
    for i, t in enumerate(parts.state.tensors):
        kv = "key" if i % 2 == 0 else "value"
        assert (t.input, t.output, t.dtype) == (f"past_key_values.{i // 2}.{kv}", f"present.{i // 2}.{kv}", "float32")
        assert t.shape == ["batch", cfg.n_kv_heads, "past_sequence", hd]
        assert by_name[t.output].shape == ["batch", cfg.n_kv_heads, "total_sequence", hd]


def test_tied_embedding_stored_once(exported):
    model, out, _ = exported
    cfg = model.config
    m = onnx.load(str(out / "model.onnx"))
    vocab_tables = [t.name for t in m.graph.initializer if sorted(t.dims) == sorted([cfg.vocab_size, cfg.d_model])]
    assert len(vocab_tables) == 1, vocab_tables
    # Unique parameters (tied counted once) * 4 bytes, within 15%.
    params = sum(p.numel() for p in model.parameters())
    size = (out / "model.onnx").stat().st_size
    assert 0.95 * params * 4 <= size <= 1.15 * params * 4, (size, params * 4)


def test_parity_prefill_and_decode(tiny_baseline):
    model, _ = load_model(tiny_baseline.checkpoint)
    tokens = np.random.default_rng(0).integers(0, 256, 32 + 64)
    v = compare(model, tiny_baseline.bundle, tokens, prompt_len=32)
    assert v.max_abs_diff <= 1e-4 and v.decode_top1_agreement == 1.0 and v.decode_steps == 64
    prompt = tokens[:32].tolist()
    greedy = Generator(tiny_baseline.bundle, threads=1).generate_ids(prompt, 64, SamplingConfig(temperature=0))
    assert greedy == greedy_tokens(model, np.array(prompt), 64)


def test_external_data_is_listed_and_hashed(tiny_baseline, tmp_path, monkeypatch):
    """Past protobuf's limit the weights go to model.onnx.data: listed, hashed, loaded."""
    monkeypatch.setattr(graphfile, "SINGLE_FILE_LIMIT", 0)  # any model counts as large
    out, manifest = export_checkpoint(tiny_baseline.checkpoint, tmp_path / "b")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "model.onnx.data",
                                                     "tokenizer.json"]
    assert manifest.graphs["decode"].external_data == ["model.onnx.data"]
    assert manifest.files["model.onnx.data"].bytes == (out / "model.onnx.data").stat().st_size
    assert (out / "model.onnx").stat().st_size < 100_000  # the weights are not inline
    assert manifest.validation.max_abs_diff <= 1e-4
    text = Generator(out, threads=1).generate("To be", 8, SamplingConfig(temperature=0)).text
    assert text == Generator(tiny_baseline.bundle, threads=1).generate("To be", 8, SamplingConfig(temperature=0)).text
    data = bytearray((out / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 1
    (out / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx\.data: sha256 mismatch"):
        load_bundle(out)
