"""itera-train --teacher: the distillation loss, its checks, and a distilled run that resumes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from itera_lite.checkpoint import save_checkpoint
from itera_lite.data import get_batch, prepare_data, train_tokenizer
from itera_lite.distill import distill_loss, file_sha256
from itera_lite.models import build_model, make_config
from itera_lite.models.config import config_to_dict

SEED = 1337
FAST = ["--model", "itera", "--vocab-size", "256", "--seq-len", "64", "--batch-size", "8", "--threads", "1",
        "--warmup-steps", "5", "--eval-batches", "2", "--final-eval-batches", "4", "--seed", str(SEED), "--quiet"]


def run_train(*args) -> subprocess.CompletedProcess:
    """itera-train in this process (tests/clirun.py): the same exit code and stderr lines."""
    from clirun import invoke

    from itera_lite.cli import main

    return invoke(main, *args)


def train_rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def byte_data():
    return prepare_data("shakespeare", 256)


@pytest.fixture(scope="module")
def student_init(tmp_path_factory, byte_data) -> Path:
    """A checkpoint of the weights itera-train starts FAST's student from (seed, then build)."""
    torch.manual_seed(SEED)
    cfg = make_config("itera", "tiny", vocab_size=byte_data.vocab_size)
    path = tmp_path_factory.mktemp("teacher") / "init.pt"
    save_checkpoint(path, {"model_config": config_to_dict(cfg), "model": build_model(cfg).state_dict(),
                           "tokenizer_json": byte_data.tokenizer_json})
    return path


def test_kl_is_zero_and_has_no_pull_when_teacher_equals_student():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    total, ce, kl = distill_loss(logits, logits.detach(), targets, alpha=0.3, temperature=2.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    assert total.item() == pytest.approx(0.3 * ce.item(), rel=1e-6)
    # At the teacher's distribution the KL is at its minimum: its gradient vanishes.
    (kl_grad,) = torch.autograd.grad(kl, logits)
    assert kl_grad.abs().max().item() < 1e-6
    # A different teacher pulls: KL > 0, and alpha = 1 is plain cross-entropy whatever the teacher.
    other = torch.randn(2, 5, 11)
    _, _, kl_other = distill_loss(logits, other, targets, alpha=0.3, temperature=2.0)
    assert kl_other.item() > 0.01
    plain, _, _ = distill_loss(logits, other, targets, alpha=1.0, temperature=2.0)
    assert plain.item() == pytest.approx(ce.item(), rel=1e-6)


def test_a_baseline_teaches_an_itera_student(tmp_path, byte_data):
    """The interesting case: a Transformer teacher, an Itera-Lite student, one tokenizer."""
    from itera_lite.distill import Teacher

    cfg = make_config("baseline", "tiny", vocab_size=byte_data.vocab_size, n_layers=1)
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"model_config": config_to_dict(cfg), "model": build_model(cfg).state_dict(),
                           "tokenizer_json": byte_data.tokenizer_json})
    teacher = Teacher.load(tmp_path, byte_data.tokenizer_json, byte_data.vocab_size)  # the run folder
    assert teacher.path == path.resolve() and teacher.describe()["model"] == "baseline"
    x, y = get_batch(byte_data.split("train"), 0, 2, 16, SEED)
    t_logits = teacher.logits(torch.from_numpy(x))
    assert t_logits.shape == (2, 16, 256) and not t_logits.requires_grad
    student = build_model(make_config("itera", "tiny", vocab_size=256, n_layers=1))
    total, ce, kl = distill_loss(student(torch.from_numpy(x)).logits, t_logits, torch.from_numpy(y), 0.5, 2.0)
    total.backward()
    assert kl.item() > 0 and all(p.grad is not None for p in student.embed.parameters())
    assert all(p.grad is None for p in teacher.model.parameters())


