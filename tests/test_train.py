"""itera-train end to end on real Shakespeare: learning, exact resume after SIGKILL,
clear errors on bad checkpoints, and 2-process data parallel."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from itera_lite.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from itera_lite.data import prepare_data
from itera_lite.train import TrainConfig, budget_fraction, expert_utilisation, lr_at, params_sha256

# Small and fast but real: byte-level vocab, short windows, 1 thread for bit-exact reruns.
FAST = ["--vocab-size", "256", "--seq-len", "64", "--batch-size", "8", "--threads", "1",
        "--warmup-steps", "10", "--eval-batches", "4", "--final-eval-batches", "8", "--quiet"]


def run_train(*args, check=True) -> subprocess.CompletedProcess:
    """itera-train in this process (tests/clirun.py); the runs that must be killed are started as processes."""
    from clirun import invoke

    from itera_lite.cli import main

    proc = invoke(main, *args)
    if check and proc.returncode != 0:
        raise AssertionError(f"itera-train failed:\n{proc.stderr[-3000:]}")
    return proc


def train_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="module")
def byte_data():
    return prepare_data("shakespeare", 256)


@pytest.mark.slow
def test_loss_beats_unigram_entropy_on_unseen_plays(tmp_path, byte_data):
    # A model that only learned byte frequencies scores the unigram cross-entropy of the
    # validation plays under training frequencies; beating it by a margin needs context.
    counts = Counter(np.asarray(byte_data.split("train")).tolist())
    total = sum(counts.values())
    val = np.asarray(byte_data.split("val"))
    unigram_bpb = -np.mean([math.log2(counts.get(int(b), 1) / total) for b in val[:50000]])
    out = tmp_path / "run"
    run_train("--model", "itera", "--out", str(out), "--max-steps", "150", "--eval-every", "50",
              "--lr", "5e-3", *FAST)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["val_bpb"] < unigram_bpb - 0.6, (summary["best"], unigram_bpb)
    losses = train_losses(out)
    assert np.mean([losses[s] for s in range(141, 151)]) < losses[1] - 1.5
    for f in ("best.pt", "last.pt", "train.csv", "eval.csv", "metrics.jsonl"):
        assert (out / f).exists(), f
    model, _ = load_model(out / "best.pt")
    assert summary["params"]["total"] == sum(p.numel() for p in model.parameters())
    # Expert utilisation of best.pt on the validation split: every routed token counted once.
    experts = summary["experts"]
    assert len(experts["layers"]) == model.config.n_layers
    for layer in experts["layers"]:
        assert sum(layer["share"]) == pytest.approx(1.0) and len(layer["share"]) == model.config.n_experts
        assert layer["underused"] == [e for e, s in enumerate(layer["share"]) if s < experts["threshold"]]
    prov = summary["provenance"]
    # The command line of the process that trained (here pytest's, since it runs in-process).
    assert prov["git_commit"] and prov["versions"]["torch"]
    assert prov["command"] == " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


@pytest.mark.slow
def test_resume_after_sigkill_keeps_settings_and_continues_exactly(tmp_path, byte_data):
    """Issue 13's sequence: --max-steps 60 --threads 1, killed after a checkpoint, resumed
    with only --out --resume: it stops at 60 with the losses of an uninterrupted run."""
    args = ["--model", "itera", "--max-steps", "60", "--threads", "1", "--eval-every", "20", "--save-every", "5",
            "--vocab-size", "256", "--seq-len", "32", "--batch-size", "4", "--warmup-steps", "10",
            "--eval-batches", "2", "--final-eval-batches", "4", "--quiet"]
    ref = tmp_path / "ref"
    run_train("--out", str(ref), *args)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "itera_lite.cli", "--out", str(killed), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Kill once a checkpoint is on disk, however fast or slow this machine is.
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (killed / "last.pt").exists():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = load_checkpoint(killed / "last.pt")["step"]
    assert 0 < step < 60, "training ended before it could be killed"

    run_train("--out", str(killed), "--resume", "--quiet")
    want, got = train_losses(ref), train_losses(killed)
    assert sorted(got) == sorted(want) == list(range(1, 61))
    for s in range(1, 61):
        assert got[s] == want[s], s
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["stop_reason"] == "max_steps"
    assert summary["train_config"]["max_steps"] == 60 and summary["train_config"]["threads"] == 1
    assert load_checkpoint(killed / "last.pt")["step"] == 60


@pytest.mark.slow
def test_resume_takes_budgets_given_again(tmp_path, byte_data):
    out = tmp_path / "r"
    args = ["--model", "baseline", "--eval-every", "2", *FAST]
    run_train("--out", str(out), "--max-steps", "2", *args)
    run_train("--out", str(out), "--resume", "--max-steps", "4", "--quiet")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["train_config"]["max_steps"] == 4
    assert summary["train_config"]["seq_len"] == 64  # the run's own, not the CLI default
    assert sorted(train_losses(out)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_existing_run_without_resume_is_refused(tmp_path, byte_data):
    out = tmp_path / "r"
    run_train("--out", str(out), "--model", "baseline", "--max-steps", "2", "--eval-every", "2", *FAST)
    proc = run_train("--out", str(out), "--model", "baseline", "--max-steps", "2", *FAST, check=False)
    assert proc.returncode != 0
    assert "--resume" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign", "newer"])
def test_bad_checkpoint_gives_one_clear_line(tmp_path, byte_data, damage):
    out = tmp_path / "r"
    run_train("--out", str(out), "--model", "itera", "--max-steps", "2", "--eval-every", "2", *FAST)
    last = out / "last.pt"
    if damage == "truncate":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "garbage":
        last.write_bytes(os.urandom(4096))
    elif damage == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, last)
    else:
        ckpt = load_checkpoint(last)
        ckpt["format_version"] = 99
        torch.save(ckpt, last)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(last)
    assert "\n" not in str(err.value) and str(last) in str(err.value)
    proc = run_train("--out", str(out), "--resume", "--model", "itera", "--max-steps", "4", *FAST, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr
    if damage == "newer":
        assert "upgrade" in lines[0]


def test_checkpoint_round_trip_and_atomic_write(tmp_path, byte_data):
    out = tmp_path / "r"
    run_train("--out", str(out), "--model", "itera", "--max-steps", "2", "--eval-every", "2", *FAST)
    model, ckpt = load_model(out / "best.pt")
    assert ckpt["tokenizer_json"] == byte_data.tokenizer_json
    # The held-out sample export validates on: the test split's first ids, found by the exporter.
    from itera_export.validate import held_out_tokens

    ids, source = held_out_tokens(ckpt, 96)
    assert ids.tolist() == np.asarray(byte_data.split("test")[:96]).tolist() and "test split" in source
    assert byte_data.tokenizer.encode(ckpt["validation_sample"]["text"]).ids[:96] == ids.tolist()
    assert ckpt["train_config"]["seq_len"] == 64 and ckpt["model_config"]["family"] == "itera"
    # A failed save leaves the previous file intact and no temp files behind.
    before = (out / "last.pt").read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(out / "last.pt", {"bad": lambda: 0})  # unpicklable: fails mid-save
    assert (out / "last.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "29532"],
}


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, byte_data):
    out = tmp_path_factory.mktemp("one") / "run"
    run_train("--out", str(out), *DDP_ARGS)
    return out


DDP_ARGS = ["--model", "itera", "--max-steps", "6", "--eval-every", "3", *FAST]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_data_parallel(tmp_path, single_process_run, launcher):
    single, multi = single_process_run, tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*LAUNCHERS[launcher], "-m", "itera_lite.cli", "--out", str(multi), *DDP_ARGS],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((p / "summary.json").read_text()) for p in (single, multi))
    assert one.keys() == two.keys() and one["steps"] == two["steps"] == 6
    assert sorted(train_losses(multi)) == sorted(train_losses(single)) == list(range(1, 7))
    # Same global batch, split over two processes: the first step sees the same data and weights.
    assert train_losses(multi)[1] == pytest.approx(train_losses(single)[1], rel=1e-4)
    # Later steps too, up to the MoE balance loss being computed per rank rather than globally.
    for step in range(2, 7):
        assert train_losses(multi)[step] == pytest.approx(train_losses(single)[step], rel=2e-2), step
    # The two processes stayed in sync: each rank's weights, hashed after the last step, agree.
    ranks = two["ranks"]
    assert ranks["world_size"] == 2 and len(ranks["params_sha256"]) == 2
    assert ranks["params_sha256"][0] == ranks["params_sha256"][1] and ranks["in_sync"]
    assert ranks["params_sha256"][0] == params_sha256(load_model(multi / "last.pt")[0])


@pytest.mark.slow
def test_tensorboard_events_beside_the_csvs(tmp_path, byte_data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    run_train("--out", str(out), "--model", "baseline", "--max-steps", "4", "--eval-every", "2", "--tensorboard",
              *FAST)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([train_losses(out)[s] for s in range(1, 5)], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/val_bpb")] == [2, 4]


def test_step_schedule_is_warmup_then_torch_cosine():
    # With only a step budget the schedule is the usual one: compare with torch's own cosine.
    cfg = TrainConfig(lr=1e-2, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100, eta_min=cfg.lr * cfg.min_lr_ratio)
    torch_lrs = []
    for _ in range(100):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    warm = 10 / 110
    assert [lr_at(cfg, s, budget_fraction(cfg, s, 0, 0.0), None) for s in range(10)] == \
        pytest.approx([cfg.lr * (s + 1) / 10 for s in range(10)])
    ours = [lr_at(cfg, s, budget_fraction(cfg, s, 0, 0.0), warm) for s in range(10, 110)]
    assert ours == pytest.approx(torch_lrs, rel=1e-9)


@pytest.mark.slow
def test_time_budget_schedule_reaches_its_floor_and_resumes_from_its_fraction(tmp_path, byte_data):
    out = tmp_path / "t"
    args = ["--model", "baseline", "--max-steps", "100000", "--eval-every", "1000", *FAST, "--seq-len", "32",
            "--batch-size", "4", "--warmup-steps", "2"]
    run_train("--out", str(out), "--max-minutes", "0.1", *args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_minutes" and summary["steps"] > 5
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["kind"] == "train"]
    floor = 3e-3 * 0.1
    # Decays with the clock, not the (unreachable) step budget: the last step is at the floor.
    assert lrs[-1] == pytest.approx(floor, rel=0.15) and lrs[-1] < lrs[2] / 5
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    saved = load_checkpoint(out / "last.pt")
    assert saved["schedule"]["fraction"] == 1.0

    # Doubling the budget on resume: the run is half-way through, not starting over.
    run_train("--out", str(out), "--resume", "--max-minutes", "0.2", "--quiet")
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in rows if r["kind"] == "train" and r["step"] > saved["step"]]
    assert resumed and resumed[0]["elapsed_s"] > saved["elapsed_s"]
    longer = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=100000, max_minutes=0.2)
    half = lr_at(longer, saved["step"], saved["elapsed_s"] / 12, budget_fraction(longer, *saved["schedule"]["warmup_end"]))
    assert floor < resumed[0]["lr"] <= half < 3e-3


def test_expert_utilisation_names_underused_experts_and_flags_a_collapsed_router():
    load = torch.tensor([[250, 250, 250, 250, 0, 0, 0, 0],  # half the experts idle: underused, not collapsed
                         [990, 1000, 3, 2, 1, 1, 2, 1],     # two experts (= top_k) take everything
                         [125] * 8])
    report = expert_utilisation(load, top_k=2)
    assert report["threshold"] == pytest.approx(0.25 / 8)
    assert [ly["underused"] for ly in report["layers"]] == [[4, 5, 6, 7], [2, 3, 4, 5, 6, 7], []]
    assert report["collapsed_layers"] == [1] and report["collapsed"]
    assert report["layers"][2]["share"] == pytest.approx([1 / 8] * 8)
    assert not expert_utilisation(load[[0, 2]], top_k=2)["collapsed"]


@pytest.mark.slow
def test_run_started_before_run_state_checkpoints_still_resumes(tmp_path, byte_data):
    # A last.pt as main wrote it before: a LambdaLR "scheduler", no schedule, no eval step.
    out = tmp_path / "old"
    run_train("--out", str(out), "--model", "baseline", "--max-steps", "12", "--eval-every", "12",
              "--save-every", "4", *FAST)
    want = train_losses(out)
    # The same run stopped at step 4, its checkpoint stripped of what main did not write.
    short = tmp_path / "short"
    run_train("--out", str(short), "--model", "baseline", "--max-steps", "4", "--eval-every", "12",
              "--save-every", "4", *FAST)
    ckpt = torch.load(short / "last.pt", weights_only=True)
    for key in ("schedule", "last_eval_step", "validation_sample"):
        del ckpt[key]
    ckpt["scheduler"] = {"last_epoch": 4}
    torch.save(ckpt, short / "last.pt")
    run_train("--out", str(short), "--resume", "--max-steps", "12", "--quiet")
    got = train_losses(short)
    assert sorted(got) == list(range(1, 13))
    for s in range(1, 13):
        assert got[s] == want[s], s
