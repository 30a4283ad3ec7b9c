"""The one way to run a bundle against the torch model it came from.

`compare` drives the written bundle through the runtime's own `ModelSession` (what users
will run) on held-out text: prefill logits (and SSM state), then decode steps
teacher-forced on the same text, each compared with one torch forward over the whole
sequence. The exporter calls it on every bundle it writes; tests call the same function.
`greedy_tokens` is the torch side of the golden greedy test (the runtime side is
`Generator.generate_ids`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from itera_runtime.bundle import Bundle, Validation, load_bundle
from itera_runtime.scoring import nll_nats
from itera_runtime.session import ModelSession
from itera_runtime.errors import UserError

# fp32 parity bound, relative to the largest torch value compared (logit or state, at least 1):
# a bundle computes the same maths in another order (fused kernels, other accumulation), so its
# rounding error grows with the values' magnitude. A trained tiny checkpoint (|logit| up to 12)
# differed by 3.1e-4 fused / 4.1e-4 portable; a wrong op differs by O(1).
FP32_TOLERANCE = 1e-4
PROMPT_LEN = 32

_PASSAGE = (
    "Tomorrow, and tomorrow, and tomorrow,\nCreeps in this petty pace from day to day,\n"
    "To the last syllable of recorded time;\nAnd all our yesterdays have lighted fools\n"
    "The way to dusty death. Out, out, brief candle!\n"
)


class ValidationTextError(UserError, ValueError):
    """Validation text that cannot be used; one line."""


def held_out_tokens(ckpt: dict, n: int, text_file: str | Path | None = None) -> tuple[np.ndarray, str]:
    """n tokens to validate on and where they came from.

    In order: `text_file` (the user's --validate-text), the held-out sample that training
    stored in the checkpoint ("validation_sample": ids and text of the test split), a fixed
    passage of Macbeth. Nothing here prepares or reads the training data.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(ckpt["tokenizer_json"])
    if text_file is not None:
        path = Path(text_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValidationTextError(f"{path}: cannot read validation text ({e.strerror if isinstance(e, OSError) else e})") from None
        ids = tok.encode(text).ids
        if len(ids) <= PROMPT_LEN:
            raise ValidationTextError(f"{path}: {len(ids)} tokens; validation needs more than {PROMPT_LEN}")
        return np.asarray(ids[:n], dtype=np.int64), str(path)
    sample = ckpt.get("validation_sample")
    if isinstance(sample, dict) and len(sample.get("ids", ())) > PROMPT_LEN:
        ids = np.asarray(sample["ids"][:n], dtype=np.int64)
        if ids.min() >= 0 and ids.max() < tok.get_vocab_size():
            return ids, str(sample.get("source", "checkpoint's held-out sample"))
    ids = tok.encode(_PASSAGE * 20).ids
    return np.asarray(ids[:n], dtype=np.int64), "built-in passage (no held-out sample in the checkpoint)"


def _bits(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed next-token loss in bits: logits (T, V) predict targets (T,)."""
    return nll_nats(logits, targets) / np.log(2)


@torch.no_grad()
def compare(model, bundle: str | Path | Bundle, tokens: np.ndarray, prompt_len: int = PROMPT_LEN,
            threads: int | None = 1, text: str = "", graph_set: str | None = None) -> Validation:
    """Worst absolute differences, ORT vs torch: prefill logits, state, decode logits.

    tokens: (T,) held-out ids; the first `prompt_len` are prefilled, the rest decoded one
    by one (teacher-forced), each step's logits compared with torch's at that position.
    graph_set: which graph set of a dual bundle to run (default: what the runtime would pick).
    """
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    session = ModelSession(bundle, threads=threads, graph_set=graph_set)
    tokens = np.asarray(tokens, dtype=np.int64)
    ref_logits = model(torch.from_numpy(tokens)[None]).logits[0].float().numpy()  # (T, V)
    chunks, state = [], None
    for logits, state in session.forward_chunks(tokens[:prompt_len]):
        chunks.append(logits)
    prefill = np.concatenate(chunks)
    # Generation's prefill computes only the last position's logits (io.logits_start): checked too.
    last, _ = session.prefill(tokens[:prompt_len])
    prefill_logits = max(float(np.abs(prefill - ref_logits[:prompt_len]).max()),
                         float(np.abs(last - ref_logits[prompt_len - 1]).max()))
    prefill_state = None
    scale = max(1.0, float(np.abs(ref_logits).max()))
    if bundle.state_kind == "ssm":
        ref_state = model(torch.from_numpy(tokens[:prompt_len])[None]).state
        flat = [t.numpy() for layer in ref_state for t in layer]
        prefill_state = float(max(np.abs(a - b).max() for a, b in zip(state.numpy(), flat)))
        scale = max(scale, *(float(np.abs(t).max()) for t in flat))
    # Decode, teacher-forced: feeding token i gives the logits torch has at position i.
    worst, agree, decoded = 0.0, 0, []
    for i in range(prompt_len, len(tokens)):
        step_logits, state = session.decode(int(tokens[i]), state)
        worst = max(worst, float(np.abs(step_logits - ref_logits[i]).max()))
        agree += int(step_logits.argmax() == ref_logits[i].argmax())
        decoded.append(np.asarray(step_logits).reshape(-1))
    steps = len(tokens) - prompt_len
    # Bits per byte of tokens[1:], each predicted from the logits one position earlier.
    ort_logits = np.concatenate([prefill, *[d[None] for d in decoded]])
    n_bytes = len(bundle.load_tokenizer().decode(tokens[1:].tolist()).encode("utf-8"))
    return Validation(
        text=text,
        max_abs_diff=max(v for v in (prefill_logits, prefill_state, worst) if v is not None),
        reference_scale=scale,
        prefill_logits=prefill_logits,
        prefill_state=prefill_state,
        decode_logits=worst,
        decode_steps=steps,
        decode_top1_agreement=agree / max(1, steps),
        bits_per_byte=_bits(ort_logits[:-1], tokens[1:]) / max(1, n_bytes),
        bits_per_byte_torch=_bits(ref_logits[:-1], tokens[1:]) / max(1, n_bytes),
    )


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
