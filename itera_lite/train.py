"""Training loop for both families: AdamW, warm-up + cosine over the budget, clipping,
accumulation, early stopping, step/token/time budgets, atomic checkpoints and exact resume.

One `RunState` is what a checkpoint holds and what a resume restores: the configs, the
tokenizer, the weights and optimizer, the position (step, tokens, elapsed time), the
schedule's progress and the early-stopping record. Nothing else carries over.

Exact resume without storing data-loader state: the batch of step s is a pure function of
(seed, s, rank) (see `itera_lite.data.get_batch`), and the learning rate is a pure function
of the config and the saved budget fraction, so a run resumed from `last.pt` at step s
sees exactly the batches and rates an uninterrupted run would have seen after s.

Data parallel: torch's DistributedDataParallel (gloo on CPU), launched by `torchrun` or
`accelerate launch` (they set RANK/WORLD_SIZE); each process takes its own rows of the
global batch. Rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import get_batch, prepare_data
from .distill import DistillError, Teacher, distill_loss, teacher_path
from .evaluation import evaluate, perplexity, token_byte_lengths
from .models import build_model, config_from_dict, config_to_dict, count_params, make_config
from itera_runtime.errors import UserError
from itera_runtime.owned import FolderLock, NotOursError


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
    tensorboard: bool = False  # event files in OUT/tensorboard beside the CSVs
    # Distillation (itera_lite.distill): the teacher's checkpoint, resolved to an absolute
    # file path when the run starts; the weight of the labels' cross-entropy (the KL gets
    # 1 - alpha) and the softening temperature.
    teacher: str | None = None
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0

    def check(self) -> None:
        """Refuse values no run can use, in one line each (click checks the CLI's ranges too)."""
        positive = {"lr": self.lr, "grad_clip": self.grad_clip, "max_minutes": self.max_minutes}
        for name, value in positive.items():
            if value is not None and not (math.isfinite(value) and value > 0):
                raise TrainError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise TrainError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            raise TrainError(f"--distill-temperature must be a finite number > 0, got {self.distill_temperature}")
        if not 0 <= self.distill_alpha <= 1:
            raise TrainError(f"--distill-alpha must be within [0, 1], got {self.distill_alpha}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainError(f"min_lr_ratio must be within [0, 1], got {self.min_lr_ratio}")
        for name in ("max_steps", "max_tokens", "seq_len", "batch_size", "grad_accum", "eval_every",
                     "eval_batches", "log_every", "save_every", "patience", "final_eval_batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise TrainError("--tensorboard needs the tensorboard extra: pip install 'itera-lite[tensorboard]'")
        if self.threads is not None:
            from itera_runtime.options import check_threads

            try:
                check_threads(self.threads)
            except ValueError as e:
                raise TrainError(f"--threads: {e}") from None


# What a resumed run may change when given again on its command line: budgets and how it
# reports. Everything else (model, data, seed, optimiser, schedule shape) is the run itself.
RESUME_MAY_CHANGE = frozenset({"max_steps", "max_minutes", "max_tokens", "patience", "threads", "save_every",
                               "log_every", "final_eval_batches", "tensorboard"})


class TrainError(UserError):
    """A problem the user can fix (bad arguments, existing run); one line."""


# ---------------------------------------------------------------------------------------


# With a time budget, training stops at (1 - CLOSING_SHARE) of it: the rest is for the closing
# evaluation of best.pt on val and test (as many windows as fit), so a run ends near its budget.
CLOSING_SHARE = 0.1
# With a time or token budget, warm-up ends by this share of it, whatever --warmup-steps says:
# steps are slow on a small CPU, and 100 of them can outlast a short budget.
WARMUP_MAX_SHARE = 0.1


def training_seconds(cfg: TrainConfig) -> float | None:
    """The part of a --max-minutes budget training may use (None: no time budget)."""
    return None if cfg.max_minutes is None else cfg.max_minutes * 60 * (1 - CLOSING_SHARE)


def _time_or_token_fraction(cfg: TrainConfig, tokens_seen: int, elapsed_s: float) -> float | None:
    used = []
    if cfg.max_tokens is not None:
        used.append(tokens_seen / cfg.max_tokens)
    if cfg.max_minutes is not None:
        used.append(elapsed_s / training_seconds(cfg))
    return max(used) if used else None


def budget_fraction(cfg: TrainConfig, step: int, tokens_seen: int, elapsed_s: float) -> float:
    """How much of the run's budget is used: the largest of steps, tokens and time (0..1)."""
    other = _time_or_token_fraction(cfg, tokens_seen, elapsed_s)
    return min(1.0, max(step / cfg.max_steps, other or 0.0))


def warmup_progress(cfg: TrainConfig, step: int, tokens_seen: int, elapsed_s: float) -> float:
    """How far warm-up is (0..1): step + 1 of warmup_steps, or WARMUP_MAX_SHARE of a time or token budget."""
    ramp = (step + 1) / max(1, cfg.warmup_steps)
    other = _time_or_token_fraction(cfg, tokens_seen, elapsed_s)
    if other is not None:
        ramp = max(ramp, other / WARMUP_MAX_SHARE)
    return min(1.0, ramp)


def warmup_over(cfg: TrainConfig, step: int, tokens_seen: int, elapsed_s: float) -> bool:
    """Whether the cosine starts now: warmup_steps done, or the warm-up's share of a time or token budget."""
    other = _time_or_token_fraction(cfg, tokens_seen, elapsed_s)
    return step >= cfg.warmup_steps or (other is not None and other >= WARMUP_MAX_SHARE)


def lr_at(cfg: TrainConfig, step: int, fraction: float, warmup_end_fraction: float | None,
          warmup: float | None = None) -> float:
    """Linear warm-up (`warmup`: its progress, default step + 1 of warmup_steps), then cosine from lr
    to min_lr_ratio * lr as the budget fraction goes from where warm-up ended to 1, whichever
    budget (steps, tokens, time) ends the run. With only a step budget this is the usual
    step-based cosine."""
    if warmup_end_fraction is None:
        return cfg.lr * (min(1.0, (step + 1) / max(1, cfg.warmup_steps)) if warmup is None else warmup)
    progress = (fraction - warmup_end_fraction) / max(1e-12, 1.0 - warmup_end_fraction)
    progress = min(1.0, max(0.0, progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, embeddings and the SSM's per-head scalars."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------- run state


@dataclass
class RunState:
    """A run: what `last.pt`/`best.pt` hold and what `--resume` restores, nothing more."""

    cfg: TrainConfig
    model_cfg: object
    tokenizer_json: str
    data_meta: dict
    validation_sample: dict  # a few held-out ids and their text, for export validation
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    # Where warm-up ended (step, tokens, elapsed_s): the cosine runs from there to the end of
    # the budget, measured against the current budgets (a resume may extend them).
    warmup_end: list | None = None
    best_val_loss: float = math.inf
    evals_since_best: int = 0
    last_eval_step: int | None = None
    val: dict | None = None  # the last evaluation
    params: dict = field(default_factory=dict)
    teacher: dict | None = None  # Teacher.describe() of a distilled run

    def fraction(self) -> float:
        return budget_fraction(self.cfg, self.step, self.tokens_seen, self.elapsed_s)

    def warmup_end_fraction(self) -> float | None:
        return None if self.warmup_end is None else budget_fraction(self.cfg, *self.warmup_end)

    def lr(self) -> float:
        return lr_at(self.cfg, self.step, self.fraction(), self.warmup_end_fraction(),
                     warmup_progress(self.cfg, self.step, self.tokens_seen, self.elapsed_s))

    def to_checkpoint(self) -> dict:
        """The checkpoint payload (configs, tokenizer, weights, optimizer, position)."""
        return {
            "model_config": config_to_dict(self.model_cfg), "train_config": dataclasses.asdict(self.cfg),
            "tokenizer_json": self.tokenizer_json, "data_meta": self.data_meta,
            "validation_sample": self.validation_sample,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state()}, "step": self.step, "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_s,
            "schedule": {"fraction": self.fraction(), "warmup_end": self.warmup_end,
                         "warmup_end_fraction": self.warmup_end_fraction()},
            "best_val_loss": self.best_val_loss, "evals_since_best": self.evals_since_best,
            "last_eval_step": self.last_eval_step, "metrics": {"val": self.val, "params": self.params},
            "teacher": self.teacher,
        }

    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint written by `to_checkpoint`."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.step, self.tokens_seen, self.elapsed_s = ckpt["step"], ckpt["tokens_seen"], ckpt["elapsed_s"]
        self.best_val_loss, self.evals_since_best = ckpt["best_val_loss"], ckpt["evals_since_best"]
        schedule = ckpt.get("schedule") or {}
        self.warmup_end = schedule.get("warmup_end")
        if self.warmup_end is None and self.step >= self.cfg.warmup_steps:
            # A checkpoint from before budget-fraction schedules: its cosine was step-based.
            self.warmup_end = [self.cfg.warmup_steps, 0, 0.0]
        self.last_eval_step = ckpt.get("last_eval_step", self.step)
        self.val = (ckpt.get("metrics") or {}).get("val")


# ------------------------------------------------------------------------------ run folder

# Names a run folder of ours holds. A folder holding anything else is the user's.
RUN_MARKER = ".itera-train"
RUN_LOCK = ".itera-train.lock"  # pid and host of the process writing the run (runtime/owned.py FolderLock)
RUN_FILES = ("best.pt", "last.pt", "metrics.jsonl", "train.csv", "eval.csv", "summary.json", RUN_MARKER)
RUN_DIRS = ("tensorboard",)
# Temp files of our own atomic writes (checkpoint.save_checkpoint, summary.json): a kill
# mid-write leaves them; the next run into the folder removes them.
STALE_TEMP = re.compile(r"^(\.(best|last)\.pt\..+\.tmp|summary\.json\.tmp)$")


def _claim_run_folder(out: Path, resume: bool) -> tuple[bool, FolderLock]:
    """Check `out` may hold this run, take its lock, clean our stale temp files; (True if we created it, lock)."""
    last = out / "last.pt"
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder")
    if resume:
        if not last.exists():
            raise TrainError(f"{last}: nothing to resume (no last.pt in --out)")
    elif last.exists():
        raise TrainError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    created = not out.exists()
    if not created:
        entries = [p for p in out.iterdir() if not STALE_TEMP.match(p.name) and p.name != RUN_LOCK]
        if entries and not resume and not (out / RUN_MARKER).exists():
            names = ", ".join(sorted(p.name for p in entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise TrainError(f"--out {out} is not empty and is not an itera-train run (holds {names}); "
                             "choose a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(out / RUN_LOCK, "itera-train")
        lock.acquire(log=lambda m: print(m, file=sys.stderr))
    except NotOursError as e:
        raise TrainError(str(e)) from None
    except OSError as e:
        raise TrainError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    if not resume and last.exists():  # another run wrote its first checkpoint while we looked
        lock.release()
        raise TrainError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    for p in out.iterdir():
        if STALE_TEMP.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
    if not resume and not created:
        # A run of ours killed before its first checkpoint: start it over from nothing.
        _remove_run_files(out, created=False)
    return created, lock


def _remove_run_files(out: Path, created: bool) -> None:
    """Undo a run that never took a step: only the files we write, and the folder if ours."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()


# ---------------------------------------------------------------------------------- logs


class _Logs:
    """metrics.jsonl (every record) + train.csv / eval.csv (fixed columns), rank 0 only;
    TensorBoard event files in OUT/tensorboard when asked (the CSVs stay the record)."""

    # loss is the cross-entropy on the labels in every run; a distilled run adds the KL to the
    # teacher (at the temperature, before T²), the objective it minimised and the teacher's
    # seconds per step.
    TRAIN_COLS = ["step", "tokens", "loss", "ppl", "lr", "grad_norm", "tokens_per_s", "balance_loss",
                  "z_loss", "kl", "distill_loss", "teacher_s", "elapsed_s"]
    EVAL_COLS = ["step", "tokens", "val_loss", "val_ppl", "val_bpb", "best_val_loss", "elapsed_s"]

    def __init__(self, out: Path, resume_step: int | None, tensorboard: bool):
        self.out = out
        if resume_step is not None:
            self._truncate(resume_step)
        else:
            for name in ("metrics.jsonl", "train.csv", "eval.csv"):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
        self.tb = None
        if tensorboard:  # TrainConfig.check made sure the package is there
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged past its last checkpoint.
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=(resume_step + 1) if resume_step else None)

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
        if self.tb is not None:
            for col in cols[2:]:
                if isinstance(rec.get(col), (int, float)):
                    self.tb.add_scalar(f"{kind}/{col}", rec[col], rec["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------- data parallel


def _dist_setup():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def params_sha256(model: torch.nn.Module) -> str:
    """Digest of every parameter's bytes: equal on all ranks when they trained in sync."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode() + p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- settings


def resolve_config(cfg: TrainConfig, saved: dict, given: set[str]) -> TrainConfig:
    """The resumed run's config: its own settings, with budgets changed only where given.

    A setting given again with the value the run already has is fine; a different one is
    refused, since the run would silently stop being the run it was.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    run = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    conflicts = []
    for name in sorted(given - RESUME_MAY_CHANGE - {"out"}):
        new, old = getattr(cfg, name), getattr(run, name)
        if name == "data" and new != old and os.path.abspath(os.path.expanduser(new)) == os.path.abspath(
                os.path.expanduser(old)):
            continue
        if new != old:
            conflicts.append(f"--{name.replace('_', '-')} {new} (run has {old})")
    if conflicts:
        raise TrainError(f"{cfg.out} was started with other settings; --resume cannot change "
                         f"{', '.join(conflicts)}: leave them out or train into a new --out")
    return dataclasses.replace(run, out=cfg.out, **{k: getattr(cfg, k) for k in given & RESUME_MAY_CHANGE})


def _given_by_default(cfg: TrainConfig) -> set[str]:
    """For Python callers: the settings that differ from TrainConfig's defaults."""
    default = TrainConfig()
    return {f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) != getattr(default, f.name)}


def _check_splits(cfg: TrainConfig, data) -> None:
    for split in ("train", "val", "test"):
        n = data.n_tokens(split)
        if n < cfg.seq_len + 1:
            raise TrainError(f"--data {cfg.data}: the {split} split has {n} tokens, too few for one window "
                             f"of --seq-len {cfg.seq_len} (needs {cfg.seq_len + 1}); give more text or a "
                             "shorter --seq-len")


def _load_teacher(cfg: TrainConfig, data, ckpt: dict | None) -> Teacher | None:
    """The run's teacher, checked against the data's tokenizer and, on resume, against the
    weights the run started with."""
    if cfg.teacher is None:
        return None
    try:
        teacher = Teacher.load(cfg.teacher, data.tokenizer_json, data.vocab_size)
    except DistillError as e:
        raise TrainError(str(e)) from None
    saved = (ckpt or {}).get("teacher") or {}
    if saved.get("sha256") not in (None, teacher.sha256):
        raise TrainError(f"--teacher {cfg.teacher} has changed since this run started (sha256 "
                         f"{teacher.sha256[:12]}, run has {saved['sha256'][:12]}); train into a new --out")
    return teacher


def validation_sample(cfg: TrainConfig, data, n: int = 256) -> dict:
    """The first n ids of the test split and their text, for the exporter's parity check."""
    ids = np.asarray(data.split("test")[:n], dtype=np.int64).tolist()
    return {"ids": ids, "text": data.tokenizer.decode(ids),
            "source": f"first {len(ids)} tokens of the test split of --data {cfg.data}"}


# ------------------------------------------------------------------------------- train


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, given: set[str] | None = None) -> dict:
    """Run (or resume) a training run; returns the summary also written to summary.json.

    given: the settings the user gave (on resume only those may differ from the saved run,
    and only budgets may change). None: those that differ from TrainConfig's defaults.
    """
    from tqdm import tqdm

    given = _given_by_default(cfg) if given is None else set(given)
    if cfg.teacher is not None:
        try:  # an absolute file path, so a resume compares (and finds) the same file
            cfg = dataclasses.replace(cfg, teacher=str(teacher_path(cfg.teacher)))
        except DistillError as e:
            raise TrainError(str(e)) from None
        if Path(cfg.teacher).parent == Path(cfg.out).resolve():
            raise TrainError(f"--teacher {cfg.teacher} is a checkpoint of this run's own --out, which the run "
                             "overwrites; copy it elsewhere first")
    rank, world = _dist_setup()
    out = Path(cfg.out)
    last_path = out / "last.pt"
    ckpt = None
    if resume:
        if not last_path.exists():
            raise TrainError(f"{last_path}: nothing to resume (no last.pt in --out)")
        ckpt = load_checkpoint(last_path)
        cfg = resolve_config(cfg, ckpt.get("train_config", {}), given)
    cfg.check()
    if cfg.teacher is None and given & {"distill_alpha", "distill_temperature"}:
        raise TrainError("--distill-alpha and --distill-temperature need --teacher")
    if cfg.batch_size % world:
        raise TrainError(f"--batch-size {cfg.batch_size} must divide by the {world} processes")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    created, error, lock = False, None, None
    if rank == 0:
        try:
            # Before any work: refuse early, write nothing but our lock (one writer per run folder).
            created, lock = _claim_run_folder(out, resume)
            data = prepare_data(cfg.data, cfg.vocab_size, progress=progress)
            _check_splits(cfg, data)
            teacher = _load_teacher(cfg, data, ckpt)
            try:
                (out / RUN_MARKER).write_text(json.dumps({"tool": "itera-train"}) + "\n")
            except OSError as e:
                raise TrainError(f"--out {out}: cannot write there ({e.strerror or e})") from None
        except BaseException as e:  # any refusal before work (or a bug): our lock and folder go again
            if lock is not None:  # undo only what this run did: its lock, and the folder if it made it
                lock.release()
                lock = None
                if created:
                    with contextlib.suppress(OSError):
                        out.rmdir()
            if not isinstance(e, UserError):
                raise  # a bug keeps its traceback
            error = e  # raised below, after the other ranks are told
    try:
        if world > 1:
            # Rank 0 prepares the data and the folder; the others wait, and stop if it failed.
            failed = [None if error is None else str(error)]
            torch.distributed.broadcast_object_list(failed, 0)
            if failed[0] is not None and rank != 0:
                raise TrainError(f"rank 0 failed: {failed[0]}")
        if error is not None:
            raise error
        if rank != 0:
            data = prepare_data(cfg.data, cfg.vocab_size, progress=False)
            teacher = _load_teacher(cfg, data, ckpt)
        if ckpt is not None and ckpt["tokenizer_json"] != data.tokenizer_json:
            raise CheckpointError(f"{last_path}: the data's tokenizer differs from the checkpoint's; same --data?")

        torch.manual_seed(cfg.seed)
        model_cfg = (config_from_dict(ckpt["model_config"]) if ckpt
                     else make_config(cfg.model, cfg.preset, vocab_size=data.vocab_size))
        model = build_model(model_cfg)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                      betas=(cfg.beta1, cfg.beta2), fused=False)
        state = RunState(cfg, model_cfg, data.tokenizer_json, data.meta, validation_sample(cfg, data), model, optimizer,
                         params=count_params(model), teacher=teacher and teacher.describe())
        if ckpt:
            state.restore(ckpt)
        model.train()
        # Experts that get no tokens on a rank have no gradient there: DDP must not wait for them.
        ddp = (torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model)

        train_tokens, val_tokens = data.split("train"), data.split("val")
        byte_len = token_byte_lengths(data.tokenizer_json)
        logs = _Logs(out, state.step if ckpt else None, cfg.tensorboard) if rank == 0 else None
        save_every = cfg.save_every or cfg.eval_every
        rows_per_rank = cfg.batch_size // world
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        start_step, saved_step = state.step, state.step
        t_start, elapsed0 = time.perf_counter(), state.elapsed_s
        # Where a time budget ends on this clock: the closing evaluations take what is left of it.
        budget_end = None if cfg.max_minutes is None else t_start + cfg.max_minutes * 60 - elapsed0
        stop_reason = "max_steps"

        def tick():
            state.elapsed_s = elapsed0 + time.perf_counter() - t_start

        def save(path: Path):
            nonlocal saved_step
            tick()
            save_checkpoint(path, state.to_checkpoint())
            if path == last_path:
                saved_step = state.step

        def run_eval(deadline: float | None = None, desc: str | None = None):
            state.val = evaluate(model, val_tokens, byte_len, cfg.batch_size, cfg.seq_len, cfg.eval_batches,
                                 deadline=deadline, progress=desc)
            state.last_eval_step = state.step
            improved = state.val["loss"] < state.best_val_loss
            state.best_val_loss = min(state.best_val_loss, state.val["loss"])
            state.evals_since_best = 0 if improved else state.evals_since_best + 1
            if rank == 0:
                tick()
                logs.write("eval", {"step": state.step, "tokens": state.tokens_seen, "val_loss": state.val["loss"],
                                    "val_ppl": state.val["ppl"], "val_bpb": state.val["bpb"],
                                    "best_val_loss": state.best_val_loss, "elapsed_s": state.elapsed_s})
                bar.set_postfix(val_bpb=f"{state.val['bpb']:.3f}", refresh=False)
                # best.pt only ever holds the best model seen: never a worse one after a resume.
                if improved:
                    save(out / "best.pt")

        bar = tqdm(total=cfg.max_steps, initial=state.step, desc=f"train {model_cfg.family}-{cfg.preset}",
                   disable=not progress or rank != 0, file=sys.stderr, dynamic_ncols=True)
        try:
            while True:
                tick()
                if world > 1:
                    # Ranks measure time apart: rank 0's clock decides the budget and the rate.
                    clock = torch.tensor([state.elapsed_s], dtype=torch.float64)
                    torch.distributed.broadcast(clock, 0)
                    state.elapsed_s = float(clock)
                if state.step >= cfg.max_steps:
                    stop_reason = "max_steps"
                    break
                if cfg.max_minutes is not None and state.elapsed_s >= training_seconds(cfg):
                    stop_reason = "max_minutes"  # the rest of the budget is the closing evaluation's
                    break
                if cfg.max_tokens is not None and state.tokens_seen >= cfg.max_tokens:
                    stop_reason = "max_tokens"
                    break
                if cfg.patience is not None and state.evals_since_best >= cfg.patience:
                    stop_reason = "early_stopping"
                    break
                if state.warmup_end is None and warmup_over(cfg, state.step, state.tokens_seen, state.elapsed_s):
                    state.warmup_end = [state.step, state.tokens_seen, state.elapsed_s]
                lr = state.lr()
                for group in optimizer.param_groups:
                    group["lr"] = lr
                t0 = time.perf_counter()
                sums = {"loss": 0.0, "balance_loss": 0.0, "z_loss": 0.0, "kl": 0.0, "distill_loss": 0.0}
                teacher_s = 0.0
                load = None
                for micro in range(cfg.grad_accum):
                    x, y = get_batch(train_tokens, state.step * cfg.grad_accum + micro, rows_per_rank, cfg.seq_len,
                                     cfg.seed, rank=rank, world_size=world)
                    # Gradients are averaged across ranks once per step, on the last micro-batch.
                    sync = contextlib.nullcontext() if world == 1 or micro == cfg.grad_accum - 1 else ddp.no_sync()
                    with sync:
                        x_t = torch.from_numpy(x)
                        teacher_logits = None
                        if teacher is not None:
                            t_teacher = time.perf_counter()
                            teacher_logits = teacher.logits(x_t)  # (B, L, V), no graph
                            teacher_s += time.perf_counter() - t_teacher
                        res = ddp(x_t)
                        total, loss, kl = distill_loss(res.logits, teacher_logits, torch.from_numpy(y),
                                                       cfg.distill_alpha, cfg.distill_temperature)
                        if kl is not None:
                            sums["kl"] += kl.item() / cfg.grad_accum
                            sums["distill_loss"] += total.item() / cfg.grad_accum
                        if res.aux:
                            total = (total + cfg.aux_loss_coef * res.aux["balance_loss"]
                                     + cfg.z_loss_coef * res.aux["z_loss"])
                            sums["balance_loss"] += res.aux["balance_loss"].item() / cfg.grad_accum
                            sums["z_loss"] += res.aux["z_loss"].item() / cfg.grad_accum
                            load = res.aux["load"] if load is None else load + res.aux["load"]
                        (total / cfg.grad_accum).backward()
                    sums["loss"] += loss.item() / cfg.grad_accum
                if world > 1:
                    # Log the global batch's losses and expert load, not rank 0's share of them.
                    names = list(sums)
                    logged = torch.tensor([sums[k] for k in names])
                    torch.distributed.all_reduce(logged)
                    sums = dict(zip(names, (logged / world).tolist()))
                    if load is not None:
                        load = load.clone()
                        torch.distributed.all_reduce(load)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.tokens_seen += tokens_per_step
                dt = time.perf_counter() - t0
                bar.update(1)

                if rank == 0 and (state.step % cfg.log_every == 0 or state.step == 1):
                    tick()
                    rec = {"step": state.step, "tokens": state.tokens_seen, "loss": sums["loss"],
                           "ppl": perplexity(sums["loss"]), "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": tokens_per_step / dt,
                           "balance_loss": sums["balance_loss"] if load is not None else None,
                           "z_loss": sums["z_loss"] if load is not None else None,
                           "kl": sums["kl"] if teacher is not None else None,
                           "distill_loss": sums["distill_loss"] if teacher is not None else None,
                           "teacher_s": teacher_s if teacher is not None else None, "elapsed_s": state.elapsed_s}
                    if load is not None:
                        rec["expert_load"] = (load.float() / load.sum(-1, keepdim=True)).tolist()  # (layers, E)
                    logs.write("train", rec)
                    bar.set_postfix(loss=f"{sums['loss']:.3f}", refresh=False)

                if state.step % cfg.eval_every == 0 or state.step >= cfg.max_steps:
                    run_eval()
                if rank == 0 and state.step % save_every == 0:
                    save(last_path)
        finally:
            bar.close()

        if state.step == 0:
            # Nothing trained: leave nothing behind, not even a folder that now "holds a run".
            if rank == 0:
                logs.close()
                lock.release()  # first: the folder can only go once its lock file has
                _remove_run_files(out, created)
            raise TrainError(f"the budget ran out before the first training step ({stop_reason}); nothing written")
        if state.last_eval_step != state.step and stop_reason != "early_stopping":
            # A time or token budget ended between evals: evaluate the model the run ends with (with a
            # time budget, on what fits half of the time left: best.pt's evaluation needs the rest).
            now = time.perf_counter()
            run_eval(None if budget_end is None else now + max(0.0, budget_end - now) / 2,
                     "closing eval" if progress and rank == 0 else None)
        if rank == 0 and saved_step != state.step:
            save(last_path)
        ranks = None
        if world > 1:
            digests = [None] * world
            torch.distributed.all_gather_object(digests, params_sha256(model))
            ranks = {"world_size": world, "params_sha256": digests, "in_sync": len(set(digests)) == 1}
        summary = None
        if rank == 0:
            logs.close()
            summary = _summarise(state, out, data, byte_len, stop_reason, ranks,
                                 resumed_spent=resume and state.step == start_step, deadline=budget_end,
                                 progress=progress)
        if world > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return summary
    finally:
        if lock is not None:
            lock.release()


# ------------------------------------------------------------------------------ summary

# An expert with less than this share of its uniform share (1/E) of tokens is underused; a
# layer where no more than top_k experts are above it has a collapsed router.
UNDERUSED_SHARE = 0.25


def expert_utilisation(load: torch.Tensor, top_k: int) -> dict:
    """Per layer: share of routed tokens per expert, underused experts; collapsed routers."""
    share = (load.double() / load.sum(-1, keepdim=True).clamp(min=1)).tolist()  # (layers, E)
    n_experts = load.shape[-1]
    threshold = UNDERUSED_SHARE / n_experts
    layers = []
    for i, row in enumerate(share):
        underused = [e for e, s in enumerate(row) if s < threshold]
        layers.append({"layer": i, "share": row, "underused": underused,
                       "collapsed": n_experts - len(underused) <= top_k})
    collapsed = [ly["layer"] for ly in layers if ly["collapsed"]]
    return {"threshold": threshold, "layers": layers, "collapsed_layers": collapsed, "collapsed": bool(collapsed)}


def _distillation_summary(state: RunState, records: list[dict]) -> dict | None:
    """The teacher (path, sha256, size), the loss weights, and the teacher's share of a step."""
    if state.teacher is None:
        return None
    rows = [r for r in records if r["kind"] == "train" and r.get("teacher_s") is not None]
    rows = rows[5:] or rows  # skip warm-up steps when there are enough
    tokens_per_step = state.cfg.batch_size * state.cfg.seq_len * state.cfg.grad_accum
    teacher_s = float(np.median([r["teacher_s"] for r in rows])) if rows else None
    step_s = float(np.median([tokens_per_step / r["tokens_per_s"] for r in rows])) if rows else None
    return {"teacher": state.teacher, "alpha": state.cfg.distill_alpha, "temperature": state.cfg.distill_temperature,
            "median_teacher_s_per_step": teacher_s, "median_step_s": step_s,
            "teacher_share_of_step": teacher_s / step_s if rows else None}


def _summarise(state: RunState, out, data, byte_len, stop_reason, ranks, resumed_spent,
               deadline: float | None = None, progress: bool = False) -> dict:
    """Final evaluation of best.pt on the validation and test splits; summary.json.

    Whole splits (or --final-eval-batches), unless the run has a time budget: then as many
    windows from each split's start as fit what is left of it (`deadline`, a perf_counter
    time; at least one batch each), said in the summary's "final_eval".
    """
    from itera_runtime.provenance import provenance

    cfg, model_cfg = state.cfg, state.model_cfg
    best = build_model(model_cfg)
    best.load_state_dict(load_checkpoint(out / "best.pt")["model"])
    load = None
    if model_cfg.family == "itera":
        load = torch.zeros(model_cfg.n_layers, model_cfg.n_experts, dtype=torch.long)

        def count(module, inputs, output):
            nonlocal load
            if output.aux:
                load += output.aux["load"]

        hook = best.register_forward_hook(count)
    started = time.perf_counter()
    left = None if deadline is None else max(0.0, deadline - started)
    if progress:
        what = ("whole splits" if cfg.final_eval_batches is None else f"first {cfg.final_eval_batches} batches of each")
        if left is not None:
            what = f"as much of each as fits the {left:.0f} s left of --max-minutes"
        print(f"evaluating best.pt on the validation and test splits ({what})", file=sys.stderr)
    full = {}
    for i, s in enumerate(("val", "test")):
        split_deadline = None
        if deadline is not None:  # val gets half of what is left, test the rest
            now = time.perf_counter()
            split_deadline = now + max(0.0, deadline - now) / (2 - i)
        full[s] = evaluate(best, data.split(s), byte_len, cfg.batch_size, cfg.seq_len, cfg.final_eval_batches,
                           deadline=split_deadline, progress=f"final eval {s}" if progress else None)
        if s == "val" and load is not None:
            hook.remove()
    final_eval = {"bounded_by": None if deadline is None else "max_minutes",
                  "seconds_left": None if left is None else round(left, 2),
                  "seconds": round(time.perf_counter() - started, 2),
                  **{s: {"windows": full[s]["windows"], "windows_in_split": full[s]["windows_in_split"],
                         "complete": full[s]["complete"], "from": "start of the split"} for s in full}}
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    speeds = [r["tokens_per_s"] for r in records if r["kind"] == "train"]
    speeds = speeds[5:] or speeds  # skip warm-up steps when there are enough
    summary = {
        "model": model_cfg.family, "preset": cfg.preset, "data": cfg.data, "vocab_size": data.vocab_size,
        "params": state.params, "steps": state.step, "tokens_seen": state.tokens_seen,
        "elapsed_s": state.elapsed_s, "stop_reason": stop_reason,
        "budget_fraction": state.fraction(),
        "train_tokens_per_s": float(np.median(speeds)) if speeds else None,
        "best": {"val_loss": full["val"]["loss"], "val_ppl": full["val"]["ppl"], "val_bpb": full["val"]["bpb"],
                 "test_loss": full["test"]["loss"], "test_ppl": full["test"]["ppl"], "test_bpb": full["test"]["bpb"]},
        "eval_tokens": {"val": full["val"]["tokens"], "test": full["test"]["tokens"]},
        "final_eval": final_eval,
        # Routing of best.pt over the validation split it was evaluated on above.
        "experts": (None if load is None else
                    {"split": "val", **expert_utilisation(load, model_cfg.top_k)}),
        "ranks": ranks,
        "distillation": _distillation_summary(state, records),
        "train_config": dataclasses.asdict(cfg), "model_config": config_to_dict(model_cfg),
        "provenance": provenance(torch.get_num_threads()),
    }
    if resumed_spent:
        summary["note"] = "resumed with its budget already spent: no step taken, best.pt unchanged"
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    return summary
