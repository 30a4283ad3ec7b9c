"""GGUF export of the baseline and llama.cpp as a comparison engine in itera-bench latency.

The llama.cpp tests need llama-cpp-python (extra `llamacpp`, built from source: minutes). CI
installs it and sets ITERA_REQUIRE_LLAMACPP=1, so there a missing engine fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("ITERA_REQUIRE_LLAMACPP"):
            raise
        pytest.skip("llama-cpp-python not installed (pip install 'itera-lite[llamacpp]')")
    return llama_cpp


@pytest.fixture(scope="module")
def ggufs(tiny_baseline, tmp_path_factory):
    from itera_export.gguf import export_gguf

    root = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(tiny_baseline.checkpoint, root / f"tiny-{q}.gguf", quantize=q)["path"]
            for q in ("none", "int8", "int4")}


def _torch_model(ckpt):
    from itera_lite.checkpoint import load_model

    return load_model(ckpt)[0].eval()


def test_weights_round_trip(tiny_baseline, ggufs):
    from itera_export.gguf import _permute_rope, read_tensors

    model = _torch_model(tiny_baseline.checkpoint)
    sd = {k.removeprefix("llama."): v.float().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    f32 = read_tensors(ggufs["none"])
    assert np.array_equal(f32["token_embd.weight"], sd["model.embed_tokens.weight"])
    assert np.array_equal(f32["blk.1.ffn_down.weight"], sd["model.layers.1.mlp.down_proj.weight"])
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(f32["blk.0.attn_q.weight"], _permute_rope(q, cfg.n_heads))
    assert not np.array_equal(f32["blk.0.attn_q.weight"], q)  # the permutation did something
    assert "output.weight" not in f32  # tied: llama.cpp reuses token_embd as the head
    q8 = read_tensors(ggufs["int8"])
    w = sd["model.layers.1.mlp.up_proj.weight"]
    err = np.abs(q8["blk.1.ffn_up.weight"] - w).max()
    assert 0 < err < np.abs(w).max() / 100  # q8_0: one scale per 32 weights, 8 bits
    sizes = [os.path.getsize(ggufs[k]) for k in ("none", "int8", "int4")]
    assert sizes[0] > sizes[1] > sizes[2]


@pytest.mark.slow
def test_refusals(tiny_itera, tiny_baseline, ggufs, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "itera_export.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=300)

    r = run(tiny_itera.checkpoint, "--format", "gguf", "-o", tmp_path / "x.gguf")
    assert r.returncode == 1 and "only baseline checkpoints" in r.stderr and "Traceback" not in r.stderr
    precious = tmp_path / "notes.gguf"
    precious.write_text("mine")
    r = run(tiny_baseline.checkpoint, "--format", "gguf", "-o", precious, "--force")
    assert r.returncode == 1 and "not a GGUF written by itera-export" in r.stderr
    assert precious.read_text() == "mine"
    r = run(tiny_baseline.checkpoint, "--format", "gguf", "-o", ggufs["none"], "--force")
    assert r.returncode == 0, r.stderr
    assert not [p for p in os.listdir(os.path.dirname(ggufs["none"])) if p.endswith(".tmp")]


def test_llama_cpp_logits_match_torch(tiny_baseline, ggufs):
    llama_cpp = _llama_cpp()
    model = _torch_model(tiny_baseline.checkpoint)
    llm = llama_cpp.Llama(model_path=ggufs["none"], n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    ids = llm.tokenize("To be, or not to be".encode(), add_bos=False)
    from tokenizers import Tokenizer

    from itera_lite.checkpoint import load_checkpoint

    ours = Tokenizer.from_str(load_checkpoint(tiny_baseline.checkpoint)["tokenizer_json"]).encode("To be, or not to be").ids
    assert ids == ours  # the tokenizer maps one to one
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() < 1e-3
    # The bench's greedy pick reads llama.cpp's last logits in place, at any depth (past n_batch too)
    from itera_bench.llamacpp import GgufModel, GgufTarget

    target = GgufTarget(GgufModel(ggufs["none"]), 1, "off")
    for depth in (20, 600):
        target.at_depth(depth)
        with torch.no_grad():
            last = model(torch.tensor([target.context(depth).tolist()])).logits[0, -1].numpy()
        assert target._greedy() == int(np.argmax(last))


def test_bench_latency_row(tiny_baseline, ggufs):
    _llama_cpp()
    r = subprocess.run([sys.executable, "-m", "itera_bench.cli", "latency", str(tiny_baseline.bundle), ggufs["int8"],
                        "-p", "16", "-n", "8", "-d", "0,32", "-r", "2", "-o", "json", "--flash-attn", "off"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    cpp = [row for row in rows if row["engine"] == "llama.cpp"]
    assert {row["test"] for row in cpp} == {"pp16", "pp16@d32", "tg8", "tg8@d32"}
    assert all(row["quantization"] == "int8" and row["avg_ts"] > 0 and row["extra"]["flash_attn"] is False
               for row in cpp)
    assert all(row["vs_baseline"] for row in cpp)  # ratios against the ONNX baseline bundle, same run
    r = subprocess.run([sys.executable, "-m", "itera_bench.cli", "step", ggufs["int8"]],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error:") and "`itera-bench latency` only" in r.stderr
