"""Model families: Itera-Lite (Mamba-2 + sparse MoE) and the Llama baseline."""

from __future__ import annotations

from torch import nn

from .config import (PRESETS, BaselineConfig, HybridConfig, IteraConfig, ModelConfig, config_from_dict,
                     config_to_dict, make_config)
from .itera import IteraLite, ModelOutput


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of a config's family."""
    if cfg.family == "itera":
        return IteraLite(cfg)
    if cfg.family == "hybrid":
        from .hybrid import HybridLM

        return HybridLM(cfg)
    from .baseline import Baseline

    return Baseline(cfg)


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameters: total, embedding (tied, counted once), non-embedding, active per token."""
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    embedding = cfg.vocab_size * cfg.d_model
    inactive = 0
    if cfg.family in ("itera", "hybrid") and cfg.n_experts:
        for blk in model.blocks:
            if blk.moe is None:
                continue
            experts = sum(p.numel() for p in (blk.moe.w_gate, blk.moe.w_up, blk.moe.w_down))
            inactive += experts * (cfg.n_experts - cfg.top_k) // cfg.n_experts
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "active_per_token": total - inactive,
    }


__all__ = ["PRESETS", "BaselineConfig", "HybridConfig", "IteraConfig", "ModelConfig", "IteraLite", "ModelOutput",
           "build_model", "count_params", "config_from_dict", "config_to_dict", "make_config"]
