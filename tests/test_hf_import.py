"""Hugging Face checkpoints → bundles: random-initialised transformers models saved to a folder,
exported with `itera-export DIR`, run through the runtime and compared with transformers itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript")
transformers = pytest.importorskip("transformers")

from itera_export.cli import main as export_cli  # noqa: E402
from itera_export.exporter import export_checkpoint  # noqa: E402
from itera_export.hf_import import HFImportError, load_source  # noqa: E402
from itera_lite.data import train_tokenizer  # noqa: E402
from itera_runtime import Generator, SamplingConfig, load_bundle  # noqa: E402
from itera_runtime.cli import main as run_cli  # noqa: E402
from itera_runtime.session import ModelSession  # noqa: E402

from clirun import invoke  # noqa: E402
from tinymodel import tiny_mamba2_sizes  # noqa: E402

REL = 1e-4  # |bundle - transformers| / max(1, max |transformers logit|)
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def _tokenizer():
    """A byte-level BPE with BOS/EOS specials and a BOS-adding post-processor, as transformers saves one."""
    from tokenizers import processors

    tok = train_tokenizer([TEXT], 300)
    tok.add_special_tokens(["<|bos|>", "<|eos|>"])
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")
    fast.chat_template = CHAT
    return fast


def save_mamba2(folder: Path, *, n_groups: int = 1, tied: bool = False, conv_bias: bool = True,
                proj_bias: bool = False, eps: float = 1e-5, seed: int = 0, **overrides) -> Path:
    """A tiny random Mamba2ForCausalLM and its tokenizer, saved with save_pretrained."""
    fast = _tokenizer()
    torch.manual_seed(seed)
    kw = dict(vocab_size=len(fast), hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16,
              n_groups=n_groups, expand=2, chunk_size=16, use_conv_bias=conv_bias, use_bias=proj_bias,
              layer_norm_epsilon=eps, tie_word_embeddings=tied, bos_token_id=fast.bos_token_id,
              eos_token_id=fast.eos_token_id, pad_token_id=None)
    cfg = transformers.Mamba2Config(**{**kw, **overrides})
    return _perturb_and_save(transformers.Mamba2ForCausalLM(cfg), fast, folder, tied)


def _perturb_and_save(model, fast, folder: Path, tied: bool) -> Path:
    """Save model and tokenizer after bigger-than-init gains and biases, so a dropped one shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    # transformers' safetensors writer refuses a tied head; its .bin loads the same way
    model.save_pretrained(folder, safe_serialization=not tied)
    fast.save_pretrained(folder)
    return folder


def save_granite(folder: Path, *, moe: bool = True, rope: bool = True, tied: bool = False, seed: int = 0,
                 **overrides) -> Path:
    """A tiny random GraniteMoeHybridForCausalLM (attention at layers 1 and 3, GQA 4/2, Mamba n_groups 2,
    multipliers away from 1) and its tokenizer, saved with save_pretrained."""
    fast = _tokenizer()
    torch.manual_seed(seed)
    kw = dict(vocab_size=len(fast), hidden_size=64, num_hidden_layers=4,
              layer_types=["mamba", "attention", "mamba", "attention"], num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=32, shared_intermediate_size=48, num_local_experts=4 if moe else 0,
              num_experts_per_tok=2, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16,
              mamba_chunk_size=16, mamba_expand=2, max_position_embeddings=256,
              position_embedding_type="rope" if rope else "nope", embedding_multiplier=2.0, residual_multiplier=0.5,
              attention_multiplier=0.2, logits_scaling=0.5, tie_word_embeddings=tied, rms_norm_eps=1e-6,
              bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=None)
    model = transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(**{**kw, **overrides}))
    return _perturb_and_save(model, fast, folder, tied)


MAMBA2 = {
    "groups1-tied-convbias": dict(n_groups=1, tied=True, conv_bias=True, proj_bias=False, eps=1e-5),
    "groups2-untied-projbias": dict(n_groups=2, tied=False, conv_bias=False, proj_bias=True, eps=1e-6),
}


