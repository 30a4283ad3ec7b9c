"""GGUF export of both families and llama.cpp as a comparison engine in itera-bench.

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
def test_refusals(tiny_baseline, ggufs, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "itera_export.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=300)

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
                        "-p", "16", "-n", "8", "-d", "0,32", "-r", "2", "-o", "json", "--flash-attn", "off",
                        "--llamacpp-loop", "decode"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    cpp = [row for row in rows if row["engine"] == "llama.cpp"]
    assert {row["test"] for row in cpp} == {"pp16", "pp16@d32", "tg8", "tg8@d32"}
    assert all(row["quantization"] == "int8" and row["avg_ts"] > 0 and row["extra"]["flash_attn"] is False
               for row in cpp)
    assert all(row["vs_baseline"] for row in cpp)  # ratios against the ONNX baseline bundle, same run
    r = subprocess.run([sys.executable, "-m", "itera_bench.cli", "memory", ggufs["int8"]],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error:") and "`itera-bench latency`, `step`" in r.stderr


# ------------------------------------------------------------------ Itera-Lite as granitehybrid


@pytest.fixture(scope="module")
def itera_ggufs(tiny_itera, tmp_path_factory):
    from itera_export.gguf import export_gguf

    root = tmp_path_factory.mktemp("itera-gguf")
    return {q: export_gguf(tiny_itera.checkpoint, root / f"itera-{q}.gguf", quantize=q)["path"]
            for q in ("none", "int8", "int4")}


def _router_ties(model, ids: list[int], tol: float = 1e-5) -> set[int]:
    """Positions where some layer's k-th and (k+1)-th expert probabilities are within tol: float
    rounding may route them either way, so two exact engines can differ there."""
    tied: set[int] = set()
    k = model.config.top_k

    def hook(module, inputs, out):
        probs = torch.softmax(out.float(), -1).sort(-1, descending=True).values
        tied.update(torch.nonzero(probs[:, k - 1] - probs[:, k] < tol).flatten().tolist())

    hooks = [blk.moe.router.register_forward_hook(hook) for blk in model.blocks]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return tied


def test_itera_gguf_is_granitehybrid_with_f32_ssm_tensors(itera_ggufs, tiny_itera):
    import gguf

    from itera_export.gguf import read_tensors

    model = _torch_model(tiny_itera.checkpoint)
    reader = gguf.GGUFReader(itera_ggufs["int4"])
    assert reader.fields["general.architecture"].contents() == "granitehybrid"
    assert "inert" in reader.fields["itera.inert_attention_layer"].contents()
    n_layers = model.config.n_layers  # the inert attention layer comes after these
    assert reader.fields["granitehybrid.attention.head_count_kv"].contents() == [0] * n_layers + [1]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert all(types[f"blk.0.{n}"] == "F32" for n in ("ssm_conv1d.weight", "ssm_a", "ssm_d", "ssm_dt.bias",
                                                       "ssm_norm.weight", "ffn_gate_inp.weight"))
    assert types["blk.0.ssm_in.weight"] == "Q4_0" and types["blk.0.ffn_down_exps.weight"] == "Q4_0"
    f32 = read_tensors(itera_ggufs["none"])
    m = model.blocks[1].mixer
    assert np.array_equal(f32["blk.1.ssm_a"][:, 0], -torch.exp(m.A_log).detach().numpy())
    assert np.array_equal(f32["blk.1.ssm_in.weight"], m.in_proj.weight.detach().numpy())
    inert = f"blk.{n_layers}"
    assert not f32[f"{inert}.attn_output.weight"].any() and not f32[f"{inert}.ffn_down_exps.weight"].any()


def test_itera_gguf_logits_match_torch(itera_ggufs, tiny_itera):
    """f32 GGUF in llama.cpp = torch, on a prompt and token by token (expert-score ties counted)."""
    llama_cpp = _llama_cpp()
    model = _torch_model(tiny_itera.checkpoint)
    llm = llama_cpp.Llama(model_path=itera_ggufs["none"], n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    ids = llm.tokenize(("To be, or not to be, that is the question: " * 3).encode(), add_bos=False)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    tied = _router_ties(model, ids)
    keep = [i for i in range(len(ids)) if i not in tied]
    assert len(tied) <= len(ids) // 20, f"{len(tied)} of {len(ids)} positions with tied expert scores"
    llm.eval(ids)
    prompt = np.asarray(llm.scores[: len(ids)])
    llm.reset()
    for t in ids:
        llm.eval([t])
    stepped = np.asarray(llm.scores[: len(ids)])
    scale = np.abs(want).max()
    for got in (prompt, stepped):
        assert np.abs(got[keep] - want[keep]).max() < 1e-5 * max(1.0, scale)
        assert (got[keep].argmax(-1) == want[keep].argmax(-1)).all()


def test_itera_gguf_bits_per_byte_and_bench_rows(itera_ggufs, tiny_itera, tmp_path):
    """q8_0/q4_0 bits/byte through llama.cpp within 1% of the fp32 bundle's (onnxruntime) on the same
    text; and decode rows at depth 128 and 2048 (the recurrent state restored per repetition)."""
    _llama_cpp()
    from clirun import invoke

    from itera_bench.cli import main

    text = tmp_path / "hamlet.txt"
    text.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 12)
    r = invoke(main, "quality", tiny_itera.bundle, itera_ggufs["none"], itera_ggufs["int8"], itera_ggufs["int4"],
               "--data", text, "--window", "64", "-o", "json")
    assert r.returncode == 0, r.stderr
    bpb = {os.path.basename(row["bundle"]): row["median"] for row in json.loads(r.stdout)
           if row["metric"] == "bits_per_byte"}
    ref = bpb[os.path.basename(str(tiny_itera.bundle))]
    assert abs(bpb["itera-none.gguf"] / ref - 1) < 1e-4  # same text, same tokens, same model
    for q in ("int8", "int4"):
        assert abs(bpb[f"itera-{q}.gguf"] / ref - 1) < 0.01
    r = invoke(main, "latency", itera_ggufs["int8"], "-p", "0", "-n", "4", "-d", "128,2048", "-r", "1",
               "--no-warmup", "--flash-attn", "off", "--llamacpp-loop", "decode", "-o", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["test"] for row in rows} == {"tg4@d128", "tg4@d2048"}
    assert all(row["family"] == "itera" and row["avg_ts"] > 0 and row["extra"]["depth"] == "state restored"
               and row["extra"]["loop"].startswith("llama_decode") for row in rows)


# ------------------------------------------------------------------ llama.cpp's own llama-bench


def _llama_bench() -> str:
    from itera_bench.llamacpp import find_llama_bench

    path = find_llama_bench()
    if path is None:
        if os.environ.get("ITERA_REQUIRE_LLAMACPP"):
            raise AssertionError("CI needs llama.cpp's llama-bench: set ITERA_LLAMA_BENCH (.ci/run builds it)")
        pytest.skip("no llama-bench binary (set ITERA_LLAMA_BENCH or put it on PATH)")
    return path


def test_llama_bench_binary_rows(itera_ggufs, ggufs):
    """`--llamacpp-loop llama-bench` (and `auto` where it is installed) times both families with llama.cpp's
    own binary: one llama-bench run per repetition, its build in the row, Itera's depth by its own rules."""
    binary = _llama_bench()
    from clirun import invoke

    from itera_bench.cli import main

    r = invoke(main, "latency", itera_ggufs["int8"], ggufs["int8"], "-p", "16", "-n", "4", "-d", "0,64", "-r", "2",
               "--no-warmup", "-o", "json", env={"ITERA_LLAMA_BENCH": binary})
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert sorted((row["family"], row["test"]) for row in rows) == sorted(
        (fam, t) for fam in ("itera", "baseline") for t in ("pp16", "pp16@d64", "tg4", "tg4@d64"))
    for row in rows:
        assert row["extra"]["loop"].startswith("the llama-bench binary") and row["extra"]["llama_bench"]
        assert len(row["samples"]) == 2 and all(v > 0 for v in row["samples"]) and row["engine"] == "llama.cpp"
        assert isinstance(row["extra"]["flash_attn"], bool)  # auto: the faster of the two, picked at set-up


