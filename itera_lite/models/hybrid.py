"""Hybrid stack (Granite-4.0-H, transformers' GraniteMoeHybridForCausalLM): Mamba-2 and attention layers.

    x = embed(tokens) · embedding_multiplier
    N × [x += mixer(RMSNorm(x)) · residual_multiplier      mixer: Mamba2Mixer or KVAttention
         x += (MoE(RMSNorm(x)) + MLP(RMSNorm(x))) · residual_multiplier]   MoE only when n_experts > 0
    logits = head(RMSNorm(x)) / logits_scaling

Glossary: B batch, T new tokens, C KV buffer capacity (max_seq_len), Hq query heads, Hkv key/value
heads, Dh head dim, S total tokens seen including the new ones (attention_mask's width).

State per layer: a Mamba layer carries (conv_state, ssm_state) as in `IteraLite`; an attention
layer carries (keys, values), each (B, Hkv, C, Dh): a buffer of fixed capacity whose rows
[S - T, S) the step writes, as onnxruntime's GroupQueryAttention does with a shared past/present
buffer. How many rows are filled comes from `attention_mask` (B, S), the input the runtime
already feeds a KV-buffer baseline. Under `torch.export` attention is the custom op
`itera::kv_attention`: the exporter lowers it to GroupQueryAttention (fused) or ships its
decomposition (portable), as it does the SSM ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import HybridConfig
from .itera import ModelOutput
from .moe import SparseMoE
from .norms import RMSNorm
from .ssm import Mamba2Mixer


# ---------------------------------------------------------------------------------------
# Attention over a KV buffer: q (B, T, Hq·Dh), k/v (B, T, Hkv·Dh), buffers (B, Hkv, C, Dh).


def _rotate(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """RoPE, non-interleaved halves (transformers' rotate_half). x (B, H, T, Dh), positions (T,)."""
    Dh = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, Dh, 2, dtype=torch.float32) / Dh)  # (Dh/2,)
    freqs = positions.float()[:, None] * inv_freq[None]  # (T, Dh/2)
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)  # (T, Dh)
    x1, x2 = x[..., : Dh // 2], x[..., Dh // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def kv_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, attention_mask: Tensor,
                 num_heads: int, kv_heads: int, scale: float, rope_theta: float):
    """Causal GQA of T new tokens over a buffer holding S - T earlier ones; -> (out, keys, values).

    Written without data-dependent slicing (masks over all C rows), so its export is a
    function of fixed shapes: the portable graph's decomposition.
    """
    B, T, _ = q.shape
    C, Dh = past_k.shape[2], past_k.shape[3]
    S = attention_mask.shape[1]
    start = S - T
    pos = torch.arange(T, device=q.device) + start  # (T,) absolute positions of the new tokens
    q = q.reshape(B, T, num_heads, Dh).transpose(1, 2)  # (B, Hq, T, Dh)
    k = k.reshape(B, T, kv_heads, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
    v = v.reshape(B, T, kv_heads, Dh).transpose(1, 2)
    if rope_theta:
        q, k = _rotate(q, pos, rope_theta), _rotate(k, pos, rope_theta)
    rows = torch.arange(C, device=q.device)  # (C,)
    place = (rows[None, :] == pos[:, None]).to(q.dtype)  # (T, C): new token t goes to row start + t
    keep = 1.0 - place.sum(0)[None, None, :, None]  # (1, 1, C, 1)
    keys = past_k * keep + torch.einsum("tc,bhtd->bhcd", place, k)
    values = past_v * keep + torch.einsum("tc,bhtd->bhcd", place, v)
    rep = num_heads // kv_heads
    kk, vv = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)  # (B, Hq, C, Dh)
    scores = torch.einsum("bhtd,bhcd->bhtc", q, kk) * scale
    visible = rows[None, :] <= pos[:, None]  # (T, C): causal, and rows past S are never read
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.einsum("bhtc,bhcd->bhtd", torch.softmax(scores, dim=-1), vv)
    return out.transpose(1, 2).reshape(B, T, num_heads * Dh), keys, values


@torch.library.custom_op("itera::kv_attention", mutates_args=())
def _kv_attention_op(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, attention_mask: Tensor,
                     num_heads: int, kv_heads: int, scale: float, rope_theta: float) -> tuple[Tensor, Tensor, Tensor]:
    out, keys, values = kv_attention(q, k, v, past_k, past_v, attention_mask, num_heads, kv_heads, scale, rope_theta)
    return out.contiguous(), keys.contiguous(), values.contiguous()


@_kv_attention_op.register_fake
def _(q, k, v, past_k, past_v, attention_mask, num_heads, kv_heads, scale, rope_theta):
    return torch.empty_like(q), torch.empty_like(past_k), torch.empty_like(past_v)


