"""Validation of a written bundle against the torch model it came from.

Runs the bundle with the runtime's own `ModelSession` (what users will run), on held-out
text: prefill logits (and SSM state), then decode steps teacher-forced on the same text,
each compared with one torch forward over the whole sequence. Greedy generation is checked
token for token in `greedy_tokens` (the golden test uses it).
"""

from __future__ import annotations

import numpy as np
import torch

from itera_runtime.bundle import load_bundle
from itera_runtime.session import ModelSession

FP32_TOLERANCE = 1e-4


def held_out_tokens(ckpt: dict, n: int) -> tuple[np.ndarray, str]:
    """n tokens of the checkpoint's test split (never trained on), else of a fixed passage."""
    from tokenizers import Tokenizer

    from itera_lite.data import DataError, prepare_data

    cfg = ckpt.get("train_config", {})
    try:
        data = prepare_data(cfg["data"], cfg["vocab_size"])
        if data.tokenizer_json == ckpt["tokenizer_json"] and data.n_tokens("test") > n:
            return np.asarray(data.split("test")[:n], dtype=np.int64), f"test split of {cfg['data']}"
    except (KeyError, DataError):
        pass
    tok = Tokenizer.from_str(ckpt["tokenizer_json"])
    ids = tok.encode(_PASSAGE * 20).ids
    return np.asarray(ids[:n], dtype=np.int64), "built-in passage (test split unavailable)"


_PASSAGE = (
    "Tomorrow, and tomorrow, and tomorrow,\nCreeps in this petty pace from day to day,\n"
    "To the last syllable of recorded time;\nAnd all our yesterdays have lighted fools\n"
    "The way to dusty death. Out, out, brief candle!\n"
)


@torch.no_grad()
def compare(model, bundle_dir, tokens: np.ndarray, prompt_len: int = 32, threads: int | None = 1) -> dict:
    """Worst absolute differences, ORT vs torch: prefill logits, state, decode logits."""
    bundle = load_bundle(bundle_dir)
    session = ModelSession(bundle, threads=threads)
    ref = model(torch.from_numpy(tokens)[None])
    ref_logits = ref.logits[0].float().numpy()  # (T, V)
    logits, state = session.prefill(tokens[:prompt_len])
    result = {"prefill_logits": float(np.abs(logits - ref_logits[:prompt_len]).max())}
    if bundle.state_kind == "ssm":
        prefill_ref = model(torch.from_numpy(tokens[:prompt_len])[None]).state
        flat = [t.numpy() for layer in prefill_ref for t in layer]
        result["prefill_state"] = float(max(np.abs(a - b).max() for a, b in zip(state.numpy(), flat)))
    # Decode, teacher-forced: feeding token i gives the logits torch has at position i.
    worst, agree = 0.0, 0
    for i in range(prompt_len, len(tokens)):
        step_logits, state = session.decode(int(tokens[i]), state)
        worst = max(worst, float(np.abs(step_logits - ref_logits[i]).max()))
        agree += int(step_logits.argmax() == ref_logits[i].argmax())
    result["decode_logits"] = worst
    result["decode_steps"] = len(tokens) - prompt_len
    result["decode_top1_agreement"] = agree / max(1, len(tokens) - prompt_len)
    result["max_abs_diff"] = max(v for k, v in result.items() if k.endswith(("logits", "state")))
    return result


@torch.no_grad()
def greedy_tokens(model, prompt: np.ndarray, steps: int) -> list[int]:
    """Greedy continuation in torch (Itera: prefill + step; baseline: full forward each time)."""
    ids = torch.from_numpy(np.asarray(prompt, dtype=np.int64))[None]
    out: list[int] = []
    if model.config.family == "itera":
        res = model(ids)
        token, state = int(res.logits[0, -1].argmax()), res.state
        for _ in range(steps):
            out.append(token)
            logits, state = model.step(torch.tensor([token]), state)
            token = int(logits[0].argmax())
        return out
    for _ in range(steps):
        token = int(model(ids).logits[0, -1].argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def greedy_tokens_ort(bundle_dir, prompt: np.ndarray, steps: int, threads: int | None = 1) -> list[int]:
    """The same greedy continuation through the bundle."""
    session = ModelSession(load_bundle(bundle_dir), threads=threads)
    logits, state = session.prefill(prompt)
    token, out = int(logits[-1].argmax()), []
    for _ in range(steps):
        out.append(token)
        logits, state = session.decode(token, state)
        token = int(logits.argmax())
    return out