GRANITE = {
    "granite-moe-rope-untied": dict(moe=True, rope=True, tied=False),
    "granite-dense-nope-tied": dict(moe=False, rope=False, tied=True),
}
MODELS = {**{k: (save_mamba2, v) for k, v in MAMBA2.items()}, **{k: (save_granite, v) for k, v in GRANITE.items()}}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_bundle(request, tmp_path_factory):
    """(folder, fp32 bundle with both graph sets, the transformers model) of each model."""
    root = tmp_path_factory.mktemp(request.param)
    save, kwargs = MODELS[request.param]
    folder = save(root / "hf", **kwargs)
    out, _ = export_checkpoint(folder, root / "bundle")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, out, hf


def _ids(folder: Path, text: str = TEXT) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(folder)(text)["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("graph_set", ["fused", "portable"])
def test_bundle_logits_equal_transformers_in_prefill_and_token_by_token_decode(model_bundle, graph_set):
    folder, out, hf = model_bundle
    ids = np.asarray(_ids(folder), dtype=np.int64)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)[None]).logits[0].numpy()
    scale = max(1.0, float(np.abs(ref).max()))
    session = ModelSession(load_bundle(out), threads=1, graph_set=graph_set)
    prompt = 12
    chunks, state = [], None
    for logits, state in session.forward_chunks(ids[:prompt], chunk=5):  # the state carried across chunks
        chunks.append(logits)
    prefill = np.concatenate(chunks)
    assert np.abs(prefill - ref[:prompt]).max() / scale < REL
    for i in range(prompt, len(ids)):
        step, state = session.decode(int(ids[i]), state)
        assert np.abs(step - ref[i]).max() / scale < REL, f"decode position {i}"