def test_llama_bench_binary_refusals(ggufs, tmp_path):
    """An asked-for binary that is missing or not llama-bench is one line, exit 1; auto without one
    falls back to llama-cpp-python's decode loop and says so in the rows."""
    _llama_cpp()
    from clirun import invoke

    from itera_bench.cli import main

    args = ("latency", ggufs["int8"], "-p", "0", "-n", "2", "-d", "0", "-r", "1", "--no-warmup", "--flash-attn",
            "off", "-o", "json")
    r = invoke(main, *args, env={"ITERA_LLAMA_BENCH": str(tmp_path / "nope")})
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "ITERA_LLAMA_BENCH" in r.stderr, r.stderr
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\necho 'not a bench'\n")
    fake.chmod(0o755)
    r = invoke(main, *args, env={"ITERA_LLAMA_BENCH": str(fake)})
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no JSON rows" in r.stderr, r.stderr
    r = invoke(main, *args, "--llamacpp-loop", "llama-bench", env={"ITERA_LLAMA_BENCH": "", "PATH": str(tmp_path / "bin")})
    assert r.returncode == 1 and "no llama-bench binary" in r.stderr, r.stderr
    r = invoke(main, *args, env={"ITERA_LLAMA_BENCH": "", "PATH": str(tmp_path / "bin")})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["extra"]["loop"].startswith("llama_decode")
