"""Itera-Lite: tied embedding → N × [RMSNorm → Mamba-2, RMSNorm → sparse MoE] → RMSNorm → tied head.

`forward(tokens, state)` runs a whole sequence in parallel (training, prefill);
`step(token, state)` runs one token with explicit per-layer (conv_state, ssm_state), the
function the decode graph is exported from. Both take and return the same state, so a
prefill can be continued token by token.

Knowledge retrieval (kNN-LM, `itera_lite/retrieval.py`) reads `hidden`: the final-norm output
that feeds the tied head, at each position (forward) or for the stepped token (step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import IteraConfig
from .moe import SparseMoE
from .norms import RMSNorm
from .ssm import Mamba2Mixer

LayerState = tuple[Tensor, Tensor]  # (conv_state (B, K-1, Cc), ssm_state (B, H, N, P))


@dataclass
class ModelOutput:
    logits: Tensor  # (B, L, V)
    state: list[LayerState] | None = None
    hidden: Tensor | None = None  # (B, L, D) final-norm output, the head's input (retrieval keys)
    aux: dict[str, Tensor] = field(default_factory=dict)


class Block(nn.Module):
    def __init__(self, cfg: IteraConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg)
        # n_experts 0: the mixer alone (Hugging Face's Mamba2ForCausalLM has no MLP sublayer)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.n_experts else None
        self.moe = SparseMoE(cfg) if cfg.n_experts else None

    def forward(self, x: Tensor, state: LayerState | None, scan: str = "chunked"):
        h, state = self.mixer(self.norm1(x), state, scan=scan)
        x = x + h
        if self.moe is None:
            return x, state, {}
        h, aux = self.moe(self.norm2(x))
        return x + h, state, aux

    def step(self, x: Tensor, state: LayerState):
        h, state = self.mixer.step(self.norm1(x), state)
        x = x + h
        if self.moe is None:
            return x, state
        h, _ = self.moe(self.norm2(x))
        return x + h, state


class IteraLite(nn.Module):
    def __init__(self, cfg: IteraConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def allocate_state(self, batch: int, device=None, dtype=torch.float32) -> list[LayerState]:
        """Zero state for `batch` sequences: one (conv_state, ssm_state) per layer."""
        state = []
        for blk in self.blocks:
            conv_shape, ssm_shape = blk.mixer.state_shapes(batch)
            state.append((torch.zeros(conv_shape, device=device, dtype=dtype),
                          torch.zeros(ssm_shape, device=device, dtype=dtype)))
        return state

    def _head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Residual stream -> (logits, hidden): hidden is the final-norm output the head reads."""
        h = self.norm_f(x)
        if self.lm_head is not None:
            return self.lm_head(h), h
        return h @ self.embed.weight.T, h  # tied head

    def forward(self, tokens: Tensor, state: list[LayerState] | None = None, scan: str = "chunked") -> ModelOutput:
        """tokens (B, L) int64 -> logits (B, L, V), final state, aux (MoE losses, expert load)."""
        x = self.embed(tokens)  # (B, L, D)
        state = state if state is not None else [None] * len(self.blocks)
        new_state, auxes = [], []
        for blk, s in zip(self.blocks, state):
            x, s, aux = blk(x, s, scan=scan)
            new_state.append(s)
            auxes.append(aux)
        aux = {}
        if auxes and auxes[0]:
            aux = {
                "balance_loss": torch.stack([a["balance_loss"] for a in auxes]).mean(),
                "z_loss": torch.stack([a["z_loss"] for a in auxes]).mean(),
                "load": torch.stack([a["load"] for a in auxes]),  # (n_layers, E)
            }
        logits, hidden = self._head(x)
        return ModelOutput(logits, new_state, aux=aux, hidden=hidden)

    def step(self, token: Tensor, state: list[LayerState], return_hidden: bool = False):
        """token (B,) int64 -> logits (B, V), new state (and hidden (B, D) with return_hidden)."""
        x = self.embed(token)[:, None]  # (B, 1, D): the one-token layout, kept through the blocks
        new_state = []
        for blk, s in zip(self.blocks, state):
            x, s = blk.step(x, s)
            new_state.append(s)
        logits, hidden = self._head(x)
        logits, hidden = logits[:, 0], hidden[:, 0]  # (B, V), (B, D)
        return (logits, new_state, hidden) if return_hidden else (logits, new_state)
