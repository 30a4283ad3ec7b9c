"""Itera-Lite → ONNX: custom ai.itera nodes, their shipped functions, the fused lowering, and
parity of both paths with torch through the runtime (validate.compare, as the exporter runs it)."""

from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxscript")

from itera_export.exporter import export_checkpoint  # noqa: E402
from itera_export.itera import export_itera_graphs  # noqa: E402
from itera_export.lower import fused_ops_available  # noqa: E402
from itera_export.validate import compare, greedy_tokens  # noqa: E402
from itera_lite.checkpoint import save_checkpoint  # noqa: E402
from itera_lite.data import train_tokenizer  # noqa: E402
from itera_lite.models.config import config_to_dict  # noqa: E402
from itera_lite.models.moe import route  # noqa: E402
from itera_runtime import Generator, SamplingConfig, load_bundle  # noqa: E402
from itera_runtime.options import make_session  # noqa: E402
from tinymodel import tiny_model  # noqa: E402
from itera_runtime.session import ModelSession  # noqa: E402

TOL = 1e-4
VOCAB = 256
PATHS = ("none", "fused")


@pytest.fixture(scope="module")
def model():
    return tiny_model("itera")  # the conftest bundles' model: their trace serves these exports


@pytest.fixture(scope="module")
def bundles(model, tmp_path_factory):
    """Full bundles of both SSM paths from one checkpoint (the trace is cached, so the second
    export only lowers)."""
    root = tmp_path_factory.mktemp("itera")
    ckpt = root / "tiny.pt"
    save_checkpoint(ckpt, {"model_config": config_to_dict(model.config), "model": model.state_dict(),
                           "tokenizer_json": train_tokenizer(["x"], VOCAB).to_str()})
    return {lower: export_checkpoint(ckpt, root / lower, lower=lower)[0] for lower in PATHS}


def _tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


# --- graph structure ----------------------------------------------------------------------


def _ops(model: onnx.ModelProto) -> set[tuple[str, str]]:
    return {(n.domain, n.op_type) for n in model.graph.node}


def test_function_path_has_custom_nodes_and_functions(bundles):
    d = bundles["none"]
    prefill, decode = onnx.load(d / "prefill.onnx"), onnx.load(d / "decode.onnx")
    assert {("ai.itera", "SelectiveScan"), ("ai.itera", "CausalConv1d"), ("ai.itera", "TopKMoE")} <= _ops(prefill)
    assert {("ai.itera", "SsmStep"), ("ai.itera", "CausalConv1d"), ("ai.itera", "TopKMoE")} <= _ops(decode)
    assert ("ai.itera", "SsmStep") not in _ops(prefill)
    for m in (prefill, decode):
        called = {op for dom, op in _ops(m) if dom == "ai.itera"}
        assert {f.name for f in m.functions if f.domain == "ai.itera"} == called
        moe = next(n for n in m.graph.node if n.op_type == "TopKMoE")
        assert [a.i for a in moe.attribute if a.name == "top_k"] == [2]
    manifest = load_bundle(d).manifest
    assert manifest.ssm_path == "function"
    assert manifest.custom_domains == {"ai.itera": 1}


def test_fused_path_uses_contrib_ops_only(bundles):
    d = bundles["fused"]
    for g in ("prefill", "decode"):
        m = onnx.load(d / f"{g}.onnx")
        ops = _ops(m)
        if g == "decode":
            assert {("com.microsoft", "LinearAttention"), ("com.microsoft", "CausalConvWithState"),
                    ("com.microsoft", "MoE")} <= ops
        else:  # a prompt's scan is the chunked one, inlined: LinearAttention loops over tokens;
            # its experts are matmuls over their routed rows (export/route_experts.py)
            assert {("", "Conv"), ("", "Gemm"), ("", "ScatterND")} <= ops
            assert not ops & {("com.microsoft", "LinearAttention"), ("com.microsoft", "MoE")}
        assert not any(dom == "ai.itera" for dom, _ in ops)
        assert not m.functions
    manifest = load_bundle(d).manifest
    assert manifest.ssm_path == "lowered"
    assert manifest.custom_domains == {"com.microsoft": 1}