def test_teacher_equal_to_the_students_initial_weights_leaves_the_loss_plain_ce(tmp_path, byte_data, student_init):
    out = tmp_path / "run"
    proc = run_train("--out", str(out), "--teacher", str(student_init), "--distill-alpha", "0.5",
                     "--max-steps", "1", "--eval-every", "1", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = train_rows(out)
    assert row["kl"] == pytest.approx(0.0, abs=1e-6)
    # The logged loss is the plain cross-entropy of the initial weights on step 0's batch.
    x, y = get_batch(byte_data.split("train"), 0, 8, 64, SEED)
    model = build_model(make_config("itera", "tiny", vocab_size=256))
    model.load_state_dict(torch.load(student_init, weights_only=True)["model"])
    logits = model(torch.from_numpy(x)).logits  # (B, L, V)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).flatten())
    assert row["loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert row["distill_loss"] == pytest.approx(0.5 * row["loss"], rel=1e-5)
    assert row["teacher_s"] > 0


def test_teacher_with_another_tokenizer_is_refused_in_one_line(tmp_path, student_init):
    tokenizer = train_tokenizer(["To be, or not to be, that is the question. " * 50], 300)
    cfg = make_config("itera", "tiny", vocab_size=tokenizer.get_vocab_size())
    teacher = tmp_path / "other.pt"
    save_checkpoint(teacher, {"model_config": config_to_dict(cfg), "model": build_model(cfg).state_dict(),
                              "tokenizer_json": tokenizer.to_str()})
    out = tmp_path / "run"
    proc = run_train("--out", str(out), "--teacher", str(teacher), "--max-steps", "1", *FAST)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --teacher") and "tokenizer" in lines[0], proc.stderr
    assert not out.exists()  # refused before anything was written
    # A run folder without best.pt, a truncated teacher, distillation options without a teacher: likewise.
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(student_init.read_bytes()[:5000])
    for args in (["--teacher", str(tmp_path)], ["--teacher", str(truncated)], ["--distill-alpha", "0.2"]):
        proc = run_train("--out", str(out), "--max-steps", "1", *args, *FAST)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert not out.exists()


@pytest.mark.slow
def test_distilled_run_trains_resumes_with_its_teacher_and_records_it(tmp_path, student_init):
    teacher = tmp_path / "teacher" / "best.pt"  # a copy this test may change; given as its run folder
    teacher.parent.mkdir()
    teacher.write_bytes(student_init.read_bytes())
    out = tmp_path / "run"
    args = ["--out", str(out), "--lr", "5e-3", "--eval-every", "5", "--save-every", "5", *FAST]
    proc = run_train(*args, "--teacher", str(teacher.parent), "--distill-alpha", "0.7",
                     "--distill-temperature", "1.5", "--max-steps", "10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Resumed without --teacher: the run keeps its teacher and its weights.
    proc = run_train(*args, "--resume", "--max-steps", "20")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"distilled from {teacher.resolve()} (alpha 0.7, temperature 1.5)" in proc.stdout
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert all(r["kl"] is not None and r["distill_loss"] is not None for r in rows)
    # The student moves away from its initial weights (the teacher): KL grows from 0 while CE falls.
    assert rows[0]["kl"] < 1e-6 < rows[-1]["kl"]
    assert np.mean([r["loss"] for r in rows[-5:]]) < rows[0]["loss"] - 0.5
    summary = json.loads((out / "summary.json").read_text())
    d = summary["distillation"]
    assert d["teacher"]["path"] == str(teacher.resolve())
    assert d["teacher"]["sha256"] == file_sha256(student_init)
    assert (d["alpha"], d["temperature"]) == (0.7, 1.5)
    assert summary["train_config"]["teacher"] == str(teacher.resolve())
    # Another teacher, or other distillation weights, on resume: refused in one line.
    other = tmp_path / "other.pt"
    other.write_bytes(student_init.read_bytes())
    for extra in (["--teacher", str(other)], ["--distill-alpha", "0.1"]):
        proc = run_train(*args, "--resume", "--max-steps", "25", *extra)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and "--resume cannot change" in lines[0], proc.stderr
    # The teacher's weights changed under the run: refused too.
    ckpt = torch.load(teacher, weights_only=True)
    next(iter(ckpt["model"].values())).add_(1.0)
    save_checkpoint(teacher, ckpt)
    proc = run_train(*args, "--resume", "--max-steps", "25")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "has changed since this run started" in lines[0], proc.stderr
    assert len(train_rows(out)) == 20
