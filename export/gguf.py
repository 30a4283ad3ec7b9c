"""Baseline checkpoint → a GGUF file that llama.cpp runs: the Transformer at its best, for comparison.

A user who wants a small Transformer on a laptop or a Pi runs it in llama.cpp, so the speed
claim is checked against that too (`itera-bench latency BUNDLE... MODEL.gguf`). The baseline is
transformers' LlamaForCausalLM, which llama.cpp's `llama` architecture runs as is; this writes
the file with the `gguf` package (the format's own writer) rather than through llama.cpp's
`convert_hf_to_gguf.py`, which is not on PyPI and needs an HF folder and sentencepiece.

Three things differ from the torch tensors:
- q_proj/k_proj rows are permuted: transformers rotates the two halves of each head
  (rotate_half), llama.cpp's `llama` rope rotates adjacent pairs.
- The tokenizer is byte-level BPE with no special tokens: vocabulary in id order, merges,
  model `gpt2` and pre-tokenizer `gpt-2` (the same splitting rule; llama.cpp refuses to load
  an unknown pre-tokenizer name).
- Quantization is llama.cpp's own block formats (q8_0, q4_0: 32 weights per block, one scale),
  applied to 2-D weights; norms stay f32. The tied embedding (also the output head) is q8_0 in
  a q4_0 file, as llama-quantize keeps the output tensor at higher precision.

Itera-Lite exports as llama.cpp's `granitehybrid` (IBM Granite-4.0-H: Mamba-2 + top-k MoE
layers), with one inert attention layer appended because llama.cpp's hybrid memory needs one;
the names, shapes and the inert layer live in itera_lite/models/granite.py (shared with the
transformers writer). Its conv, A, D, dt bias, norms and router stay f32 in every file: llama.cpp's
ssm ops need f32 and llama-quantize keeps the router f32.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from itera_runtime.errors import UserError

# --quantize scheme → (file type, the type of 2-D weights, the type of the tied embedding)
GGUF_TYPES = {"none": ("F32", "F32", "F32"), "int8": ("Q8_0", "Q8_0", "Q8_0"), "int4": ("Q4_0", "Q4_0", "Q8_0")}
MARK = "itera.source_checkpoint"  # our metadata key: a .gguf with it is ours to replace with --force


class GgufError(UserError):
    """A GGUF export that cannot proceed; one line."""


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of one projection from half-split rotary order to adjacent-pair order, per head."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model) -> dict[str, np.ndarray]:
    """GGUF tensor name → float32 array, in llama.cpp's names."""
    cfg = model.config
    sd = {k.removeprefix("llama."): v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.n_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = _permute_rope(w, cfg.n_heads)
            elif gg == "attn_k":
                w = _permute_rope(w, cfg.n_kv_heads)
            out[f"blk.{i}.{gg}.weight"] = w
    return out


def _baseline_header(w, cfg) -> None:
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.d_model // cfg.n_heads)
    w.add_rope_freq_base(cfg.rope_theta)


def _itera_header(w, cfg) -> None:
    """granitehybrid keys, from the one map."""
    from itera_lite.models.granite import CONTEXT_LENGTH, INERT_NOTE, gguf_keys

    k = gguf_keys(cfg)
    w.add_context_length(CONTEXT_LENGTH)  # no limit of the model's own: sizes the inert layer's cache
    w.add_embedding_length(k["embedding_length"])
    w.add_block_count(k["block_count"])
    w.add_feed_forward_length(k["feed_forward_length"])
    w.add_expert_count(k["expert_count"])
    w.add_expert_used_count(k["expert_used_count"])
    w.add_ssm_conv_kernel(k["ssm_conv_kernel"])
    w.add_ssm_inner_size(k["ssm_inner_size"])
    w.add_ssm_state_size(k["ssm_state_size"])
    w.add_ssm_time_step_rank(k["ssm_time_step_rank"])
    w.add_ssm_group_count(k["ssm_group_count"])
    w.add_head_count(k["head_count"])
    w.add_head_count_kv(k["head_count_kv"])
    w.add_key_length(k["key_length"])
    w.add_value_length(k["value_length"])
    # present as in Granite's own files; no position input is built (no rope scaling "finetuned")
    w.add_rope_dimension_count(k["key_length"])
    w.add_rope_freq_base(10000.0)
    w.add_string("itera.inert_attention_layer", INERT_NOTE)


def _itera_tensors(model) -> dict[str, np.ndarray]:
    from itera_lite.models.granite import gguf_tensors

    return gguf_tensors(model)


# Itera-Lite tensors kept f32 in every file (ssm ops need f32; llama-quantize keeps the router f32)
GGUF_F32 = ("ssm_conv1d.weight", "ssm_conv1d.bias", "ssm_dt.bias", "ssm_a", "ssm_d", "ssm_norm.weight",
            "attn_norm.weight", "ffn_norm.weight", "output_norm.weight", "ffn_gate_inp.weight")


def _tokenizer(tokenizer_json: str) -> tuple[list[str], list[str]]:
    """(tokens in id order, merges as 'a b') of our byte-level BPE."""
    model = json.loads(tokenizer_json)["model"]
    if model.get("type") != "BPE":
        raise GgufError(f"the checkpoint's tokenizer is {model.get('type')}, not byte-level BPE")
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    if any(t is None for t in tokens):
        raise GgufError("the checkpoint's tokenizer has gaps in its ids")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, merges


def is_our_gguf(path: Path) -> bool:
    """A GGUF file written by this exporter (carries our metadata key)."""
    try:
        from gguf import GGUFReader

        return MARK in GGUFReader(str(path)).fields
    except Exception:  # not a GGUF file at all, or unreadable: not ours
        return False


def check_destination(out: Path, force: bool) -> None:
    if out.is_symlink() or out.is_dir():
        raise GgufError(f"{out} is a folder or a link; give a .gguf file name")
    if out.exists():
        if not force:
            raise GgufError(f"{out} already exists; pass --force to replace it (only a GGUF of ours is replaced)")
        if not is_our_gguf(out):
            raise GgufError(f"{out} is not a GGUF written by itera-export; --force replaces only ours, nothing written")


def write_gguf(model, tokenizer_json: str, out: Path, quantize: str, source: str) -> dict:
    """Write the baseline `model` to `out` (atomically); returns what was written."""
    import gguf

    if model.config.family not in ("itera", "baseline"):
        raise GgufError(f"{model.config.family} checkpoints do not export to GGUF yet (itera and baseline do)")
    if model.config.family == "itera":
        from itera_lite.models.granite import check_expressible

        check_expressible(model.config, "llama.cpp")  # before anything is written
    if quantize not in GGUF_TYPES:
        raise GgufError(f"--format gguf supports --quantize {', '.join(GGUF_TYPES)}, not {quantize}")
    cfg = model.config
    file_type, weight_type, embd_type = (gguf.GGMLQuantizationType[t] for t in GGUF_TYPES[quantize])
    tokens, merges = _tokenizer(tokenizer_json)
    if len(tokens) > cfg.vocab_size:
        raise GgufError(f"tokenizer has {len(tokens)} tokens, more than the model's {cfg.vocab_size}")
    # A tokenizer trained on little text can stop short of the model's vocabulary: the rows
    # past it are never produced by encoding, so they become unused placeholder tokens.
    n_real = len(tokens)
    tokens += [f"<unused{i}>" for i in range(n_real, cfg.vocab_size)]
    token_types = [gguf.TokenType.NORMAL] * n_real + [gguf.TokenType.UNUSED] * (cfg.vocab_size - n_real)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        itera = cfg.family == "itera"
        w = gguf.GGUFWriter(tmp, "granitehybrid" if itera else "llama")
        w.add_name(Path(source).parent.name or f"itera-{cfg.family}")
        (_itera_header if itera else _baseline_header)(w, cfg)
        tensors, f32_only = (_itera_tensors(model), GGUF_F32) if itera else (_tensors(model), ())
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                         "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[file_type.name])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(token_types)
        # llama.cpp refuses a BPE without merges, and gguf cannot write an empty array. A
        # bytes-only vocabulary (--vocab-size 256) gets one merge whose result is not in the
        # vocabulary: llama.cpp then falls back to the two one-byte tokens, so encoding is unchanged.
        w.add_token_merges(merges or ["a b"])
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        w.add_string(MARK, str(source))
        w.add_string("itera.family", cfg.family)
        types = {}
        for name, t in tensors.items():
            qtype = embd_type if name == "token_embd.weight" else weight_type
            if t.ndim < 2 or t.shape[-1] % 32 or name.endswith(f32_only):
                qtype = gguf.GGMLQuantizationType.F32  # norms, and rows the block formats cannot hold
            data = t if qtype == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(t, qtype)
            w.add_tensor(name, np.ascontiguousarray(data), raw_dtype=qtype)
            types[qtype.name] = types.get(qtype.name, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"path": str(out), "bytes": out.stat().st_size, "file_type": file_type.name, "tensor_types": types}


def export_gguf(checkpoint, out=None, quantize: str = "none", force: bool = False, log=lambda m: None) -> dict:
    """Checkpoint → .gguf (baseline family), checked by reading it back; returns a summary."""
    from itera_lite.checkpoint import load_model

    from .exporter import _tokenizer_json, default_output

    checkpoint = Path(checkpoint)
    out = Path(out) if out else default_output(checkpoint, quantize).with_suffix(".gguf")
    check_destination(out, force)
    model, ckpt = load_model(checkpoint)
    if model.config.family not in ("itera", "baseline"):
        raise GgufError(f"{model.config.family} checkpoints do not export to GGUF yet (itera and baseline do)")
    if model.config.family == "itera":
        from itera_lite.models.granite import check_expressible

        check_expressible(model.config, "llama.cpp")  # refused before anything is said or written
    tokenizer_json = _tokenizer_json(ckpt, checkpoint)
    log(f"writing {out} ({GGUF_TYPES.get(quantize, ('?',))[0]})")
    try:
        summary = write_gguf(model, tokenizer_json, out, quantize, str(checkpoint))
    except OSError as e:
        raise GgufError(f"{e.filename or out}: {e.strerror or e}; nothing written") from None
    return summary


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Tensor name → float32 array (dequantized), read back with the gguf package's reader."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
    return out