def test_fused_decode_graph_has_no_per_token_layout_work(bundles):
    """The one-token graph runs the conv on the state as carried (no Transposes, no size-1
    Gathers) and the dt softplus as one node; prefill runs a depthwise Conv over [state, x]."""
    decode = onnx.load(bundles["fused"] / "decode.onnx")
    ops = [n.op_type for n in decode.graph.node]
    assert "Greater" not in ops and "Where" not in ops
    assert ops.count("Gather") == 1  # the embedding lookup
    state_readers = {n.op_type for n in decode.graph.node for i in n.input if i.startswith("past.")}
    assert state_readers == {"CausalConvWithState", "LinearAttention"}
    convs = [n for n in decode.graph.node if n.op_type == "CausalConvWithState"]
    assert convs and all(a.i == 1 for n in convs for a in n.attribute if a.name == "channels_last")
    assert all(n.input[3].startswith("past.") and n.output[1].startswith("present.") for n in convs)
    prefill = onnx.load(bundles["fused"] / "prefill.onnx")
    assert not [n for n in prefill.graph.node if n.op_type == "CausalConvWithState"]  # a depthwise Conv
    assert all(a.i == 320 for n in prefill.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group")


# Nodes onnxruntime runs per token in the tiny fused decode graph after ORT_ENABLE_ALL (4 layers).
# Issue 29's goal is 64; 129 before the one-token layout, the skip-norm fusion, the packed D
# skip, the 3-D MoE input and a channels-last conv state (94), then the key read per group
# (no Tile), the embedding gathered from (B, 1) ids, no Reshape on the logits and the dt path
# in one LinearAttentionGate (79, int8/int4 too). What is left per layer (bench/PROFILE.md):
# the router's flattening Reshape (MoE takes 2-D router logits only), dt·x (MatMul, Mul),
# the D skip (Mul, Add) and the gate (QuickGelu, Mul), around the 13 that do the work.
TINY_DECODE_NODES = 79


def _optimized_nodes(path, tmp_path) -> list[str]:
    out = tmp_path / "optimized.onnx"
    make_session(path, threads=1, optimized_model_path=str(out))
    return [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]


def test_tiny_fused_decode_graph_node_count(bundles, tmp_path):
    """The dispatch-bound tiny decode: what onnxruntime actually runs per token, counted."""
    ops = _optimized_nodes(bundles["fused"] / "decode.onnx", tmp_path)
    assert len(ops) <= TINY_DECODE_NODES, sorted(ops)
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * 4  # every residual add fused into a norm
    assert ops.count("Reshape") <= 4, sorted(ops)  # the routers' flattening only
    assert "Tile" not in ops and "Unsqueeze" not in ops and "Softplus" not in ops, sorted(ops)
    assert ops.count("LinearAttentionGate") == 4


@pytest.mark.parametrize("lower", PATHS)
def test_prompt_scan_exp_inputs_never_underflow(bundles, lower):
    """onnxruntime's CPU Exp runs ~18x slower where its result is denormal or zero (inputs below
    about -87.3, or the -inf of a causal mask): the prompt scan floors its exponents at
    DECAY_FLOOR and masks after exp. Every Exp of the prompt graph (functions inlined) is run
    on a 70-token prompt with its input read back; the old scan fed -inf above each diagonal."""
    from onnx.inliner import inline_local_functions

    from itera_lite.models.ssm import DECAY_FLOOR
    from itera_runtime.bundle import initial_state

    bundle = load_bundle(bundles[lower])
    graph = inline_local_functions(onnx.load(str(bundle.graph_path("prefill"))))
    exp_inputs = sorted({n.input[0] for n in graph.graph.node if n.op_type == "Exp"})
    assert exp_inputs, "the prompt scan has no Exp"
    graph.graph.output.extend(onnx.ValueInfoProto(name=name) for name in exp_inputs)
    session = make_session(graph.SerializeToString(), threads=1)
    feeds = {"input_ids": _tokens(70, 6)[None], **initial_state(bundle)}
    feeds = {i.name: feeds.get(i.name, np.zeros([1], np.int64)) for i in session.get_inputs()}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    lowest = {name: float(outputs[name].min()) for name in exp_inputs}
    assert min(lowest.values()) >= DECAY_FLOOR > -87.3, lowest


@pytest.mark.parametrize("lower", PATHS)
def test_checker_and_shape_inference(bundles, lower):
    d = bundles[lower]
    for g in ("prefill", "decode"):
        onnx.checker.check_model(str(d / f"{g}.onnx"), full_check=True)
        onnx.shape_inference.infer_shapes(onnx.load(d / f"{g}.onnx"), strict_mode=True)


def test_manifest(bundles, model):
    m = load_bundle(bundles["none"]).manifest
    cfg = model.config
    assert (m.io.input_ids, m.io.logits, m.io.attention_mask, m.io.position_ids) == ("input_ids", "logits", None, None)
    pre, dec = m.graphs["prefill"], m.graphs["decode"]
    assert (pre.inputs[0].name, pre.inputs[0].dtype, pre.inputs[0].shape) == ("input_ids", "int64", ["batch", "seq"])
    assert (pre.outputs[0].name, pre.outputs[0].shape) == ("logits", ["batch", "kept", VOCAB])  # io.logits_start's
    assert dec.inputs[0].shape == ["batch", 1] and dec.outputs[0].shape == ["batch", 1, VOCAB]
    # Both graphs read the one shared weights file, and the manifest pins it.
    assert pre.external_data == dec.external_data == ["weights.bin"] and "weights.bin" in m.files
    tensors = m.state.tensors
    assert m.state.kind == "ssm" and len(tensors) == 2 * cfg.n_layers
    conv_shape, ssm_shape = model.blocks[0].mixer.state_shapes(1)
    assert (tensors[0].input, tensors[0].output, tensors[0].shape) == ("past.0.conv", "present.0.conv",
                                                                       ["batch", *conv_shape[1:]])
    assert tensors[1].input == "past.0.ssm" and tensors[1].shape == ["batch", *ssm_shape[1:]]
    assert [t.name for t in dec.inputs] == ["input_ids"] + [t.input for t in tensors]
    # The prompt graph alone picks which positions its head runs on (decode has one position).
    assert m.io.logits_start == "logits_start" and [t.name for t in pre.inputs] == [t.name for t in dec.inputs] + [
        "logits_start"]
    # The state the manifest declares is the state the runtime holds.
    session = ModelSession(load_bundle(bundles["none"]), threads=1)
    _, state = session.prefill(_tokens(5, 0))
    assert state.nbytes == m.state.nbytes() == sum(np.prod(s) * 4 for s in (conv_shape, ssm_shape)) * cfg.n_layers


def test_auto_picks_fused_when_available(model, tmp_path):
    parts = export_itera_graphs(model, tmp_path, graph_set="auto")
    assert parts.graph_set == ("fused" if fused_ops_available() else "portable")


# --- numerics through the runtime -----------------------------------------------------------


@pytest.mark.parametrize("lower", PATHS)
@pytest.mark.parametrize("length", [1, 9, 70])
def test_prefill_parity(model, bundles, lower, length):
    v = compare(model, bundles[lower], _tokens(length + 4, length), prompt_len=length)
    assert v.prefill_logits <= TOL and v.prefill_state <= TOL and v.decode_logits <= TOL


@pytest.mark.parametrize("lower", PATHS)
def test_decode_64_steps_parity(model, bundles, lower):
    v = compare(model, bundles[lower], _tokens(5 + 64, 1), prompt_len=5)
    assert v.decode_steps == 64 and v.max_abs_diff <= TOL and v.decode_top1_agreement == 1.0


@pytest.mark.parametrize("lower", PATHS)
def test_greedy_tokens_identical(model, bundles, lower):
    prompt = _tokens(5, 2).tolist()
    got = Generator(bundles[lower], threads=1).generate_ids(prompt, 64, SamplingConfig(temperature=0))
    assert got == greedy_tokens(model, np.array(prompt), 64)


@pytest.mark.parametrize("lower", PATHS)
def test_chunked_prefill_carries_the_state(bundles, lower):
    """A prompt fed in chunks of 8 gives the logits and state of one call over it all."""
    session = ModelSession(load_bundle(bundles[lower]), threads=1)
    ids = _tokens(70, 3)
    whole, whole_state = next(session.forward_chunks(ids, chunk=len(ids)))
    parts = list(session.forward_chunks(ids, chunk=8))
    assert len(parts) == 9
    assert np.abs(np.concatenate([p for p, _ in parts]) - whole).max() <= TOL
    assert max(np.abs(a - b).max() for a, b in zip(parts[-1][1].numpy(), whole_state.numpy())) <= TOL


@pytest.mark.parametrize("lower", PATHS)
def test_prompt_head_runs_on_the_last_position_when_only_that_is_read(bundles, lower):
    """Generation's prefill (io.logits_start = -1) computes one row of logits, the last of what scoring reads."""
    session = ModelSession(load_bundle(bundles[lower]), threads=1)
    ids = _tokens(70, 3)
    every, every_state = next(session.forward_chunks(ids, chunk=len(ids)))
    last, last_state = next(session.forward_chunks(ids, chunk=len(ids), last_only=True))
    assert every.shape == (70, VOCAB) and last.shape == (1, VOCAB)
    assert np.abs(last[0] - every[-1]).max() <= TOL
    assert max(np.abs(a - b).max() for a, b in zip(last_state.numpy(), every_state.numpy())) == 0
    assert np.abs(session.prefill(ids, chunk=8)[0] - every[-1]).max() <= TOL


def test_fused_matches_function(bundles):
    ids = _tokens(33, 4)
    sessions = [ModelSession(load_bundle(bundles[p]), threads=1) for p in PATHS]
    outs = [s.forward_chunks(ids) for s in sessions]
    (a, sa), (b, sb) = next(outs[0]), next(outs[1])
    assert np.abs(a - b).max() <= TOL
    for token in _tokens(16, 5):
        (la, sa), (lb, sb) = sessions[0].decode(int(token), sa), sessions[1].decode(int(token), sb)
        assert np.abs(la - lb).max() <= TOL


# --- every expert reachable ---------------------------------------------------------------


def _layer0_experts(model, tokens: torch.Tensor) -> np.ndarray:
    """(T, k) experts layer 0 picks for each single-token decode step from zero state."""
    logits = []
    hook = model.blocks[0].moe.router.register_forward_hook(lambda m, i, o: logits.append(o))
    try:
        with torch.no_grad():
            model.step(tokens, model.allocate_state(len(tokens)))
    finally:
        hook.remove()
    return route(logits[0], model.config.top_k)[1].numpy()


@pytest.mark.parametrize("lower", PATHS)
def test_every_expert_reachable(model, bundles, lower):
    """Zeroing expert e's down-projection in the ONNX file changes exactly the tokens routed to e."""
    proto = onnx.load(bundles[lower] / "decode.onnx")  # external weights loaded inline
    tokens = torch.arange(VOCAB)
    chosen = _layer0_experts(model, tokens)  # (VOCAB, k)
    # All VOCAB tokens as one batch of single-token steps from zero state.
    feed = {"input_ids": tokens.numpy()[:, None]}
    for i, (c, s) in enumerate(model.allocate_state(VOCAB)):
        feed[f"past.{i}.conv"], feed[f"past.{i}.ssm"] = c.numpy(), s.numpy()
    base = make_session(proto.SerializeToString(), threads=1).run(["logits"], feed)[0][:, 0]
    w_down = "model.blocks.0.moe.w_down"  # fc2 of com.microsoft::MoE in the fused path too
    for e in range(model.config.n_experts):
        routed = (chosen == e).any(-1)
        assert routed.any(), f"no token routes to expert {e}; pick another seed"
        crafted = copy.deepcopy(proto)
        init = next(i for i in crafted.graph.initializer if i.name == w_down)
        w = onnx.numpy_helper.to_array(init).copy()
        w[e] = 0.0
        init.CopyFrom(onnx.numpy_helper.from_array(w, w_down))
        out = make_session(crafted.SerializeToString(), threads=1).run(["logits"], feed)[0][:, 0]
        change = np.abs(out - base).max(-1)
        assert (change[routed] > 1e-4).all(), f"expert {e} unreachable in the {lower} path"
        assert (change[~routed] <= 1e-5).all(), f"expert {e} changed tokens not routed to it"


def test_a_trace_folder_serves_other_processes_and_an_edit_traces_again(model, bundles, tmp_path, monkeypatch):
    """use_trace_dir: a process with nothing in memory reads the folder's trace instead of tracing;
    an entry of another code version (an edited model or exporter) is not read."""
    from itera_export import itera, tracecache

    traced = itera._function_graphs(model, itera.OPSET)  # the fixtures' trace, in memory
    calls = []
    monkeypatch.setattr(itera, "_trace_both", lambda m, opset: calls.append(opset) or traced)  # a trace, fast
    monkeypatch.setattr(tracecache, "_DIR", tmp_path / "traces")
    monkeypatch.setattr(tracecache, "_KEPT", {})
    itera.export_itera_graphs(model, tmp_path / "a")  # nothing on disk: traces and writes it
    assert len(calls) == 1 and len(list((tmp_path / "traces").glob("*.entry"))) == 1
    monkeypatch.setattr(tracecache, "_KEPT", {})  # another process: memory empty, the folder kept
    itera.export_itera_graphs(model, tmp_path / "b")
    assert len(calls) == 1
    assert (tmp_path / "a" / "decode.onnx").read_bytes() == (tmp_path / "b" / "decode.onnx").read_bytes()

    monkeypatch.setattr(tracecache, "_KEPT", {})
    monkeypatch.setattr(tracecache, "code_version", lambda: "an edited exporter")
    itera.export_itera_graphs(model, tmp_path / "c")
    assert len(calls) == 2


def test_kernels_are_traced_once_per_sizes_and_shared_by_models_of_those_sizes(tmp_path, monkeypatch):
    """An imported Mamba-2 with the tiny preset's SSM sizes reads the tiny model's SSM kernels, from
    another process's trace folder; other sizes trace their own; a model without experts has no MoE."""
    import functools

    from itera_export import onnx_functions as of
    from itera_export import tracecache
    from itera_lite.models import make_config

    made = []

    def fake(make):
        @functools.wraps(make)
        def traced(*dims):
            made.append((make.__name__, dims))
            return {p: onnx.helper.make_function(of.DOMAIN, p, [], [], [], []).SerializeToString()
                    for p in of._PARTS[make.__name__]}
        return traced

    for name in of._PARTS:
        monkeypatch.setattr(of, name, fake(getattr(of, name)))
    monkeypatch.setattr(tracecache, "_DIR", tmp_path / "traces")
    monkeypatch.setattr(tracecache, "_KEPT", {})
    tiny = make_config("itera", "tiny", vocab_size=256)
    assert [f.name for f in of.itera_functions(tiny, 18)] == ["conv", "scan", "step", "moe"]
    assert [m for m, _ in made] == ["_ssm_decompositions", "_moe_decomposition"]

    monkeypatch.setattr(tracecache, "_KEPT", {})  # another process
    plain = make_config("itera", "tiny", vocab_size=300, n_layers=2, n_experts=0, proj_bias=True)
    assert [f.name for f in of.itera_functions(plain, 18)] == ["conv", "scan", "step"]
    assert len(made) == 2
    of.itera_functions(make_config("itera", "tiny", vocab_size=256, d_state=16), 18)
    assert made[2:] == [("_ssm_decompositions", (8, 32, 16, 1, 288, 4, 18))]


def test_a_trace_folder_keeps_its_newest_entries_whole(tmp_path, monkeypatch):
    """drop_old_entries deletes every file of the oldest entries (parts, marker, lock), none of the rest."""
    from itera_export import tracecache

    monkeypatch.setattr(tracecache, "_DIR", tmp_path)
    monkeypatch.setattr(tracecache, "_KEPT", {})
    monkeypatch.setattr(tracecache, "code_version", lambda: "v")
    for i in range(3):
        tracecache.kept(("entry", i), ("a", "b"), lambda: {"a": b"1", "b": b"2"})
        stem = tracecache._stem(("entry", i))
        for f in tmp_path.glob(f"{stem.name}.*"):
            os.utime(f, (1000 + i, 1000 + i))
    tracecache.drop_old_entries(tmp_path, keep=2)
    left = {p.name.split(".")[0] for p in tmp_path.iterdir()}
    assert left == {tracecache._stem(("entry", i)).name for i in (1, 2)}
    assert len(list(tmp_path.iterdir())) == 2 * 4  # two parts, the marker and the lock each
