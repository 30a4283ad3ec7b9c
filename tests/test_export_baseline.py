"""Baseline export: one optimum graph whose attention is GroupQueryAttention over a KV buffer,
its manifest parts, torch parity through the runtime (validate.compare) at depths past one
prefill chunk, bundles of the older growing-cache format, and a graph whose weights live in an
external data file."""

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
from itera_runtime.session import PREFILL_CHUNK, ModelSession  # noqa: E402

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
    assert parts.opset == 18 and parts.graph_set == "fused" and parts.custom_domains == {}
    names = [t.name for t in spec.inputs]
    assert names[:2] == ["input_ids", "attention_mask"]
    # GroupQueryAttention places tokens by the mask's count: no position_ids.
    assert "position_ids" not in names and parts.io.position_ids is None
    assert (parts.io.input_ids, parts.io.logits, parts.io.attention_mask) == ("input_ids", "logits", "attention_mask")
    by_name = {t.name: t for t in spec.inputs + spec.outputs}
    assert by_name["input_ids"].shape == ["batch", "seq"]
    assert by_name["attention_mask"].shape == ["batch", "total_sequence"]
    # the head runs on the positions logits_start keeps (-1: the last, 0: all), not on every "seq" position
    assert (by_name["logits"].dtype, by_name["logits"].shape) == ("float32", ["batch", "kept", cfg.vocab_size])
    assert parts.io.logits_start == "logits_start" and (by_name["logits_start"].dtype, by_name["logits_start"].shape) == ("int64", [1])
    assert parts.state.kind == "kv_buffer" and len(parts.state.tensors) == 2 * cfg.n_layers
    assert parts.state.capacity == cfg.max_seq_len
    hd = cfg.d_model // cfg.n_heads
    for i, t in enumerate(parts.state.tensors):
        kv = "key" if i % 2 == 0 else "value"
        assert (t.input, t.output, t.dtype) == (f"past_key_values.{i // 2}.{kv}", f"present.{i // 2}.{kv}", "float32")
        # One buffer of max_seq_len positions, the same shape in and out: written in place.
        assert t.shape == by_name[t.output].shape == ["batch", cfg.n_kv_heads, cfg.max_seq_len, hd]


def test_attention_is_group_query_attention_without_kv_concat(exported):
    model, out, _ = exported
    m = onnx.load(str(out / "model.onnx"))
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == model.config.n_layers and all(n.domain == "com.microsoft" for n in gqa)
    for i, n in enumerate(gqa):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["do_rotary"] == 1 and attrs["num_heads"] == model.config.n_heads
        assert list(n.input[3:5]) == [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        assert list(n.output[1:]) == [f"present.{i}.key", f"present.{i}.value"]
    # Nothing copies the cache: no node but the attention reads past K/V or writes present.
    cache = {x for i in range(model.config.n_layers) for x in (f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                                                f"present.{i}.key", f"present.{i}.value")}
    touching = [n.op_type for n in m.graph.node if cache & {*n.input, *n.output}]
    assert set(touching) == {"GroupQueryAttention"}
    ops = {n.op_type for n in m.graph.node}
    assert "Softmax" not in ops  # the score maths went into the op (cos/sin tables fold at load)


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


def test_parity_past_one_prefill_chunk(tiny_baseline):
    """A prompt longer than PREFILL_CHUNK is prefilled in two calls with the buffer carried, then decoded."""
    model, _ = load_model(tiny_baseline.checkpoint)
    prompt_len = PREFILL_CHUNK + 40
    tokens = np.random.default_rng(1).integers(0, 256, prompt_len + 16)
    v = compare(model, tiny_baseline.bundle, tokens, prompt_len=prompt_len)
    assert v.max_abs_diff <= 1e-4 and v.decode_top1_agreement == 1.0 and v.decode_steps == 16
    # Small uneven chunks give the same logits as one call.
    session = ModelSession(load_bundle(tiny_baseline.bundle), threads=1)
    whole = np.concatenate([lg for lg, _ in session.forward_chunks(tokens[:100])])
    pieces = np.concatenate([lg for lg, _ in session.forward_chunks(tokens[:100], chunk=7)])
    assert np.abs(whole - pieces).max() <= 1e-5
    # Generation's prefill runs the head on the last position only (io.logits_start = -1): one row, the same.
    last = [lg for lg, _ in session.forward_chunks(tokens[:100], chunk=40, last_only=True)]
    assert [lg.shape for lg in last] == [(1, whole.shape[1])] * 3 and np.abs(last[-1][0] - whole[-1]).max() <= 1e-5


def test_buffer_state_is_written_in_place_and_counts_filled_rows(tiny_baseline):
    session = ModelSession(load_bundle(tiny_baseline.bundle), threads=1)
    assert session.graph_set == "fused"  # GroupQueryAttention over the buffer: onnxruntime's fused kernel
    _, state = session.prefill([1, 2, 3, 4, 5])
    per_token = state.nbytes // 5
    assert per_token == 2 * 2 * 4 * 32 * 4  # (K, V) x 2 layers x 4 kv heads x head_dim 32 x float32
    logits_a, after_a = session.decode(7, state)
    logits_b, after_b = session.decode(9, state)  # decode leaves its input state usable
    _, fresh = session.prefill([1, 2, 3, 4, 5, 9])
    assert np.allclose(logits_b, session.decode(9, session.prefill([1, 2, 3, 4, 5])[1])[0], atol=1e-6)
    assert not np.allclose(logits_a, logits_b)
    assert np.allclose(after_b.numpy()[0], fresh.numpy()[0], atol=1e-6)
    decoder = session.decoder(after_a)
    buffers = decoder.state.buffers
    for token in (3, 4, 5):
        decoder.step(token)
    assert decoder.state.buffers is buffers and decoder.state.position == 9  # no copy, no new buffer
    assert decoder.state.nbytes == 9 * per_token
    with pytest.raises(ValueError, match="exceed this model's KV buffer of 4096 positions"):
        session.prefill(np.zeros(4097, dtype=np.int64))


def test_growing_cache_bundles_still_run(tiny_baseline, tmp_path):
    """Bundles of the earlier format (optimum's Concat cache, kind kv_cache; today --graph-set portable) load and
    match torch."""
    out, manifest = export_checkpoint(tiny_baseline.checkpoint, tmp_path / "old", graph_set="portable")
    assert manifest.state.kind == "kv_cache" and manifest.io.position_ids == "position_ids"
    assert list(manifest.graph_sets()) == ["portable"] and manifest.ssm_path is None
    assert manifest.requires.ops == {"decode": [], "prefill": []}
    model, _ = load_model(tiny_baseline.checkpoint)
    tokens = np.random.default_rng(0).integers(0, 256, 32 + 16)
    v = compare(model, out, tokens, prompt_len=32)
    assert v.max_abs_diff <= 1e-4 and v.decode_top1_agreement == 1.0
    greedy = SamplingConfig(temperature=0)
    assert (Generator(out, threads=1).generate_ids([5, 6, 7], 24, greedy)
            == Generator(tiny_baseline.bundle, threads=1).generate_ids([5, 6, 7], 24, greedy))


def test_graph_set_both_is_refused_for_the_baseline(tiny_baseline, tmp_path):
    from itera_export.exporter import ExportError

    with pytest.raises(ExportError, match="--graph-set both is for Itera-Lite bundles"):
        export_checkpoint(tiny_baseline.checkpoint, tmp_path / "dual", graph_set="both")
    assert not (tmp_path / "dual").exists()


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
