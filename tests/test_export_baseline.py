"""Baseline export: one optimum KV-cache graph, its manifest fragment, torch parity."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("optimum.exporters.onnx")

from itera_export.baseline import check_parity, export_baseline_graphs, graph_io  # noqa: E402
from itera_lite.models import build_model, make_config  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the torch reference is tiny; more threads only contend
    torch.manual_seed(0)
    model = build_model(make_config("baseline", "tiny", vocab_size=256)).eval()
    out = tmp_path_factory.mktemp("baseline")
    fragment = export_baseline_graphs(model, out, opset=18)
    yield model, out, fragment
    torch.set_num_threads(threads)


def test_fragment_matches_graph(exported):
    model, out, frag = exported
    cfg = model.config
    assert sorted(os.listdir(out)) == ["model.onnx"]
    inputs, outputs, n_nodes = graph_io(out / "model.onnx")
    for kind in ("prefill", "decode"):
        g = frag["graphs"][kind]
        assert g["file"] == "model.onnx"
        assert g["inputs"] == inputs and g["outputs"] == outputs
    assert frag["nodes"] == {"prefill": n_nodes, "decode": n_nodes}
    assert frag["opset"] == 18 and frag["ssm_path"] is None and frag["custom_domains"] == {}
    names = [t["name"] for t in inputs]
    assert names[:2] == ["input_ids", "attention_mask"]
    assert frag["io"] == {
        "input_ids": "input_ids",
        "logits": "logits",
        "attention_mask": "attention_mask",
        "position_ids": "position_ids" if "position_ids" in names else None,
    }
    by_name = {t["name"]: t for t in inputs + outputs}
    assert by_name["input_ids"]["shape"] == ["batch", "seq"]
    assert by_name["attention_mask"]["shape"] == ["batch", "total_sequence"]
    assert by_name["logits"] == {"name": "logits", "dtype": "float32", "shape": ["batch", "seq", cfg.vocab_size]}
    state = frag["state"]
    assert state["kind"] == "kv_cache"
    assert len(state["tensors"]) == 2 * cfg.n_layers
    hd = cfg.d_model // cfg.n_heads
    for i, t in enumerate(state["tensors"]):
        kv = "key" if i % 2 == 0 else "value"
        assert t == {
            "input": f"past_key_values.{i // 2}.{kv}",
            "output": f"present.{i // 2}.{kv}",
            "dtype": "float32",
            "shape": ["batch", cfg.n_kv_heads, "past_sequence", hd],
        }
        assert by_name[t["output"]]["shape"] == ["batch", cfg.n_kv_heads, "total_sequence", hd]


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


def test_parity_prefill_and_decode(exported):
    model, out, _ = exported
    r = check_parity(model, out / "model.onnx", prompt_len=32, steps=64, seed=0)
    assert r["max_abs_diff"] <= 1e-4, r["max_abs_diff"]
    assert r["top1_agreement"] == 1.0
    assert r["greedy_ort"] == r["greedy_torch"]
    assert len(r["greedy_ort"]) == 64

