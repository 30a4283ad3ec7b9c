"""The param-matched Transformer baseline: transformers' LlamaForCausalLM (RoPE, RMSNorm, SwiGLU).

Built from the stock class so that the standard exporters (optimum) handle it unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

from .config import BaselineConfig
from .itera import ModelOutput


def llama_config(cfg: BaselineConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


class Baseline(nn.Module):
    def __init__(self, cfg: BaselineConfig):
        super().__init__()
        from transformers import LlamaForCausalLM

        self.config = cfg
        self.llama = LlamaForCausalLM(llama_config(cfg))

    def forward(self, tokens: Tensor, state=None) -> ModelOutput:
        """tokens (B, L) -> logits (B, L, V). The KV cache lives in the exported graph, not here."""
        if state is not None:
            raise ValueError("the baseline keeps no explicit state in torch; use the exported bundle")
        return ModelOutput(self.llama(input_ids=tokens, use_cache=False).logits)
