"""Checkpoint → a transformers model folder (`itera-export CKPT --format hf -o DIR`), no custom code.

Itera-Lite becomes `GraniteMoeHybridForCausalLM` (the map and its one inert attention layer:
itera_lite/models/granite.py), the baseline its own `LlamaForCausalLM`. The folder holds what
`AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(DIR)` read (config.json,
model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json) and a model
card (README.md) whose numbers are measured: parameters, the logits' max |Δ| against our own
forward (checked here, before anything is written), bits/byte from the run's summary.json when
it sits beside the checkpoint.

Written to a temporary folder beside DIR, then renamed: a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from itera_runtime.errors import UserError

MARK = "itera_lite"  # our key in config.json: a folder with it is ours to replace with --force
PARITY_TOLERANCE = 1e-4  # max |Δ| of logits (relative to max |logit|) before the export refuses


class HfExportError(UserError):
    """A transformers export that cannot proceed; one line."""


def is_our_folder(path: Path) -> bool:
    try:
        return MARK in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def check_destination(out: Path, force: bool) -> None:
    if out.is_symlink() or out.is_file():
        raise HfExportError(f"{out} is a file or a link; give a folder name")
    if out.exists():
        if not force:
            raise HfExportError(f"{out} already exists; pass --force to replace it (only a folder of ours is replaced)")
        if not is_our_folder(out):
            raise HfExportError(f"{out} is not a folder written by itera-export --format hf; --force replaces only "
                                "ours, nothing written")


def hf_model(model, extra: dict):
    """The transformers model of `model` (either family), weights shared or copied in."""
    from itera_lite.models.granite import CONTEXT_LENGTH, hf_config, hf_state_dict

    if model.config.family not in ("itera", "baseline"):
        raise HfExportError(f"{model.config.family} checkpoints do not export to a transformers folder yet "
                            "(itera and baseline do)")
    if model.config.family == "baseline":
        hf = model.llama
        setattr(hf.config, MARK, extra)
        return hf
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    from transformers.utils import logging as hf_logging

    config = GraniteMoeHybridConfig(**hf_config(model.config, CONTEXT_LENGTH, extra))
    # Quiet the two notices building it prints: the CUDA-kernel fast path (not needed: the
    # folder's user may have it) and torch's no-op init of the zero-wide shared MLP.
    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        hf = GraniteMoeHybridForCausalLM(config).eval()
    hf.load_state_dict(hf_state_dict(model), strict=True)
    return hf


def parity(model, hf, ids: list[int]) -> dict:
    """Logits of our forward and of the transformers model on the same tokens: max |Δ| and top-1 agreement."""
    import torch

    with torch.no_grad():
        x = torch.tensor([ids])
        ours, theirs = model(x).logits[0], hf(input_ids=x, use_cache=False).logits[0]
    return {"tokens": len(ids), "max_abs_diff": float((ours - theirs).abs().max()),
            "max_abs_logit": float(ours.abs().max()),
            "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())}


def _run_summary(checkpoint: Path) -> dict | None:
    try:
        return json.loads((checkpoint.parent / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def model_card(name: str, family: str, n_params: int, check: dict, summary: dict | None, train: dict | None,
               safetensors_bytes: int, source: str) -> str:
    """README.md with the Hub's YAML front matter and only numbers measured here or in the run."""
    data = (train or {}).get("data") or (summary or {}).get("data")
    arch = ("GraniteMoeHybridForCausalLM (Itera-Lite: Mamba-2 + top-k SwiGLU MoE, no attention)" if family == "itera"
            else "LlamaForCausalLM (the param-matched Transformer baseline of Itera-Lite)")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "license: apache-2.0"]
    if data:
        lines += ["datasets:", f"- {data}"]
    lines += ["tags:", "- itera-lite", f"- {'granitemoehybrid' if family == 'itera' else 'llama'}", "---", "",
              f"# {name}", "", f"{arch}, exported by `itera-export --format hf` from `{os.path.basename(source)}`.", ""]
    if family == "itera":
        from itera_lite.models.granite import INERT_NOTE

        lines += [f"Note: {INERT_NOTE}.", ""]
    lines += ["| measured | value |", "|---|---|", f"| parameters (checkpoint) | {n_params:,} |",
              f"| model.safetensors | {safetensors_bytes / 1e6:.2f} MB |"]
    if family == "itera":
        lines.append(f"| logits vs Itera-Lite's own forward ({check['tokens']} tokens) | max abs diff "
                     f"{check['max_abs_diff']:.2e} (max abs logit {check['max_abs_logit']:.2f}), top-1 agreement "
                     f"{check['top1_agreement']:.1%} |")
    best = (summary or {}).get("best") or {}
    for split in ("val", "test"):
        if best.get(f"{split}_bpb") is not None:
            lines.append(f"| bits/byte, {split} split of `{data}` (run's summary.json) | {best[f'{split}_bpb']:.4f} |")
    if summary is None:
        lines.append("| bits/byte | not known: no summary.json beside the checkpoint |")
    lines += ["", "Bundle sizes (ONNX, GGUF) are not measured by this export; `itera-export` prints them for each "
              "format.", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH)", "model = AutoModelForCausalLM.from_pretrained(PATH)",
              'ids = tok("To be, or not to be", return_tensors="pt").input_ids',
              "print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))", "```", ""]
    return "\n".join(lines)


def export_hf(checkpoint, out=None, force: bool = False, log=lambda m: None) -> dict:
    """Checkpoint → transformers folder (checked against our forward first); returns a summary."""
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from itera_lite.checkpoint import load_model

    from .exporter import _tokenizer_json, default_output

    checkpoint = Path(checkpoint)
    out = Path(out) if out else default_output(checkpoint, "none").with_name(default_output(checkpoint, "none").name + "-hf")
    check_destination(out, force)
    model, ckpt = load_model(checkpoint)
    tokenizer_json = _tokenizer_json(ckpt, checkpoint)
    family = model.config.family
    extra = {"source_checkpoint": str(checkpoint), "family": family}
    hf = hf_model(model, extra)
    tok = Tokenizer.from_str(tokenizer_json)
    text = ckpt.get("validation_sample") or "To be, or not to be, that is the question:"
    ids = [i for i in tok.encode(text if isinstance(text, str) else str(text)).ids[:64] if i < model.config.vocab_size]
    check = parity(model, hf, ids or [0])
    if check["max_abs_diff"] > PARITY_TOLERANCE * max(1.0, check["max_abs_logit"]):
        raise HfExportError(f"the transformers model's logits differ from the checkpoint's by {check['max_abs_diff']:.2e}; "
                            "nothing written")
    log(f"transformers logits vs torch: max |Δ| {check['max_abs_diff']:.2e} on {check['tokens']} tokens")
    from itera_lite.models.granite import CONTEXT_LENGTH

    context = CONTEXT_LENGTH if family == "itera" else model.config.max_seq_len
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        GenerationConfig(bos_token_id=None, eos_token_id=None, pad_token_id=None).save_pretrained(tmp)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=context, clean_up_tokenization_spaces=False)
        fast.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        card = model_card(out.name, family, n_params, check, _run_summary(checkpoint), ckpt.get("train_config"),
                          (tmp / "model.safetensors").stat().st_size, str(checkpoint))
        (tmp / "README.md").write_text(card)
        for p in (tmp, *tmp.iterdir()):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    return {"path": str(out), "family": family, "architecture": type(hf).__name__, "files": files,
            "bytes": sum(files.values()), "parity": check}