@pytest.mark.slow
def test_greedy_itera_run_text_equals_transformers_generate(model_bundle):
    folder, out, hf = model_bundle
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok("To be, or", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id  # the folder's tokenizer adds BOS; the bundle's must too
    with torch.no_grad():
        new = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    expected = tok.decode(new, skip_special_tokens=True)
    gen = Generator(out, threads=1)
    assert gen.encode("To be, or") == ids[0].tolist()
    text = "".join(gen.generate("To be, or", 24, SamplingConfig(temperature=0)))
    assert text == expected


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_bundles_stay_within_half_a_percent_bits_per_byte(model_bundle, quantize, tmp_path):
    folder, _, _ = model_bundle
    _, manifest = export_checkpoint(folder, tmp_path / quantize, quantize=quantize)
    v = manifest.validation
    assert manifest.quantization.mode == quantize and manifest.quantization.nodes_quantized > 0
    assert manifest.quantization.bytes_after < 0.6 * manifest.quantization.bytes_before
    # bits/byte of the quantized bundle vs transformers' fp32 forward, on the built-in passage
    assert abs(v.bits_per_byte - v.bits_per_byte_torch) / v.bits_per_byte_torch < 0.005


@pytest.mark.slow
def test_a_hybrid_states_bytes_are_the_ssm_tensors_plus_the_filled_kv_rows_in_manifest_and_runtime(model_bundle):
    folder, out, _ = model_bundle
    bundle = load_bundle(out)
    if bundle.state_kind != "hybrid":
        pytest.skip("a Mamba-2 bundle carries an ssm state")
    spec = bundle.manifest.state
    kv = [t for t in spec.tensors if t.kind in ("key", "value")]
    assert [t.kind for t in spec.tensors] == ["conv", "ssm", "key", "value"] * 2
    assert {t.shape[2] for t in kv} == {256}  # max_position_embeddings: the buffers' capacity
    fixed = spec.nbytes(1, 0)
    per_row = sum(int(np.prod(t.shape[1:])) // 256 * 4 for t in kv)  # kv_heads * head_dim floats a row
    session = ModelSession(bundle, threads=1)
    ids = np.resize(np.asarray(_ids(folder), dtype=np.int64), 100)
    for depth in (1, 40, 100):
        state = session.prefill(ids[:depth], chunk=32)[1]
        assert state.nbytes == spec.nbytes(1, depth) == fixed + per_row * depth
    with pytest.raises(ValueError, match="exceed this model's KV buffers of 256"):
        session.prefill(np.zeros(257, dtype=np.int64))


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """(folder, bundle, result) of `itera-export FOLDER --graph-set fused` on a Mamba-2 folder, made once.
    Its SSM has the tiny preset's sizes, so the export reads the kernels the tiny model's trace made
    (the run's trace folder) and traces only its own two graphs."""
    root = tmp_path_factory.mktemp("cli-export")
    folder = save_mamba2(root / "hf", **{**MAMBA2["groups2-untied-projbias"], **tiny_mamba2_sizes()})
    return folder, root / "bundle", invoke(export_cli, folder, "-o", root / "bundle", "--graph-set", "fused")


def test_an_exported_folder_keeps_its_tokenizer_and_chat_fields_and_itera_run_matches_transformers(cli_export):
    folder, bundle, r = cli_export
    assert r.returncode == 0, r.stderr
    assert "validation vs transformers" in r.stdout
    manifest = json.loads((bundle / "manifest.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert manifest["chat_template"] == CHAT  # top-level, where itera-serve's chat.py reads it
    assert manifest["special_tokens"] == {"bos_token": "<|bos|>", "bos_token_id": tok.bos_token_id,
                                          "eos_token": "<|eos|>", "eos_token_id": tok.eos_token_id}
    assert manifest["source_checkpoint"]["architecture"] == "Mamba2ForCausalLM"
    assert manifest["validation"]["max_abs_diff"] <= manifest["validation"]["tolerance"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok("whether 'tis", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        new = hf.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    r = invoke(run_cli, bundle, "-p", "whether 'tis", "-n", 16, "--temperature", 0, "--threads", 1)
    assert r.returncode == 0, r.stderr
    assert r.stdout == tok.decode(new, skip_special_tokens=True) + "\n"


def test_generation_ends_at_the_checkpoints_eos_token(cli_export):
    folder, out, r = cli_export
    assert r.returncode == 0, r.stderr
    gen = Generator(out, threads=1)
    assert gen.eos_token_id == transformers.AutoTokenizer.from_pretrained(folder).eos_token_id  # read from the bundle
    prompt = gen.encode("To be")
    free = gen.generate_ids(prompt, 8, SamplingConfig(temperature=0))  # ids with no stop at all
    gen.eos_token_id = free[3]  # as if the checkpoint's EOS were the 4th greedy token
    g = gen.generate("To be", 8, SamplingConfig(temperature=0))
    text = "".join(g)
    assert g.stats.stop_reason == "eos_token" and g.token_ids == free[:3]
    assert text == gen.tokenizer.decode(free[:3], skip_special_tokens=False)


@pytest.mark.parametrize("change, named", [
    (dict(time_step_limit=(0.0, 0.5)), "time_step_limit"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_a_mamba2_config_we_do_not_map_is_refused_in_one_line_naming_it(tmp_path, change, named):
    folder = save_mamba2(tmp_path / "hf", **change)
    r = invoke(export_cli, folder, "-o", tmp_path / "bundle")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and named in r.stderr
    assert not (tmp_path / "bundle").exists()


def test_a_granite_config_we_do_not_map_is_refused_in_one_line_naming_it(tmp_path):
    folder = save_granite(tmp_path / "hf", rope_scaling={"rope_type": "linear", "factor": 2.0})
    r = invoke(export_cli, folder, "-o", tmp_path / "bundle")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "rope_scaling" in r.stderr
    assert not (tmp_path / "bundle").exists()


def test_an_architecture_we_do_not_import_is_refused_naming_it(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(HFImportError, match="LlamaForCausalLM"):
        load_source(tmp_path / "llama")


def test_an_hf_source_without_network_fails_in_one_line(tmp_path):
    r = invoke(export_cli, "hf:no-such-org/no-such-model", "-o", tmp_path / "b",
               env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "hf:no-such-org/no-such-model" in r.stderr