class KVAttention(nn.Module):
    """q/k/v projections → causal GQA over the layer's KV buffer (RoPE or none) → o_proj."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.scale, self.rope_theta, self.capacity = cfg.attention_multiplier, cfg.rope_theta, cfg.max_seq_len
        D, kv = cfg.d_model, cfg.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(D, D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, kv, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, kv, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(D, D, bias=cfg.attention_bias)

    def state_shapes(self, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        shape = (batch, self.n_kv_heads, self.capacity, self.head_dim)
        return shape, shape

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor], attention_mask: Tensor):
        """x (B, T, D), buffers, mask (B, S) -> (B, T, D), new buffers."""
        attend = _kv_attention_op if torch.compiler.is_exporting() else kv_attention
        out, keys, values = attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), *state, attention_mask,
                                   self.n_heads, self.n_kv_heads, self.scale, self.rope_theta)
        return self.o_proj(out), (keys, values)


class SwiGLU(nn.Module):
    """silu(x·gateᵀ) * (x·upᵀ) → down: Granite's shared expert (or its only MLP)."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.gate = nn.Linear(d_model, width, bias=False)
        self.up = nn.Linear(d_model, width, bias=False)
        self.down = nn.Linear(width, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class HybridBlock(nn.Module):
    def __init__(self, cfg: HybridConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg) if layer_type == "mamba" else KVAttention(cfg)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe = SparseMoE(cfg) if cfg.n_experts else None
        self.mlp = SwiGLU(cfg.d_model, cfg.d_shared)
        self.residual_multiplier = cfg.residual_multiplier

    def _mlp(self, x: Tensor) -> Tensor:
        h = self.norm2(x)
        out = self.mlp(h)
        if self.moe is not None:
            out = out + self.moe(h)[0]
        return x + out * self.residual_multiplier

    def forward(self, x: Tensor, state, attention_mask: Tensor):
        """x (B, T, D) -> (B, T, D), new layer state."""
        if self.layer_type == "mamba":
            h, state = self.mixer(self.norm1(x), state)
        else:
            h, state = self.mixer(self.norm1(x), state, attention_mask)
        return self._mlp(x + h * self.residual_multiplier), state

    def step(self, x: Tensor, state, attention_mask: Tensor):
        """x (B, 1, D) -> (B, 1, D), new layer state: the one-token layout, as `IteraLite.step`."""
        if self.layer_type == "mamba":
            h, state = self.mixer.step(self.norm1(x), state)
        else:
            h, state = self.mixer(self.norm1(x), state, attention_mask)
        return self._mlp(x + h * self.residual_multiplier), state


class HybridLM(nn.Module):
    """`forward(tokens, state, attention_mask)` for prefill, `step(token, state, attention_mask)` for decode."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        if len(cfg.layer_types) != cfg.n_layers or set(cfg.layer_types) - {"mamba", "attention"}:
            raise ValueError(f"layer_types must list 'mamba' or 'attention' for each of {cfg.n_layers} layers")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(HybridBlock(cfg, t) for t in cfg.layer_types)
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for blk in self.blocks:
            if blk.layer_type == "attention":
                for lin in (blk.mixer.q_proj, blk.mixer.k_proj, blk.mixer.v_proj, blk.mixer.o_proj):
                    nn.init.normal_(lin.weight, std=1 / math.sqrt(cfg.d_model))

    def state_names(self) -> list[tuple[str, str]]:
        """Per layer, the names of its two state tensors: ("conv", "ssm") or ("key", "value")."""
        return [("conv", "ssm") if t == "mamba" else ("key", "value") for t in self.config.layer_types]

    def allocate_state(self, batch: int, device=None, dtype=torch.float32) -> list[tuple[Tensor, Tensor]]:
        return [tuple(torch.zeros(s, device=device, dtype=dtype) for s in blk.mixer.state_shapes(batch))
                for blk in self.blocks]

    def _head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.norm_f(x)
        logits = self.lm_head(h) if self.lm_head is not None else h @ self.embed.weight.T
        return logits / self.config.logits_scaling, h

    def forward(self, tokens: Tensor, state=None, attention_mask: Tensor | None = None) -> ModelOutput:
        """tokens (B, T) -> logits (B, T, V) and the state after them; mask (B, S) says S - T came before."""
        B, T = tokens.shape
        state = state if state is not None else self.allocate_state(B, tokens.device)
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=tokens.device)
        x = self.embed(tokens) * self.config.embedding_multiplier
        new_state = []
        for blk, s in zip(self.blocks, state):
            x, s = blk(x, s, attention_mask)
            new_state.append(s)
        logits, hidden = self._head(x)
        return ModelOutput(logits, new_state, hidden=hidden)

    def step(self, token: Tensor, state, return_hidden: bool = False, attention_mask: Tensor | None = None):
        """token (B,) -> logits (B, V), new state; mask (B, S) with S - 1 tokens before this one."""
        x = self.embed(token)[:, None] * self.config.embedding_multiplier  # (B, 1, D)
        new_state = []
        for blk, s in zip(self.blocks, state):
            x, s = blk.step(x, s, attention_mask)
            new_state.append(s)
        logits, hidden = self._head(x)
        logits, hidden = logits[:, 0], hidden[:, 0]  # (B, V), (B, D)
        return (logits, new_state, hidden) if return_hidden else (logits, new_state)
