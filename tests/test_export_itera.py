"""Itera-Lite → ONNX: custom ai.itera nodes, their shipped functions, the fused lowering,
and parity of both paths with torch in onnxruntime (CPU, ORT_ENABLE_ALL)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from itera_export.itera import export_itera_graphs  # noqa: E402
from itera_export.lower import fused_ops_available  # noqa: E402
from itera_lite.models import build_model, make_config  # noqa: E402
from itera_lite.models.moe import route  # noqa: E402

TOL = 1e-4
VOCAB = 256
PATHS = ("none", "fused")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Tiny eager ops on a shared 2-vCPU box: OpenMP spin-waiting made model.step ~100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(make_config("itera", "tiny", vocab_size=VOCAB)).eval()


@pytest.fixture(scope="module")
def bundles(model, tmp_path_factory):
    # The trace is cached per weights, so the second export only lowers.
    out = {}
    for lower in PATHS:
        d = tmp_path_factory.mktemp(f"itera_{lower}")
        out[lower] = (d, export_itera_graphs(model, d, lower=lower))
    return out


def _session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so,
                                providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def sessions(bundles):
    return {lower: {g: _session(d / f"{g}.onnx") for g in ("prefill", "decode")}
            for lower, (d, _) in bundles.items()}


def _feed(tokens: np.ndarray, state) -> dict:
    feed = {"input_ids": tokens.astype(np.int64)}
    for i, (c, s) in enumerate(state):
        feed[f"past.{i}.conv"] = np.asarray(c, dtype=np.float32)
        feed[f"past.{i}.ssm"] = np.asarray(s, dtype=np.float32)
    return feed


def _pairs(flat) -> list:
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)]


def _random_state(model, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(c.shape, generator=g), 0.1 * torch.randn(s.shape, generator=g))
            for c, s in model.allocate_state(batch)]


def _max_state_diff(ort_state, torch_state) -> float:
    return max(float(np.abs(o - t.numpy()).max())
               for (oc, os_), (tc, ts) in zip(ort_state, torch_state)
               for o, t in ((oc, tc), (os_, ts)))


# --- graph structure ----------------------------------------------------------------------


def _ops(model: onnx.ModelProto) -> set[tuple[str, str]]:
    return {(n.domain, n.op_type) for n in model.graph.node}


def test_function_path_has_custom_nodes_and_functions(bundles):
    d, manifest = bundles["none"]
    prefill, decode = onnx.load(d / "prefill.onnx"), onnx.load(d / "decode.onnx")
    assert {("ai.itera", "SelectiveScan"), ("ai.itera", "CausalConv1d"), ("ai.itera", "TopKMoE")} <= _ops(prefill)
    assert {("ai.itera", "SsmStep"), ("ai.itera", "CausalConv1d"), ("ai.itera", "TopKMoE")} <= _ops(decode)
    assert ("ai.itera", "SsmStep") not in _ops(prefill)
    for m in (prefill, decode):
        called = {op for dom, op in _ops(m) if dom == "ai.itera"}
        assert {f.name for f in m.functions if f.domain == "ai.itera"} == called
        moe = next(n for n in m.graph.node if n.op_type == "TopKMoE")
        assert [a.i for a in moe.attribute if a.name == "top_k"] == [2]
    assert manifest["ssm_path"] == "function"
    assert manifest["custom_domains"] == {"ai.itera": 1}


def test_fused_path_uses_contrib_ops_only(bundles):
    d, manifest = bundles["fused"]
    for g in ("prefill", "decode"):
        m = onnx.load(d / f"{g}.onnx")
        ops = _ops(m)
        assert {("com.microsoft", "LinearAttention"), ("com.microsoft", "CausalConvWithState"),
                ("com.microsoft", "MoE")} <= ops
        assert not any(dom == "ai.itera" for dom, _ in ops)
        assert not m.functions
    assert manifest["ssm_path"] == "lowered"
    assert manifest["custom_domains"] == {"com.microsoft": 1}


@pytest.mark.parametrize("lower", PATHS)
def test_checker_and_shape_inference(bundles, lower):
    d, _ = bundles[lower]
    for g in ("prefill", "decode"):
        onnx.checker.check_model(str(d / f"{g}.onnx"), full_check=True)
        onnx.shape_inference.infer_shapes(onnx.load(d / f"{g}.onnx"), strict_mode=True)


def test_manifest(bundles, model):
    _, manifest = bundles["none"]
    cfg = model.config
    assert manifest["io"] == {"input_ids": "input_ids", "logits": "logits",
                              "attention_mask": None, "position_ids": None}
    pre = manifest["graphs"]["prefill"]
    assert pre["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}
    assert pre["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch", "seq", VOCAB]}
    dec = manifest["graphs"]["decode"]
    assert dec["inputs"][0]["shape"] == ["batch", 1]
    assert dec["outputs"][0]["shape"] == ["batch", 1, VOCAB]
    tensors = manifest["state"]["tensors"]
    assert len(tensors) == 2 * cfg.n_layers
    conv_shape, ssm_shape = model.blocks[0].mixer.state_shapes(1)
    assert tensors[0] == {"input": "past.0.conv", "output": "present.0.conv", "dtype": "float32",
                          "shape": ["batch", *conv_shape[1:]]}
    assert tensors[1]["input"] == "past.0.ssm" and tensors[1]["shape"] == ["batch", *ssm_shape[1:]]
    names = [v["name"] for v in dec["inputs"]]
    assert names == ["input_ids"] + [t["input"] for t in tensors]


def test_auto_picks_fused_when_available(model, tmp_path):
    manifest = export_itera_graphs(model, tmp_path, lower="auto")
    assert manifest["ssm_path"] == ("lowered" if fused_ops_available() else "function")


# --- numerics -----------------------------------------------------------------------------


@pytest.mark.parametrize("lower", PATHS)
@pytest.mark.parametrize("length", [1, 9, 70])
def test_prefill_parity(model, sessions, lower, length):
    torch.manual_seed(length)
    tokens = torch.randint(0, VOCAB, (2, length))
    state = _random_state(model, 2, seed=length)
    with torch.no_grad():
        ref = model(tokens, state)
    out = sessions[lower]["prefill"].run(None, _feed(tokens.numpy(), state))
    assert np.abs(out[0] - ref.logits.numpy()).max() <= TOL
    assert _max_state_diff(_pairs(out[1:]), ref.state) <= TOL


def _generate(model, sessions, lower, steps=64):
    """Prefill a prompt, then greedy-decode in torch and ORT side by side (each feeding itself)."""
    torch.manual_seed(1)
    prompt = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        ref = model(prompt, model.allocate_state(2))
    out = sessions[lower]["prefill"].run(None, _feed(prompt.numpy(), model.allocate_state(2)))
    t_state, o_state = ref.state, _pairs(out[1:])
    t_tok, o_tok = ref.logits[:, -1].argmax(-1), out[0][:, -1].argmax(-1)
    worst, t_seq, o_seq, o_logits = 0.0, [], [], []
    for _ in range(steps):
        with torch.no_grad():
            t_logits, t_state = model.step(t_tok, t_state)
        o = sessions[lower]["decode"].run(None, _feed(o_tok[:, None], o_state))
        o_state = _pairs(o[1:])
        worst = max(worst, float(np.abs(o[0][:, 0] - t_logits.numpy()).max()),
                    _max_state_diff(o_state, t_state))
        t_tok, o_tok = t_logits.argmax(-1), o[0][:, 0].argmax(-1)
        t_seq.append(t_tok.numpy())
        o_seq.append(o_tok)
        o_logits.append(o[0][:, 0])
    return worst, np.stack(t_seq, 1), np.stack(o_seq, 1), np.stack(o_logits, 1)


@pytest.fixture(scope="module")
def generations(model, sessions):
    return {lower: _generate(model, sessions, lower) for lower in PATHS}


@pytest.mark.parametrize("lower", PATHS)
def test_decode_64_steps_parity(generations, lower):
    worst, _, _, _ = generations[lower]
    assert worst <= TOL


@pytest.mark.parametrize("lower", PATHS)
def test_greedy_tokens_identical(generations, lower):
    _, t_seq, o_seq, _ = generations[lower]
    np.testing.assert_array_equal(o_seq, t_seq)


def test_fused_matches_function(model, sessions, generations):
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 33))
    state = _random_state(model, 2, seed=3)
    a = sessions["none"]["prefill"].run(None, _feed(tokens, state))
    b = sessions["fused"]["prefill"].run(None, _feed(tokens, state))
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) <= TOL
    assert np.abs(generations["none"][3] - generations["fused"][3]).max() <= TOL


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
    d, _ = bundles[lower]
    proto = onnx.load(d / "decode.onnx")
    tokens = torch.arange(VOCAB)
    chosen = _layer0_experts(model, tokens)  # (VOCAB, k)
    feed = _feed(tokens.numpy()[:, None], model.allocate_state(VOCAB))
    base = _session(proto.SerializeToString()).run(["logits"], feed)[0][:, 0]
    w_down = "model.blocks.0.moe.w_down"  # fc2 of com.microsoft::MoE in the fused path too
    for e in range(model.config.n_experts):
        routed = (chosen == e).any(-1)
        assert routed.any(), f"no token routes to expert {e}; pick another seed"
        crafted = copy.deepcopy(proto)
        init = next(i for i in crafted.graph.initializer if i.name == w_down)
        w = onnx.numpy_helper.to_array(init).copy()
        w[e] = 0.0
        init.CopyFrom(onnx.numpy_helper.from_array(w, w_down))
        out = _session(crafted.SerializeToString()).run(["logits"], feed)[0][:, 0]
        change = np.abs(out - base).max(-1)
        assert (change[routed] > 1e-4).all(), f"expert {e} unreachable in the {lower} path"
        assert (change[~routed] <= 1e-5).all(), f"expert {e} changed tokens not routed to it"
