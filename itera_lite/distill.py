"""Knowledge distillation: a frozen teacher's softened next-token distribution as a second
target beside the labels (Hinton, Vinyals, Dean 2015).

    loss = α·CE(student, labels) + (1 − α)·T²·KL(softmax(teacher/T) ‖ softmax(student/T))

T² keeps the soft term's gradients on the scale of the hard term's whatever the temperature
(the softened gradients shrink as 1/T²). Teacher and student must share one tokenizer: the
KL compares distributions over the same ids.

Teacher logits are computed on the fly (teacher in eval mode, no_grad) for each training
batch rather than cached to disk (top-k per position). A cache costs one teacher pass over
the whole train split before the first step and can save at most the teacher's share of a
step, and only on tokens seen again (a second epoch, or another student of the same
teacher); it also fixes each position's context to one window, while training draws random
windows. Measured with `itera-train --teacher` (its summary's `distillation` and the
`teacher_s` column), itera tiny student, baseline tiny teacher, vocab 2048, batch 16 x 128, 2
shared cores: the teacher took 15% of a step (0.55 of 3.7 s); the 150-step run saw 0.19 of an
epoch, so building the cache (771 steps' worth of teacher forwards) would have cost about 5x
the teacher time the whole run spent. Runs here last well under an epoch: on the fly wins.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_model
from itera_runtime.errors import UserError


class DistillError(UserError):
    """A teacher that cannot teach this student; one line for the user."""


def teacher_path(spec: str | Path) -> Path:
    """The teacher's checkpoint file: a run folder means its best.pt. Absolute, so a
    resumed run finds it from any working directory."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "best.pt"
        if not path.is_file():
            raise DistillError(f"--teacher {spec}: a folder without best.pt (not a finished itera-train run)")
    elif not path.is_file():
        raise DistillError(f"--teacher {spec}: no such run folder or checkpoint file")
    return path.resolve()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def same_tokenizer(a_json: str, b_json: str) -> bool:
    """Whether two tokenizers are the same by content (vocabulary, merges, pre-tokenizer),
    whatever the JSON's spacing or key order."""
    try:
        return json.loads(a_json) == json.loads(b_json)
    except ValueError:
        return False


@dataclass
class Teacher:
    """A frozen model whose logits the student learns from."""

    path: Path
    sha256: str
    model: torch.nn.Module

    @classmethod
    def load(cls, spec: str | Path, tokenizer_json: str, vocab_size: int) -> Teacher:
        """Load the teacher and check it shares the student's tokenizer."""
        path = teacher_path(spec)
        try:
            model, ckpt = load_model(path)
        except CheckpointError as e:
            raise DistillError(f"--teacher: {e}") from None
        if not same_tokenizer(ckpt["tokenizer_json"], tokenizer_json):
            their = json.loads(ckpt["tokenizer_json"]).get("model", {}).get("vocab", {})
            raise DistillError(f"--teacher {path}: its tokenizer ({len(their)} tokens) differs from the student's "
                               f"({vocab_size} tokens); train both on the same --data and --vocab-size")
        if model.config.vocab_size != vocab_size:
            raise DistillError(f"--teacher {path}: its vocab_size {model.config.vocab_size} differs from the "
                               f"student's {vocab_size}")
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(path, file_sha256(path), model.eval())

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, V) float logits."""
        return self.model(x).logits.float()

    def describe(self) -> dict:
        """What a summary records about the teacher."""
        cfg = self.model.config
        return {"path": str(self.path), "sha256": self.sha256, "model": cfg.family,
                "params": sum(p.numel() for p in self.model.parameters()),
                "d_model": cfg.d_model, "n_layers": cfg.n_layers}


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                 alpha: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(objective, cross-entropy, KL) per token, in nats.

    student_logits, teacher_logits: (B, L, V); targets: (B, L). Without a teacher the
    objective is the cross-entropy and KL is None. KL is KL(teacher ‖ student) at the
    temperature, before the T² factor.
    """
    logits = student_logits.flatten(0, 1).float()  # (B·L, V)
    ce = F.cross_entropy(logits, targets.flatten())
    if teacher_logits is None:
        return ce, ce, None
    student_log_p = F.log_softmax(logits / temperature, dim=-1)
    teacher_log_p = F.log_softmax(teacher_logits.flatten(0, 1).float() / temperature, dim=-1)
    kl = F.kl_div(student_log_p, teacher_log_p, log_target=True, reduction="batchmean")  # mean over tokens
    return alpha * ce + (1 - alpha) * temperature ** 2 * kl, ce, kl
