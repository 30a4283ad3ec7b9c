"""A Hugging Face transformers folder (or `hf:ORG/NAME`) → our model classes, for `itera-export DIR`.

The checkpoint's weights are copied into our own modules (`IteraLite` and its `Mamba2Mixer`)
where the maths is the same, so the exporter traces the very `step` the model runs and the
bundle gets the fused kernels and the portable graph set like any Itera-Lite bundle. Each
config value either maps onto one of ours exactly or is refused in one line that names it.
The bundle is then validated against the checkpoint's own transformers forward (`Reference`),
not against the converted model.

Mamba2ForCausalLM (transformers 4.57, run on CPU by its `torch_forward`):
    embeddings → N × [RMSNorm → Mamba2Mixer] (+ residual) → norm_f → lm_head (tied or not)
Its gated norm (MambaRMSNormGated) normalises over the whole inner width whatever n_groups
is, as our GatedRMSNorm does; mamba_ssm's CUDA module normalises per group instead, so a
checkpoint trained there with n_groups > 1 differs from transformers' CPU forward itself.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itera_runtime.errors import UserError

HF_PREFIX = "hf:"
# Files a bundle needs from a model repository (hf: sources download only these).
_WANTED = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "generation_config.json"]


class HFImportError(UserError):
    """A transformers folder we cannot import exactly; one line naming what."""


@dataclass
class HFSource:
    """An imported checkpoint: our model, the transformers model it came from, and what the bundle keeps."""

    folder: Path
    architecture: str
    model: Any  # IteraLite with the checkpoint's weights
    reference: Any  # `Reference` over the transformers model: what validation compares against
    ckpt: dict  # model_config and tokenizer_json, as a checkpoint of ours has them
    manifest_extra: dict = field(default_factory=dict)  # chat_template, special_tokens


def is_hf_source(source: str | os.PathLike) -> bool:
    """A folder with a config.json, or an `hf:ORG/NAME` name."""
    s = str(source)
    return s.startswith(HF_PREFIX) or (Path(s).is_dir() and (Path(s) / "config.json").is_file())


def resolve(source: str | os.PathLike) -> Path:
    """The local folder of a source: the folder itself, or an `hf:ORG/NAME` snapshot downloaded."""
    s = str(source)
    if not s.startswith(HF_PREFIX):
        folder = Path(s)
        if not (folder / "config.json").is_file():
            raise HFImportError(f"{folder}: not a transformers model folder (no config.json)")
        return folder
    repo = s[len(HF_PREFIX):]
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise HFImportError(f"{s}: expected hf:ORG/NAME")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HFImportError(f"{s}: hf: sources need huggingface_hub (pip install 'itera-lite[hf]')") from None
    # read at call time: huggingface_hub reads its own copy of the variable once, at import
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        return Path(snapshot_download(repo, allow_patterns=_WANTED, local_files_only=offline))
    except Exception as e:  # network, auth, missing repo: huggingface_hub has many error types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HFImportError(f"{s}: cannot download ({type(e).__name__}: {first[:200]})") from None


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFImportError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(d, dict):
        raise HFImportError(f"{path}: expected a JSON object")
    return d


def _refuse(folder: Path, what: list[str]) -> None:
    if what:
        raise HFImportError(f"{folder}: cannot import exactly: {'; '.join(what)}")


# ------------------------------------------------------------------------- Mamba-2


def mamba2_config(hf: dict, folder: Path):
    """Mamba2Config (as config.json holds it) → IteraConfig with no experts, or a one-line refusal."""
    from itera_lite.models import IteraConfig

    bad: list[str] = []
    d_model = hf.get("hidden_size", 768)
    inner, head_dim, groups = _mixer_shape(hf, d_model, ("expand", "num_heads", "head_dim", "n_groups"),
                                           (2, 128, 64, 8), bad)
    limit = hf.get("time_step_limit", [0.0, math.inf])
    if limit is not None and (float(limit[0]) != 0.0 or not math.isinf(float(limit[1]))):
        bad.append(f"time_step_limit {list(limit)} (only (0, inf), no clamp, is mapped)")
    _refuse(folder, bad)
    return IteraConfig(
        vocab_size=hf["vocab_size"], d_model=d_model, n_layers=hf["num_hidden_layers"], expand=inner // d_model,
        head_dim=head_dim, d_state=hf.get("state_size", 128), n_groups=groups, d_conv=hf.get("conv_kernel", 4),
        chunk_size=hf.get("chunk_size", 256), proj_bias=bool(hf.get("use_bias", False)), n_experts=0, top_k=0,
        d_expert=0, norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _mixer_shape(hf: dict, d_model: int, keys: tuple[str, str, str, str], defaults: tuple, bad: list[str]):
    """(inner width, head_dim, n_groups) of a config's Mamba-2 mixer under its own key names (expand,
    heads, head_dim, groups); what we do not map is appended to `bad`. head_dim "auto": inner / heads."""
    k_expand, k_heads, k_head_dim, k_groups = keys
    expand, heads, head_dim, groups = (hf.get(k, d) for k, d in zip(keys, defaults))
    inner = int(expand * d_model)
    if inner != expand * d_model or inner % d_model:
        bad.append(f"{k_expand} {expand} (a whole number is mapped)")
    head_dim = inner // heads if head_dim == "auto" else head_dim
    if heads * head_dim != inner:
        bad.append(f"{k_heads} {heads} x {k_head_dim} {head_dim} != {k_expand} x hidden_size {inner}")
    if heads % groups:
        bad.append(f"{k_groups} {groups} does not divide {k_heads} {heads}")
    if hf.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act {hf['hidden_act']!r} (silu is mapped)")
    return inner, head_dim, groups


def _mixer_weights(sd: dict, src: str, dst: str, conv_bias: bool) -> dict:
    """One Mamba-2 mixer's tensors, transformers' names → ours (conv kernel (C, 1, K) → (C, K))."""
    import torch

    out = {f"{dst}.{k}": sd[f"{src}.{k}"] for k in ("in_proj.weight", "out_proj.weight", "dt_bias", "A_log", "D",
                                                     "norm.weight")}
    for k in ("in_proj.bias", "out_proj.bias"):
        if f"{src}.{k}" in sd:
            out[f"{dst}.{k}"] = sd[f"{src}.{k}"]
    w = sd[f"{src}.conv1d.weight"]
    out[f"{dst}.conv_weight"] = w[:, 0, :]
    # No conv bias is a zero bias: the same numbers, and one graph layout for both.
    out[f"{dst}.conv_bias"] = sd[f"{src}.conv1d.bias"] if conv_bias else torch.zeros(w.shape[0])
    return out


def mamba2_weights(sd: dict, cfg, hf: dict) -> dict:
    """Mamba2ForCausalLM's state dict → IteraLite's."""
    out = {"embed.weight": sd["backbone.embeddings.weight"], "norm_f.weight": sd["backbone.norm_f.weight"]}
    for i in range(cfg.n_layers):
        out[f"blocks.{i}.norm1.weight"] = sd[f"backbone.layers.{i}.norm.weight"]
        out.update(_mixer_weights(sd, f"backbone.layers.{i}.mixer", f"blocks.{i}.mixer",
                                  bool(hf.get("use_conv_bias", True))))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _mamba2_cache_state(cache) -> list:
    """Mamba2Cache → our per-layer (conv_state (B, K-1, Cc), ssm_state (B, H, N, P))."""
    # transformers keeps the last K conv inputs channels-first (B, Cc, K) (we keep K-1, channels
    # last) and the SSM state as (B, H, P, N).
    return [(cache.conv_states[i][..., 1:].transpose(-1, -2), cache.ssm_states[i].transpose(-1, -2))
            for i in range(len(cache.conv_states))]


# ------------------------------------------------------------------------- Granite-4.0-H


def granite_config(hf: dict, folder: Path):
    """GraniteMoeHybridConfig (as config.json holds it) → HybridConfig, or a one-line refusal."""
    from itera_lite.models import HybridConfig

    bad = []
    n_layers, d_model = hf["num_hidden_layers"], hf["hidden_size"]
    types = hf.get("layer_types") or ["mamba"] * n_layers
    if len(types) != n_layers or set(types) - {"mamba", "attention"}:
        bad.append(f"layer_types {types}")
    inner, head_dim, groups = _mixer_shape(hf, d_model, ("mamba_expand", "mamba_n_heads", "mamba_d_head",
                                                         "mamba_n_groups"), (2, 128, "auto", 1), bad)
    pos = hf.get("position_embedding_type")
    if pos not in (None, "nope", "rope"):
        bad.append(f"position_embedding_type {pos!r} (rope and nope are mapped)")
    if pos == "rope" and hf.get("rope_scaling"):
        bad.append(f"rope_scaling {hf['rope_scaling']} (plain RoPE is mapped)")
    q_heads, kv_heads = hf.get("num_attention_heads", 32), hf.get("num_key_value_heads") or hf.get("num_attention_heads", 32)
    if "attention" in types and (d_model % q_heads or q_heads % kv_heads):
        bad.append(f"num_attention_heads {q_heads} / num_key_value_heads {kv_heads} do not divide hidden_size "
                   f"{d_model} into heads")
    _refuse(folder, bad)
    return HybridConfig(
        vocab_size=hf["vocab_size"], d_model=d_model, n_layers=n_layers, layer_types=list(types),
        expand=inner // d_model, head_dim=head_dim, d_state=hf.get("mamba_d_state", 256), n_groups=groups,
        d_conv=hf.get("mamba_d_conv", 4), chunk_size=hf.get("mamba_chunk_size", 256),
        proj_bias=bool(hf.get("mamba_proj_bias", False)),
        n_heads=q_heads, n_kv_heads=kv_heads, attention_bias=bool(hf.get("attention_bias", False)),
        rope_theta=float(hf.get("rope_theta", 10000.0)) if pos == "rope" else 0.0,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        n_experts=hf.get("num_local_experts", 8), top_k=hf.get("num_experts_per_tok", 2),
        d_expert=hf.get("intermediate_size", 1024), d_shared=hf.get("shared_intermediate_size", 1024),
        embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
        attention_multiplier=float(hf.get("attention_multiplier", 1.0)),
        logits_scaling=float(hf.get("logits_scaling", 1.0)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def granite_weights(sd: dict, cfg, hf: dict) -> dict:
    """GraniteMoeHybridForCausalLM's state dict → HybridLM's (fused gate|up halves split)."""
    out = {"embed.weight": sd["model.embed_tokens.weight"], "norm_f.weight": sd["model.norm.weight"]}
    for i, kind in enumerate(cfg.layer_types):
        src, dst = f"model.layers.{i}", f"blocks.{i}"
        out[f"{dst}.norm1.weight"] = sd[f"{src}.input_layernorm.weight"]
        out[f"{dst}.norm2.weight"] = sd[f"{src}.post_attention_layernorm.weight"]
        if kind == "mamba":
            out.update(_mixer_weights(sd, f"{src}.mamba", f"{dst}.mixer", bool(hf.get("mamba_conv_bias", True))))
        else:
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                for t in ("weight", "bias"):
                    if f"{src}.self_attn.{p}.{t}" in sd:
                        out[f"{dst}.mixer.{p}.{t}"] = sd[f"{src}.self_attn.{p}.{t}"]
        gate, up = sd[f"{src}.shared_mlp.input_linear.weight"].chunk(2, dim=0)
        out.update({f"{dst}.mlp.gate.weight": gate, f"{dst}.mlp.up.weight": up,
                    f"{dst}.mlp.down.weight": sd[f"{src}.shared_mlp.output_linear.weight"]})
        if cfg.n_experts:
            moe = f"{src}.block_sparse_moe"
            gate, up = sd[f"{moe}.input_linear.weight"].chunk(2, dim=1)  # (E, 2F, D): gate rows, then up
            out.update({f"{dst}.moe.router.weight": sd[f"{moe}.router.layer.weight"],
                        f"{dst}.moe.w_gate": gate, f"{dst}.moe.w_up": up,
                        f"{dst}.moe.w_down": sd[f"{moe}.output_linear.weight"]})
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


# ------------------------------------------------------------------------- reference


class Reference:
    """The transformers model behind the interface `validate.compare` drives: `.config.family`,
    `(tokens) -> .logits, .state`."""

    def __init__(self, hf_model, family: str, cache_state):
        from types import SimpleNamespace

        self.hf = hf_model
        self.config = SimpleNamespace(family=family)
        self._cache_state = cache_state

    def __call__(self, tokens):
        from types import SimpleNamespace

        import torch

        with torch.no_grad():
            if self._cache_state is None:  # logits only (a hybrid's state is compared through its logits)
                return SimpleNamespace(logits=self.hf(input_ids=tokens, use_cache=False).logits, state=None)
            out = self.hf(input_ids=tokens, use_cache=True)
        state = self._cache_state(out.cache_params)
        return SimpleNamespace(logits=out.logits, state=state)


# ------------------------------------------------------------------------- tokenizer


def _token_string(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):  # AddedToken as saved
        return v["content"]
    return None


def _chat_template(folder: Path, tok_cfg: dict) -> str | None:
    """The folder's default chat template: chat_template.jinja, else tokenizer_config's field."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):  # named templates: the one called "default"
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) and t.strip() else None


