"""Training loop for both families: AdamW, warm-up + cosine, clipping, accumulation,
early stopping, time and token budgets, atomic checkpoints and exact resume.

Exact resume without storing data-loader state: the batch of step s is a pure function of
(seed, s, rank) (see `itera_lite.data.get_batch`), so a run resumed from `last.pt` at step
s sees exactly the batches an uninterrupted run would have seen after s.

Data parallel: launched by `torchrun` or `accelerate launch` (they set RANK/WORLD_SIZE),
each process takes its own rows of the global batch and gradients are averaged with one
all-reduce (gloo on CPU). Rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import bits_per_byte, get_batch, iter_eval_batches, perplexity, prepare_data
from .models import build_model, config_from_dict, config_to_dict, count_params, make_config


@dataclass
class TrainConfig:
    """Everything about a training run that is not architecture."""

    model: str = "itera"  # itera | baseline
    preset: str = "tiny"
    data: str = "shakespeare"
    vocab_size: int = 2048
    out: str = "runs/itera-tiny"
    seq_len: int = 256
    batch_size: int = 16  # global, split across processes
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int = 2000
    max_minutes: float | None = None
    max_tokens: int | None = None
    eval_every: int = 100
    eval_batches: int = 16
    final_eval_batches: int | None = None  # summary's val/test eval; None = whole splits
    save_every: int | None = None  # defaults to eval_every
    patience: int | None = None  # evals without improvement before stopping
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    seed: int = 1337
    threads: int | None = None
    log_every: int = 1


class TrainError(Exception):
    """A problem the user can fix (bad arguments, existing run); one line."""


# ---------------------------------------------------------------------------------------


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up to lr, then cosine down to min_lr_ratio * lr at max_steps."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, embeddings and the SSM's per-head scalars."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def token_byte_lengths(tokenizer_json: str) -> np.ndarray:
    """UTF-8 byte length of every token id, so bits/byte is exact on any slice of text."""
    from tokenizers import Tokenizer

    from itera_runtime.textstream import token_byte_lengths as lengths

    return lengths(Tokenizer.from_str(tokenizer_json))


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, byte_len: np.ndarray, batch_size: int, seq_len: int,
             max_batches: int | None) -> dict:
    """Mean loss, perplexity and bits/byte over contiguous windows from the split's start."""
    model.eval()
    nats, n_tok, n_bytes = 0.0, 0, 0
    for x, y in iter_eval_batches(tokens, batch_size, seq_len, max_batches):
        logits = model(torch.from_numpy(x)).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), torch.from_numpy(y).flatten(), reduction="sum")
        nats += loss.item()
        n_tok += y.size
        n_bytes += int(byte_len[y].sum())
    model.train()
    mean = nats / max(1, n_tok)
    return {"loss": mean, "ppl": perplexity(mean), "bpb": bits_per_byte(mean, n_tok, n_bytes),
            "tokens": n_tok, "bytes": n_bytes}


class _Logs:
    """metrics.jsonl (every record) + train.csv / eval.csv (fixed columns), rank 0 only."""

    TRAIN_COLS = ["step", "tokens", "loss", "ppl", "lr", "grad_norm", "tokens_per_s", "balance_loss",
                  "z_loss", "elapsed_s"]
    EVAL_COLS = ["step", "tokens", "val_loss", "val_ppl", "val_bpb", "best_val_loss", "elapsed_s"]

    def __init__(self, out: Path, resume_step: int | None):
        self.out = out
        if resume_step is not None:
            self._truncate(resume_step)
        else:
            for name in ("metrics.jsonl", "train.csv", "eval.csv"):
                (out / name).unlink(missing_ok=True)

    def _truncate(self, step: int):
        # A killed run may have logged steps past its last checkpoint; they will be redone.
        p = self.out / "metrics.jsonl"
        if p.exists():
            keep = [ln for ln in p.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            p.write_text("".join(ln + "\n" for ln in keep))
        for name in ("train.csv", "eval.csv"):
            p = self.out / name
            if p.exists():
                rows = list(csv.DictReader(p.open()))
                with p.open("w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=self.TRAIN_COLS if name == "train.csv" else self.EVAL_COLS)
                    w.writeheader()
                    w.writerows(r for r in rows if int(r["step"]) <= step)

    def write(self, kind: str, rec: dict):
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"kind": kind, **rec}) + "\n")
        cols = self.TRAIN_COLS if kind == "train" else self.EVAL_COLS
        p = self.out / f"{kind}.csv"
        new = not p.exists()
        with p.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(rec)


