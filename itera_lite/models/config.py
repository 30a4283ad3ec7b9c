"""Architecture configs (stored inside every checkpoint) and the size presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class IteraConfig:
    """Itera-Lite: N blocks of [RMSNorm → Mamba-2 mixer, RMSNorm → top-k SwiGLU MoE (when n_experts > 0)]."""

    family: str = "itera"
    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 4
    # Mamba-2 mixer
    expand: int = 2
    head_dim: int = 32  # P
    d_state: int = 32  # N
    n_groups: int = 1  # G
    d_conv: int = 4  # K
    chunk_size: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1
    proj_bias: bool = False  # in_proj / out_proj biases (Hugging Face Mamba-2 `use_bias`)
    # Mixture of experts (n_experts 0: no MLP sublayer, as in Hugging Face's Mamba2ForCausalLM)
    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 64
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # False: a separate lm_head (imported checkpoints)


@dataclass
class BaselineConfig:
    """Param-matched decoder-only Transformer, built as transformers' LlamaForCausalLM."""

    family: str = "baseline"
    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    d_ff: int = 352
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


@dataclass
class HybridConfig:
    """Architecture of a hybrid stack; `layer_types[i]` is "mamba" or "attention"."""

    family: str = "hybrid"
    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 4
    layer_types: list[str] = field(default_factory=lambda: ["mamba", "attention", "mamba", "mamba"])
    # Mamba-2 layers (names as IteraConfig's: Mamba2Mixer reads them)
    expand: int = 2
    head_dim: int = 32
    d_state: int = 32
    n_groups: int = 1
    d_conv: int = 4
    chunk_size: int = 64
    proj_bias: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    # attention layers
    n_heads: int = 4
    n_kv_heads: int = 4
    attention_bias: bool = False
    rope_theta: float = 0.0  # 0: no positional encoding ("nope")
    max_seq_len: int = 4096  # KV buffer capacity
    # MLP: top-k MoE (n_experts > 0) plus an always-on shared SwiGLU of width d_shared
    n_experts: int = 0
    top_k: int = 2
    d_expert: int = 64
    d_shared: int = 256
    # Granite's multipliers
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0  # the attention's score scale (in place of 1/sqrt(Dh))
    logits_scaling: float = 1.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True


ModelConfig = IteraConfig | BaselineConfig | HybridConfig

# Param-matched within 10% at the default vocab (tests/test_models.py checks every pair).
PRESETS: dict[str, dict[str, dict]] = {
    "itera": {
        "tiny": dict(d_model=128, n_layers=4, head_dim=32, d_state=32, n_experts=8, d_expert=64),
        "small": dict(d_model=256, n_layers=6, head_dim=64, d_state=64, n_experts=8, d_expert=128),
        "base": dict(d_model=384, n_layers=8, head_dim=64, d_state=64, n_experts=8, d_expert=192),
    },
    "baseline": {
        "tiny": dict(d_model=128, n_layers=6, n_heads=4, n_kv_heads=4, d_ff=352),
        "small": dict(d_model=256, n_layers=9, n_heads=8, n_kv_heads=8, d_ff=688),
        "base": dict(d_model=384, n_layers=12, n_heads=6, n_kv_heads=6, d_ff=1024),
    },
}


def make_config(family: str, preset: str = "tiny", **overrides) -> ModelConfig:
    """Config of a family at a preset size, with field overrides (e.g. vocab_size)."""
    if family not in PRESETS:
        raise ValueError(f"unknown model family {family!r}; choose from {sorted(PRESETS)}")
    if preset not in PRESETS[family]:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS[family])}")
    cls = IteraConfig if family == "itera" else BaselineConfig
    return cls(**{**PRESETS[family][preset], **overrides})


def config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
    """Rebuild a config from a checkpoint or manifest; unknown keys are an error."""
    family = d.get("family")
    cls = {"itera": IteraConfig, "baseline": BaselineConfig, "hybrid": HybridConfig}.get(family)
    if cls is None:
        raise ValueError(f"unknown model family {family!r} in config")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"config has unknown fields {sorted(unknown)} (written by a newer itera-lite?)")
    return cls(**d)