def tokenizer_parts(folder: Path, hf: dict) -> tuple[str, dict]:
    """tokenizer.json text and the manifest's top-level chat fields (`chat_template`, `special_tokens`)."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise HFImportError(f"{folder}: no tokenizer.json (a fast tokenizer is what a bundle carries)")
    text = path.read_text(encoding="utf-8")
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception
        raise HFImportError(f"{path}: not a readable tokenizer ({str(e).strip()[:160]})") from None
    if tok.get_vocab_size() > hf["vocab_size"]:
        raise HFImportError(f"{path}: {tok.get_vocab_size()} token ids, more than the model's vocab_size "
                            f"{hf['vocab_size']}")
    tok_cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    special = {}
    for key in ("bos_token", "eos_token"):
        s = _token_string(tok_cfg.get(key))
        token_id = hf.get(f"{key}_id")
        if s is None and isinstance(token_id, int) and 0 <= token_id < tok.get_vocab_size():
            s = tok.id_to_token(token_id)
        if s is not None:
            special[key] = s
            special[f"{key}_id"] = tok.token_to_id(s)
    extra: dict = {}
    if special:
        extra["special_tokens"] = special
    template = _chat_template(folder, tok_cfg)
    if template is not None:
        extra["chat_template"] = template
    return text, extra


# ------------------------------------------------------------------------- loading

ARCHITECTURES = ("Mamba2ForCausalLM", "GraniteMoeHybridForCausalLM")


def load_source(source: str | os.PathLike, log=lambda msg: None) -> HFSource:
    """Import a transformers folder or `hf:ORG/NAME`: our model, the reference, the tokenizer parts."""
    folder = resolve(source)
    hf = _read_json(folder / "config.json")
    archs = hf.get("architectures") or []
    arch = archs[0] if len(archs) == 1 else None
    if arch not in ARCHITECTURES:
        raise HFImportError(f"{folder}: architecture {archs or hf.get('model_type')!r} is not one we import "
                            f"(we map {', '.join(ARCHITECTURES)})")
    cfg = mamba2_config(hf, folder) if arch == "Mamba2ForCausalLM" else granite_config(hf, folder)
    tokenizer_json, extra = tokenizer_parts(folder, hf)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()  # its advice (no CUDA kernels: the CPU forward runs) is not ours
    from itera_lite.models import build_model
    from itera_lite.models.config import config_to_dict

    log(f"loading {arch} from {folder}")
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HFImportError(f"{folder}: transformers cannot load it ({first[:200]})") from None
    sd = {k: v.detach().float() for k, v in hf_model.state_dict().items()}
    model = build_model(cfg).eval()
    if arch == "Mamba2ForCausalLM":
        model.load_state_dict(mamba2_weights(sd, cfg, hf), strict=True)
        reference = Reference(hf_model, "itera", _mamba2_cache_state)
    else:
        model.load_state_dict(granite_weights(sd, cfg, hf), strict=True)
        reference = Reference(hf_model, "hybrid", None)
    ckpt = {"model_config": config_to_dict(cfg), "tokenizer_json": tokenizer_json,
            "source": {"format": "transformers", "architecture": arch, "path": str(source)}}
    return HFSource(folder, arch, model, reference, ckpt, extra)
