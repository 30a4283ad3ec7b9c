"""itera-bench memory, quality and flops on real tiny bundles of both families.

memory: the state bytes computed from the manifest equal what the runtime holds and what
the model config implies; the peak comes from a fresh, torch-free process.
quality: onnxruntime's loss and bits/byte equal training's torch evaluation on the same ids.
flops: the analytic count from the config and the count from the ONNX graph agree.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from pathlib import Path
from clirun import bench, one_error_line

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n"
        "And by opposing end them. Café, naïve — ☃.\n") * 3


def rows(proc) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


# ------------------------------------------------------------------------------ memory


def _state_bytes_from_config(cfg: dict, depth: int) -> int:
    """What each family must carry per the architecture, float32, batch 1."""
    if cfg["family"] == "baseline":
        head_dim = cfg["d_model"] // cfg["n_heads"]
        return 2 * cfg["n_layers"] * cfg["n_kv_heads"] * head_dim * depth * 4  # K and V
    d_inner = cfg["expand"] * cfg["d_model"]
    conv = (d_inner + 2 * cfg["n_groups"] * cfg["d_state"]) * (cfg["d_conv"] - 1)
    ssm = d_inner * cfg["d_state"]  # heads * head_dim * state
    return cfg["n_layers"] * (conv + ssm) * 4


def test_state_bytes_equal_the_runtime_and_the_architecture(tiny_bundle):
    from itera_bench.memory import state_bytes
    from itera_runtime.bundle import load_bundle
    from itera_runtime.session import ModelSession

    b = load_bundle(tiny_bundle.bundle)
    session = ModelSession(b, threads=1)
    for depth in (0, 1, 37):
        state = session.prefill(np.arange(depth) % 200)[1] if depth else session.initial_state()
        assert state.nbytes == state_bytes(b, depth) == _state_bytes_from_config(b.model_config, depth)
        if depth:  # and after decoding one more token
            _, state = session.decode(5, state)
            assert state.nbytes == state_bytes(b, depth + 1)


def test_memory_rows_from_a_fresh_process(tiny_itera, tiny_baseline):
    out = rows(bench("memory", tiny_itera.bundle, tiny_baseline.bundle, "-d", "0,40", "-n", "4", "-r", "1",
                     "--no-warmup", "-o", "json"))
    peak = {(r["family"], r["n_depth"]): r for r in out if r["metric"] == "peak_rss_bytes"}
    state = {(r["family"], r["n_depth"]): r for r in out if r["metric"] == "state_bytes"}
    assert set(peak) == set(state) == {(f, d) for f in ("itera", "baseline") for d in (0, 40)}
    for (family, depth), r in peak.items():
        e = r["extra"]
        # The probe's own counters: import < load <= peak, and far below this torch process.
        assert 0 < e["import_rss_bytes"] < e["load_rss_bytes"] <= r["median"]
        assert e["load_rss_anon_bytes"] + e["load_rss_file_bytes"] <= e["load_rss_bytes"] + 4096
        assert r["unit"] == "B" and r["higher_is_better"] is False and r["model_size"] == e["model_bytes"]
        s = state[family, depth]
        assert s["median"] == e["state_bytes"] == e["runtime_state_bytes"] == s["extra"]["runtime_state_bytes"]
    # The SSM state is constant in depth; the KV cache grows with it.
    assert state["itera", 0]["median"] == state["itera", 40]["median"] > 0
    assert state["baseline", 0]["median"] == 0 < state["baseline", 40]["median"]


def test_memory_probe_is_torch_free(tiny_itera):
    from itera_bench.memory import run_probe

    m = run_probe(str(tiny_itera.bundle), 3, 2, 1)
    assert m["torch_imported"] is False and m["state_position"] == 3 and m["peak_rss_bytes"] > 0


# ----------------------------------------------------------------------------- quality


def _ids(bundle_path, n: int) -> np.ndarray:
    from itera_lite.data import Document, encode_documents
    from itera_runtime.bundle import load_bundle

    ids = encode_documents(load_bundle(bundle_path).load_tokenizer(), [Document("t", TEXT)])
    assert len(ids) >= n
    return ids[:n]


def _torch_eval(tiny, ids: np.ndarray, seq_len: int) -> dict:
    from itera_lite.checkpoint import load_model
    from itera_lite.evaluation import evaluate, token_byte_lengths

    model, ckpt = load_model(tiny.checkpoint)
    return evaluate(model, ids, token_byte_lengths(ckpt["tokenizer_json"]), batch_size=2, seq_len=seq_len,
                    max_batches=None)


def _onnx_score(tiny, ids, window, stride, carry=False):
    from itera_bench.quality import score_carried, score_windows
    from itera_runtime.bundle import load_bundle
    from itera_runtime.session import ModelSession
    from itera_runtime.textstream import token_byte_lengths

    b = load_bundle(tiny.bundle)
    byte_len = token_byte_lengths(b.load_tokenizer())
    session = ModelSession(b, threads=1)
    if carry:
        return score_carried(session, ids, byte_len, window)
    return score_windows(session, ids, byte_len, window, stride)


def test_quality_equals_torch_evaluation(tiny_bundle):
    pytest.importorskip("torch")
    W = 32
    ids = _ids(tiny_bundle.bundle, 5 * W + 1)  # whole windows: torch's evaluate drops a tail
    torch_metrics = _torch_eval(tiny_bundle, ids, W)
    onnx = _onnx_score(tiny_bundle, ids, W, W)  # stride = window: training's disjoint windows
    assert onnx.n_tokens == torch_metrics["tokens"] == len(ids) - 1
    assert onnx.n_bytes == torch_metrics["bytes"]
    assert onnx.loss == pytest.approx(torch_metrics["loss"], rel=1e-5)
    assert onnx.bits_per_byte == pytest.approx(torch_metrics["bpb"], rel=1e-5)
    assert onnx.perplexity == pytest.approx(torch_metrics["ppl"], rel=1e-5)


def test_sliding_window_scores_every_token_once(tiny_bundle):
    ids = _ids(tiny_bundle.bundle, 101)
    disjoint = _onnx_score(tiny_bundle, ids, 16, 16)
    sliding = _onnx_score(tiny_bundle, ids, 16, 5)
    assert disjoint.n_tokens == sliding.n_tokens == 100 and disjoint.n_bytes == sliding.n_bytes
    assert sliding.nats != disjoint.nats  # more context per token: a different number
    # One window holding the whole text: the same as any rule that gives every token all context.
    whole = _onnx_score(tiny_bundle, ids, 100, 100)
    assert whole.loss == pytest.approx(_onnx_score(tiny_bundle, ids, 100, 7).loss, rel=1e-5)


def test_carried_state_equals_one_torch_pass(tiny_itera):
    torch = pytest.importorskip("torch")
    from itera_lite.checkpoint import load_model

    ids = _ids(tiny_itera.bundle, 90)
    carried = _onnx_score(tiny_itera, ids, 16, None, carry=True)  # 6 chunks, state carried between
    model, _ = load_model(tiny_itera.checkpoint)
    with torch.no_grad():
        logits = model(torch.from_numpy(ids[None, :-1])).logits[0]
    nll = torch.nn.functional.cross_entropy(logits, torch.from_numpy(ids[1:]), reduction="sum").item()
    assert carried.n_tokens == 89 and carried.nats == pytest.approx(nll, rel=1e-5)


def test_quality_cli_file_reference_and_formats(tiny_itera, tiny_baseline, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = rows(bench("quality", tiny_itera.bundle, tiny_baseline.bundle, "--data", text, "--window", "32",
                     "--reference", tiny_itera.bundle, "-o", "json"))
    assert [(r["family"], r["metric"]) for r in out] == [
        (f, m) for f in ("itera", "baseline") for m in ("bits_per_byte", "loss", "perplexity")]
    for r in out:
        e = r["extra"]
        assert e["split"] == "all" and e["window"] == 32 and e["stride"] == 16
        assert e["n_bytes"] == len(TEXT.rstrip().encode("utf-8")) - 1  # every byte but the first token's
        if r["metric"] == "bits_per_byte":
            assert e["bits_per_byte_delta"] == pytest.approx(r["median"] - e["bits_per_byte_reference"])
            if r["family"] == "itera":
                assert e["bits_per_byte_delta"] == 0
    one_error_line(bench("quality", tiny_itera.bundle, "--data", tmp_path / "missing.txt"))
    one_error_line(bench("quality", tiny_itera.bundle, "--data", text, "--reference", tiny_baseline.bundle))
    one_error_line(bench("quality", tiny_baseline.bundle, "--data", text, "--window", "100000"))


def test_quality_max_bytes_scores_the_same_text_whatever_the_tokenizer(tiny_itera, tmp_path):
    from itera_bench.quality import first_bytes
    from itera_lite.data import Document

    docs = [Document("a", "one\ntwo\n"), Document("b", "three\nfour\n")]
    assert [d.text for d in first_bytes(docs, 9)] == ["one\ntwo\n"]  # a whole document
    assert [d.text for d in first_bytes(docs, 16)] == ["one\ntwo\n", "three\n"]  # 8 + separator 2 + 6
    assert [d.text for d in first_bytes(docs, 15)] == ["one\ntwo\n"]  # "three\n" does not fit: cut at a line
    assert [d.text for d in first_bytes([Document("c", "Café\nnaïve\n")], 6)] == ["Café\n"]
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT, encoding="utf-8")
    (r, *_) = rows(bench("quality", tiny_itera.bundle, "--data", text, "--window", "32", "--max-bytes", "100",
                         "-o", "json"))
    cut = TEXT.encode("utf-8")[:100]
    kept = cut[:cut.rfind(b"\n") + 1]
    assert r["extra"]["max_bytes"] == 100
    assert r["extra"]["n_bytes"] == len(kept) - 1  # every byte of the kept lines but the first token's
    one_error_line(bench("quality", tiny_itera.bundle, "--data", text, "--max-bytes", "5"))


def test_test_split_ids_are_the_ids_training_evaluated(tmp_path):
    from itera_lite.data import encode_documents, load_corpus, prepare_data

    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    for i in range(40):  # 40 files: whole files held out, as for Shakespeare's plays
        (corpus_dir / f"doc{i:02d}.txt").write_text(f"Document {i}.\n" + TEXT * (1 + i % 3), encoding="utf-8")
    prepared = prepare_data(str(corpus_dir), vocab_size=300, out_dir=tmp_path / "prepared")
    docs = load_corpus(str(corpus_dir)).splits["test"]
    ids = encode_documents(prepared.tokenizer, docs)
    assert np.array_equal(ids, np.asarray(prepared.split("test"), dtype=np.int64))


# ------------------------------------------------------------------------------- flops


def test_flops_graph_count_agrees_with_the_config(tiny_bundle):
    from itera_bench.flops import analytic_flops, graph_flops
    from itera_runtime.bundle import load_bundle

    b = load_bundle(tiny_bundle.bundle)
    cfg = b.model_config
    counted = graph_flops(b, [0, 64, 300])
    for d, by_op in counted.items():
        total, analytic = sum(by_op.values()), sum(analytic_flops(cfg, d).values())
        assert total == pytest.approx(analytic, rel=0.02)
    growth = sum(counted[300].values()) - sum(counted[0].values())
    if cfg["family"] == "baseline":  # scores and weighted sum over 300 more keys, every layer
        assert growth == cfg["n_layers"] * 2 * 2 * cfg["d_model"] * 300
    else:  # the SSM's work does not depend on how much came before
        assert growth == 0
        # MoE: only the routed experts count, a top_k / n_experts share of the dense work.
        dense = cfg["n_layers"] * cfg["n_experts"] * 3 * 2 * cfg["d_model"] * cfg["d_expert"]
        assert counted[0]["MoE"] == dense * cfg["top_k"] // cfg["n_experts"]


def test_flops_cli_shows_both_counts(tiny_itera, tiny_baseline):
    out = rows(bench("flops", tiny_itera.bundle, tiny_baseline.bundle, "-d", "0,128", "-o", "json"))
    assert [(r["family"], r["test"], r["metric"]) for r in out] == [
        (f, f"tg1@d{d}", m) for f in ("itera", "baseline") for d in (0, 128)
        for m in ("flops_per_token", "flops_per_token_analytic")]
    for r in out:
        e = r["extra"]
        assert r["unit"] == "FLOP" and abs(e["graph_vs_analytic"]) < 0.02
        assert r["median"] == (e["flops_graph"] if r["metric"] == "flops_per_token" else e["flops_analytic"])
    ratio = {(r["test"], r["metric"]): r["vs_baseline"] for r in out if r["family"] == "itera"}
    assert ratio["tg1@d128", "flops_per_token"] > ratio["tg1@d0", "flops_per_token"]  # attention grows


def test_flops_without_onnx_is_one_line(tiny_itera, tmp_path):
    blocked = tmp_path / "blocked" / "onnx"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('onnx is not installed')\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(blocked.parent)}
    proc = subprocess.run([sys.executable, "-m", "itera_bench.cli", "flops", str(tiny_itera.bundle)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert "pip install" in one_error_line(proc) and "onnx" in proc.stderr


@pytest.mark.slow
def test_flops_of_the_function_path_int8_graph(tiny_itera, tmp_path):
    """ai.itera nodes (SsmStep, CausalConv1d, TopKMoE) and MatMulInteger count the same work."""
    from itera_bench.flops import graph_flops
    from itera_export.exporter import export_checkpoint
    from itera_runtime.bundle import load_bundle

    out, manifest = export_checkpoint(tiny_itera.checkpoint, tmp_path / "fn8", quantize="int8", graph_set="portable")
    assert manifest.ssm_path == "function"
    fn8 = graph_flops(load_bundle(out), [0])[0]
    fused = graph_flops(load_bundle(tiny_itera.bundle), [0])[0]
    assert {"SsmStep", "TopKMoE", "MatMulInteger"} <= set(fn8)
    # The fused lowering spreads dt over each head's channels with a one-hot MatMul (export/lower.py)
    # that the function path does inside SsmStep: one token costs 2 * H * (H * P) for it per layer.
    import onnx

    graph = onnx.load(str(Path(tiny_itera.bundle) / "decode.onnx"), load_external_data=False).graph
    dims = {i.name: list(i.dims) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}

    def one_hot(name):  # the spread's (H, H*P) constant: as stored, or scaled by 1/A (dt read back from dt*A)
        if name in dims:
            return dims[name]
        return next(dims[i] for i in producers[name].input if len(dims.get(i, ())) == 2)

    spread = [n for n in graph.node if n.op_type == "MatMul" and "__lower" in n.name]
    assert spread
    assert sum(fn8.values()) + sum(2 * one_hot(n.input[1])[0] * one_hot(n.input[1])[1] for n in spread) \
        == sum(fused.values())


def test_memory_refusals_are_one_line(tiny_baseline, tmp_path):
    assert "context" in one_error_line(bench("memory", tiny_baseline.bundle, "-d", "5000", "-r", "1"))
    assert "not found" in one_error_line(bench("memory", tmp_path / "nope"))


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_flops_records_parse_back_with_their_nested_extras(tiny_baseline, fmt):
    from itera_bench.flops import flops_records
    from itera_bench.record import format_records, parse
    from itera_runtime.bundle import load_bundle

    records = flops_records([load_bundle(tiny_baseline.bundle)], [0, 16])
    back = parse(format_records(records, fmt), fmt)
    assert [r.to_dict() for r in back] == [r.to_dict() for r in records]
    assert back[0].extra["graph_by_op"] == records[0].extra["graph_by_op"]


def test_kl_against_the_fp32_reference_equals_numpy_on_the_same_logits(tiny_itera, tiny_itera_int8, tmp_path):
    """int8 vs fp32 of one checkpoint: the KL and top-1 rows are what numpy computes from the two
    bundles' own onnxruntime logits over the same disjoint windows."""
    import numpy as np

    from itera_lite.data import encode_documents, read_document
    from itera_runtime.bundle import load_bundle
    from itera_runtime.session import ModelSession

    text = tmp_path / "held_out.txt"
    text.write_text(TEXT, encoding="utf-8")
    window = 32
    proc = bench("quality", tiny_itera.bundle, tiny_itera_int8.bundle, "--data", text, "--window", window,
                 "--stride", window, "--reference", tiny_itera.bundle, "-o", "json")
    out = {r["metric"]: r for r in rows(proc) if r["quantization"] == "int8"}
    assert {"kl_divergence", "kl_divergence_p99", "top1_agreement"} <= out.keys()

    def logits(path):
        b = load_bundle(path)
        ids = encode_documents(b.load_tokenizer(), [read_document(text)])  # the file as the CLI reads it
        session, blocks = ModelSession(b, threads=1), []
        for first in range(1, len(ids), window):  # disjoint blocks of targets; the last one's window is full
            last = min(first + window, len(ids))
            inputs = ids[max(0, last - 1 - window):last - 1]
            rows = np.concatenate([c for c, _ in session.forward_chunks(inputs, chunk=window)])
            blocks.append(rows[len(rows) - (last - first):])
        return np.concatenate(blocks).astype(np.float64)

    ref, q = logits(tiny_itera.bundle), logits(tiny_itera_int8.bundle)
    p_ref = np.exp(ref - ref.max(1, keepdims=True))
    p_ref /= p_ref.sum(1, keepdims=True)
    p_q = np.exp(q - q.max(1, keepdims=True))
    p_q /= p_q.sum(1, keepdims=True)
    kl = (p_ref * np.log(p_ref / p_q)).sum(1)
    assert out["kl_divergence"]["median"] > 0
    assert out["kl_divergence"]["median"] == pytest.approx(kl.mean(), rel=1e-6)
    assert out["kl_divergence_p99"]["median"] == pytest.approx(np.percentile(kl, 99), rel=1e-6)
    assert out["top1_agreement"]["median"] == pytest.approx((ref.argmax(1) == q.argmax(1)).mean())
    assert out["kl_divergence"]["extra"]["n_positions"] == len(kl) and out["top1_agreement"]["higher_is_better"]
    assert "kl_divergence" not in {r["metric"] for r in rows(proc) if r["quantization"] != "int8"}
