"""Itera-Lite as IBM's Granite-4.0-H hybrid: the one map from our config and tensors to theirs.

Itera-Lite's block is, operation for operation, a GraniteMoeHybrid layer with no attention and
no shared expert: pre-RMSNorm → Mamba-2 mixer → residual → RMSNorm → top-k SwiGLU MoE →
residual, tied head. transformers has it as `GraniteMoeHybridForCausalLM`, llama.cpp as the
`granitehybrid` architecture. Both writers (export/hf_folder.py, export/gguf.py) read this
file only; nothing else knows the names.

What does not map one to one:
- The inert attention layer. Both engines assume a hybrid has at least one attention layer:
  llama.cpp writes attention inputs no layer allocated (abort on the first decode) and
  transformers' hybrid cache indexes the first attention layer (`generate` fails). So one
  attention layer is appended whose output projection and expert down-projections are zero:
  it adds exactly +0.0 to the residual stream and costs one small KV cache. Both files say so
  in their metadata (`INERT_NOTE`). Drop it once both engines run a pure-Mamba hybrid.
- `ssm_a` in GGUF stores A = −exp(A_log) (llama.cpp does not exponentiate); transformers keeps A_log.
- Routing: Itera-Lite takes softmax over all experts, keeps the top k and renormalises; both
  engines take the top-k logits and softmax over them: the same weights.
- Every Granite multiplier (embedding, residual, attention, logits) is 1.0; the shared MLP is
  zero-wide (`shared_intermediate_size = 0`), so it adds exactly 0.

Refused (one line, `GraniteMapError`): expand ≠ 2 (llama.cpp asserts d_inner = 2·d_model) and
n_groups ≠ 1 (both engines' fused gated norm is per group, ours is over the whole d_inner).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from itera_runtime.errors import UserError

from .config import IteraConfig

INERT_NOTE = ("the last layer is an inert attention layer (output projection and experts zero: it adds exactly "
              "0.0) because transformers' hybrid cache and llama.cpp's hybrid memory need at least one attention "
              "layer; layers before it are Itera-Lite's Mamba-2 + MoE blocks")
CONTEXT_LENGTH = 8192  # Itera-Lite has no length limit; this sizes the inert layer's cache in the engines
INERT_HEAD_DIM = 32  # width of the inert layer's one head (its KV cache is 2 x 32 floats per token)


class GraniteMapError(UserError, ValueError):
    """An Itera-Lite config the Granite hybrid cannot express exactly; one line."""


def check_expressible(cfg: IteraConfig, engine: str) -> None:
    """Raise GraniteMapError when `engine` ("transformers" or "llama.cpp") cannot run cfg exactly."""
    if cfg.family != "itera":
        raise GraniteMapError(f"only Itera-Lite checkpoints map to GraniteMoeHybrid, not {cfg.family}")
    if cfg.n_groups != 1:
        raise GraniteMapError(f"n_groups = {cfg.n_groups}: {engine}'s gated RMSNorm normalises per group, "
                              "Itera-Lite's over the whole d_inner; only n_groups = 1 maps exactly")
    if cfg.expand != 2:
        raise GraniteMapError(f"expand = {cfg.expand}: llama.cpp's granitehybrid requires d_inner = 2 x d_model "
                              "(expand 2), and this export keeps the two engines' files alike")


def n_heads(cfg: IteraConfig) -> int:
    return cfg.expand * cfg.d_model // cfg.head_dim


def hf_config(cfg: IteraConfig, context_length: int, extra: dict | None = None) -> dict:
    """`config.json` of GraniteMoeHybridForCausalLM (as keyword arguments of its config class)."""
    check_expressible(cfg, "transformers")
    heads = cfg.d_model // INERT_HEAD_DIM if cfg.d_model % INERT_HEAD_DIM == 0 else 1
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_expert,
        num_hidden_layers=cfg.n_layers + 1, layer_types=["mamba"] * cfg.n_layers + ["attention"],
        num_attention_heads=heads, num_key_value_heads=1, hidden_act="silu",
        max_position_embeddings=context_length, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=True,
        embedding_multiplier=1.0, logits_scaling=1.0, residual_multiplier=1.0, attention_multiplier=1.0,
        num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, shared_intermediate_size=0,
        position_embedding_type="nope", mamba_n_heads=n_heads(cfg), mamba_d_head=cfg.head_dim,
        mamba_n_groups=cfg.n_groups, mamba_d_state=cfg.d_state, mamba_d_conv=cfg.d_conv,
        mamba_expand=cfg.expand, mamba_chunk_size=cfg.chunk_size, mamba_conv_bias=True, mamba_proj_bias=False,
        attention_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        itera_lite={"inert_attention_layer": cfg.n_layers, "note": INERT_NOTE, **(extra or {})},
    )


def hf_state_dict(model) -> dict[str, Tensor]:
    """Itera-Lite weights under GraniteMoeHybridForCausalLM's names, the inert layer included."""
    cfg: IteraConfig = model.config
    check_expressible(cfg, "transformers")
    D, E, Fw = cfg.d_model, cfg.n_experts, cfg.d_expert
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm_f.weight,
           "lm_head.weight": model.embed.weight}
    for i, blk in enumerate(model.blocks):
        p, m = f"model.layers.{i}.", blk.mixer
        out |= {
            p + "input_layernorm.weight": blk.norm1.weight, p + "post_attention_layernorm.weight": blk.norm2.weight,
            p + "mamba.in_proj.weight": m.in_proj.weight, p + "mamba.conv1d.weight": m.conv_weight[:, None, :],
            p + "mamba.conv1d.bias": m.conv_bias, p + "mamba.dt_bias": m.dt_bias, p + "mamba.A_log": m.A_log,
            p + "mamba.D": m.D, p + "mamba.norm.weight": m.norm.weight, p + "mamba.out_proj.weight": m.out_proj.weight,
            p + "block_sparse_moe.router.layer.weight": blk.moe.router.weight,
            p + "block_sparse_moe.input_linear.weight": torch.cat([blk.moe.w_gate, blk.moe.w_up], dim=1),
            p + "block_sparse_moe.output_linear.weight": blk.moe.w_down,
            p + "shared_mlp.input_linear.weight": torch.zeros(0, D), p + "shared_mlp.output_linear.weight": torch.zeros(D, 0),
        }
    heads = cfg.d_model // INERT_HEAD_DIM if cfg.d_model % INERT_HEAD_DIM == 0 else 1
    hd = D // heads
    p = f"model.layers.{cfg.n_layers}."
    out |= {
        p + "input_layernorm.weight": torch.ones(D), p + "post_attention_layernorm.weight": torch.ones(D),
        p + "self_attn.q_proj.weight": torch.zeros(heads * hd, D), p + "self_attn.k_proj.weight": torch.zeros(hd, D),
        p + "self_attn.v_proj.weight": torch.zeros(hd, D), p + "self_attn.o_proj.weight": torch.zeros(D, heads * hd),
        p + "block_sparse_moe.router.layer.weight": torch.zeros(E, D),
        p + "block_sparse_moe.input_linear.weight": torch.zeros(E, 2 * Fw, D),
        p + "block_sparse_moe.output_linear.weight": torch.zeros(E, D, Fw),
        p + "shared_mlp.input_linear.weight": torch.zeros(0, D), p + "shared_mlp.output_linear.weight": torch.zeros(D, 0),
    }
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def gguf_keys(cfg: IteraConfig) -> dict:
    """`granitehybrid.*` hyperparameters (without the prefix): per-layer lists end with the inert layer."""
    check_expressible(cfg, "llama.cpp")
    return {
        "block_count": cfg.n_layers + 1, "embedding_length": cfg.d_model, "feed_forward_length": cfg.d_expert,
        "layer_norm_rms_epsilon": cfg.norm_eps, "expert_count": cfg.n_experts, "expert_used_count": cfg.top_k,
        "ssm_conv_kernel": cfg.d_conv, "ssm_inner_size": cfg.expand * cfg.d_model, "ssm_state_size": cfg.d_state,
        "ssm_time_step_rank": n_heads(cfg), "ssm_group_count": cfg.n_groups,
        "head_count": 1, "head_count_kv": [0] * cfg.n_layers + [1],
        "key_length": INERT_HEAD_DIM, "value_length": INERT_HEAD_DIM,
    }


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """GGUF tensor name → float32 array in the numpy shape gguf writes, the inert layer last."""
    cfg: IteraConfig = model.config
    check_expressible(cfg, "llama.cpp")
    D, E, Fw, H = cfg.d_model, cfg.n_experts, cfg.d_expert, n_heads(cfg)
    f = lambda t: t.detach().float().contiguous().numpy()  # noqa: E731
    out = {"token_embd.weight": f(model.embed.weight), "output_norm.weight": f(model.norm_f.weight)}
    for i, blk in enumerate(model.blocks):
        p, m = f"blk.{i}.", blk.mixer
        out |= {
            p + "attn_norm.weight": f(blk.norm1.weight), p + "ffn_norm.weight": f(blk.norm2.weight),
            p + "ssm_in.weight": f(m.in_proj.weight), p + "ssm_conv1d.weight": f(m.conv_weight),
            p + "ssm_conv1d.bias": f(m.conv_bias), p + "ssm_dt.bias": f(m.dt_bias),
            p + "ssm_a": f(-torch.exp(m.A_log)).reshape(H, 1), p + "ssm_d": f(m.D).reshape(H, 1),
            p + "ssm_norm.weight": f(m.norm.weight).reshape(cfg.n_groups, -1), p + "ssm_out.weight": f(m.out_proj.weight),
            p + "ffn_gate_inp.weight": f(blk.moe.router.weight), p + "ffn_gate_exps.weight": f(blk.moe.w_gate),
            p + "ffn_up_exps.weight": f(blk.moe.w_up), p + "ffn_down_exps.weight": f(blk.moe.w_down),
        }
    p, hd, z = f"blk.{cfg.n_layers}.", INERT_HEAD_DIM, np.zeros
    out |= {
        p + "attn_norm.weight": np.ones(D, np.float32), p + "ffn_norm.weight": np.ones(D, np.float32),
        p + "attn_q.weight": z((hd, D), np.float32), p + "attn_k.weight": z((hd, D), np.float32),
        p + "attn_v.weight": z((hd, D), np.float32), p + "attn_output.weight": z((D, hd), np.float32),
        p + "ffn_gate_inp.weight": z((E, D), np.float32), p + "ffn_gate_exps.weight": z((E, Fw, D), np.float32),
        p + "ffn_up_exps.weight": z((E, Fw, D), np.float32), p + "ffn_down_exps.weight": z((E, D, Fw), np.float32),
    }
    return out
