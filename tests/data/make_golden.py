"""Make the committed golden bundles of tests/test_golden.py (run again only on purpose).

    python tests/data/make_golden.py

One tiny model per family (byte vocabulary, two layers), trained for a few hundred steps on
one passage so that its greedy continuation is a clear argmax at every step (a random-init
model's near-ties could flip between onnxruntime releases), exported with itera-export's
own function. golden.json records the prompt and the greedy text the runtime produced then;
the test asks the runtime of today for the same text.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from itera_export.exporter import export_checkpoint
from itera_lite.checkpoint import save_checkpoint
from itera_lite.data import train_tokenizer
from itera_lite.models import build_model, make_config
from itera_lite.models.config import config_to_dict
from itera_runtime.generate import Generator
from itera_runtime.sampling import SamplingConfig

HERE = Path(__file__).resolve().parent
TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them.\n"
)
PROMPT = "To be, or not"
NEW_TOKENS = 48
SIZES = {
    "itera": dict(d_model=64, n_layers=2, head_dim=16, d_state=16, n_experts=4, d_expert=32),
    "baseline": dict(d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=128, max_seq_len=256),
}


def make(family: str, steps: int = 200) -> dict:
    torch.manual_seed(0)
    cfg = make_config(family, "tiny", vocab_size=256, **SIZES[family])
    model = build_model(cfg)
    tokenizer = train_tokenizer([TEXT], 256)
    ids = torch.tensor([tokenizer.encode(TEXT).ids])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        out = model(ids[:, :-1])
        logits = out.logits if hasattr(out, "logits") else out
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    work = HERE / f"golden-{family}.work"
    work.mkdir(exist_ok=True)
    ckpt = work / "model.pt"
    save_checkpoint(ckpt, {"model_config": config_to_dict(cfg), "model": model.state_dict(),
                           "tokenizer_json": tokenizer.to_str()})
    out = HERE / f"golden-{family}"
    if out.exists():
        shutil.rmtree(out)
    (work / "text.txt").write_text(TEXT * 4)
    export_checkpoint(ckpt, out, validate_text=work / "text.txt")
    shutil.rmtree(work)
    text = Generator(out, threads=1).generate(PROMPT, NEW_TOKENS, SamplingConfig(temperature=0)).text
    print(f"{family}: loss {loss.item():.4f}; {PROMPT!r} -> {text!r}", file=sys.stderr)
    return {"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "text": text}


if __name__ == "__main__":
    golden = {family: make(family) for family in SIZES}
    (HERE / "golden.json").write_text(json.dumps(golden, indent=2) + "\n")