def _dist_setup():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def _all_reduce_grads(model, world: int):
    """Average gradients across processes in one flat all-reduce (experts with no tokens give zeros)."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a training run; returns the summary also written to summary.json."""
    from tqdm import tqdm

    rank, world = _dist_setup()
    if cfg.batch_size % world:
        raise TrainError(f"--batch-size {cfg.batch_size} must divide by the {world} processes")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    last_path = out / "last.pt"

    ckpt = None
    if resume:
        if not last_path.exists():
            raise TrainError(f"{last_path}: nothing to resume (no last.pt in --out)")
        ckpt = load_checkpoint(last_path)
        saved = ckpt.get("train_config", {})
        # The run continues with its own settings; only budgets may be extended on resume.
        budget_keys = {"max_steps", "max_minutes", "max_tokens", "patience", "threads"}
        cfg = dataclasses.replace(
            TrainConfig(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}),
            **{k: getattr(cfg, k) for k in budget_keys}, out=cfg.out,
        )
    elif last_path.exists():
        raise TrainError(f"{out} already holds a run; pass --resume to continue it or choose another --out")

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        data = prepare_data(cfg.data, cfg.vocab_size)
    if world > 1:
        torch.distributed.barrier()
        if rank != 0:
            data = prepare_data(cfg.data, cfg.vocab_size)
    if ckpt is not None and ckpt["tokenizer_json"] != data.tokenizer_json:
        raise CheckpointError(f"{last_path}: the data's tokenizer differs from the checkpoint's; same --data?")

    torch.manual_seed(cfg.seed)
    model_cfg = (config_from_dict(ckpt["model_config"]) if ckpt
                 else make_config(cfg.model, cfg.preset, vocab_size=data.vocab_size))
    model = build_model(model_cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), fused=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    step, tokens_seen, elapsed0 = 0, 0, 0.0
    best_val, evals_since_best = float("inf"), 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        step, tokens_seen, elapsed0 = ckpt["step"], ckpt["tokens_seen"], ckpt["elapsed_s"]
        best_val, evals_since_best = ckpt["best_val_loss"], ckpt["evals_since_best"]
    model.train()

    train_tokens, val_tokens = data.split("train"), data.split("val")
    byte_len = token_byte_lengths(data.tokenizer_json)
    params = count_params(model)
    logs = _Logs(out, step if ckpt else None) if rank == 0 else None
    save_every = cfg.save_every or cfg.eval_every
    rows_per_rank = cfg.batch_size // world
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    t_start = time.perf_counter()
    elapsed = lambda: elapsed0 + time.perf_counter() - t_start  # noqa: E731
    val = None
    stop_reason = "max_steps"

    def checkpoint_payload() -> dict:
        return {
            "model_config": config_to_dict(model_cfg), "train_config": dataclasses.asdict(cfg),
            "tokenizer_json": data.tokenizer_json, "data_meta": data.meta, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state()}, "step": step, "tokens_seen": tokens_seen,
            "elapsed_s": elapsed(), "best_val_loss": best_val, "evals_since_best": evals_since_best,
            "metrics": {"val": val, "params": params},
        }

    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {model_cfg.family}-{cfg.preset}",
               disable=not progress or rank != 0, file=sys.stderr, dynamic_ncols=True)
    while True:
        if step >= cfg.max_steps:
            stop_reason = "max_steps"
            break
        if cfg.max_minutes is not None and elapsed() >= cfg.max_minutes * 60:
            stop_reason = "max_minutes"
            break
        if cfg.max_tokens is not None and tokens_seen >= cfg.max_tokens:
            stop_reason = "max_tokens"
            break
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "balance_loss": 0.0, "z_loss": 0.0}
        load = None
        for micro in range(cfg.grad_accum):
            x, y = get_batch(train_tokens, step * cfg.grad_accum + micro, rows_per_rank, cfg.seq_len,
                             cfg.seed, rank=rank, world_size=world)
            res = model(torch.from_numpy(x))
            loss = F.cross_entropy(res.logits.flatten(0, 1).float(), torch.from_numpy(y).flatten())
            total = loss
            if res.aux:
                total = total + cfg.aux_loss_coef * res.aux["balance_loss"] + cfg.z_loss_coef * res.aux["z_loss"]
                sums["balance_loss"] += res.aux["balance_loss"].item() / cfg.grad_accum
                sums["z_loss"] += res.aux["z_loss"].item() / cfg.grad_accum
                load = res.aux["load"] if load is None else load + res.aux["load"]
            (total / cfg.grad_accum).backward()
            sums["loss"] += loss.item() / cfg.grad_accum
        if world > 1:
            _all_reduce_grads(model, world)
            # Log the global batch's losses, not rank 0's share of it.
            logged = torch.tensor([sums["loss"], sums["balance_loss"], sums["z_loss"]])
            torch.distributed.all_reduce(logged)
            sums["loss"], sums["balance_loss"], sums["z_loss"] = (logged / world).tolist()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        dt = time.perf_counter() - t0
        bar.update(1)

        if rank == 0 and (step % cfg.log_every == 0 or step == 1):
            rec = {"step": step, "tokens": tokens_seen, "loss": sums["loss"], "ppl": perplexity(sums["loss"]),
                   "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt,
                   "balance_loss": sums["balance_loss"] if load is not None else None,
                   "z_loss": sums["z_loss"] if load is not None else None, "elapsed_s": elapsed()}
            if load is not None:
                rec["expert_load"] = (load.float() / load.sum(-1, keepdim=True)).tolist()
            logs.write("train", rec)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", refresh=False)

        at_end = step >= cfg.max_steps
        if step % cfg.eval_every == 0 or at_end:
            val = evaluate(model, val_tokens, byte_len, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
            improved = val["loss"] < best_val
            best_val = min(best_val, val["loss"])
            evals_since_best = 0 if improved else evals_since_best + 1
            if rank == 0:
                logs.write("eval", {"step": step, "tokens": tokens_seen, "val_loss": val["loss"], "val_ppl": val["ppl"],
                                    "val_bpb": val["bpb"], "best_val_loss": best_val, "elapsed_s": elapsed()})
                bar.set_postfix(loss=f"{sums['loss']:.3f}", val_bpb=f"{val['bpb']:.3f}", refresh=False)
                if improved:
                    save_checkpoint(out / "best.pt", checkpoint_payload())
            if cfg.patience is not None and evals_since_best >= cfg.patience:
                stop_reason = "early_stopping"
                if rank == 0:
                    save_checkpoint(last_path, checkpoint_payload())
                break
        if rank == 0 and (step % save_every == 0 or at_end):
            save_checkpoint(last_path, checkpoint_payload())
    bar.close()

    if rank == 0 and (val is None or not (out / "best.pt").exists()):
        # Budget ran out before the first eval: evaluate now so the run has a best.pt.
        val = evaluate(model, val_tokens, byte_len, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        best_val = min(best_val, val["loss"])
        save_checkpoint(out / "best.pt", checkpoint_payload())
    if rank == 0:
        save_checkpoint(last_path, checkpoint_payload())
    summary = None
    if rank == 0:
        summary = _summarise(cfg, model_cfg, params, out, data, byte_len, step, tokens_seen, elapsed(), stop_reason)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def _summarise(cfg, model_cfg, params, out, data, byte_len, step, tokens_seen, elapsed_s, stop_reason) -> dict:
    """Final evaluation of best.pt on the whole validation and test splits; summary.json."""
    from itera_runtime.provenance import provenance

    best = build_model(model_cfg)
    best.load_state_dict(load_checkpoint(out / "best.pt")["model"])
    full = {s: evaluate(best, data.split(s), byte_len, cfg.batch_size, cfg.seq_len, cfg.final_eval_batches)
            for s in ("val", "test")}
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    speeds = [r["tokens_per_s"] for r in records if r["kind"] == "train"]
    speeds = speeds[5:] or speeds  # skip warm-up steps when there are enough
    summary = {
        "model": model_cfg.family, "preset": cfg.preset, "data": cfg.data, "vocab_size": data.vocab_size,
        "params": params, "steps": step, "tokens_seen": tokens_seen, "elapsed_s": elapsed_s,
        "stop_reason": stop_reason,
        "train_tokens_per_s": float(np.median(speeds)) if speeds else None,
        "best": {"val_loss": full["val"]["loss"], "val_ppl": full["val"]["ppl"], "val_bpb": full["val"]["bpb"],
                 "test_loss": full["test"]["loss"], "test_ppl": full["test"]["ppl"], "test_bpb": full["test"]["bpb"]},
        "eval_tokens": {"val": full["val"]["tokens"], "test": full["test"]["tokens"]},
        "train_config": dataclasses.asdict(cfg), "model_config": config_to_dict(model_cfg),
        "provenance": provenance(torch.get_num_threads()),
    }
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    return summary
