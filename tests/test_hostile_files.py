"""Hostile inputs, second pass (issue 24): --force and -o on folders we did not make, datastores that
do not hold what they say, two trainings into one folder, and a time budget that means what it says.

Every refusal: one `error:` line, a non-zero exit, the user's files as they were, before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import test_hostile
from test_hostile import TRAIN_FAST, bench, export, itera_train, one_error_line, tree

from itera_runtime.bundle import load_bundle, write_manifest


text_file, tiny_run = test_hostile.text_file, test_hostile.tiny_run  # its training fixtures, here too


def run_cli(*args) -> subprocess.CompletedProcess:
    """itera-run in this process (tests/clirun.py)."""
    from clirun import invoke

    from itera_runtime.cli import main

    return invoke(main, *args)


def retrieval_index(*args) -> subprocess.CompletedProcess:
    from clirun import invoke

    from itera_lite.cli import retrieval_index as command

    return invoke(command, *args)


# --- whose folder is it: export --force, retrieval-index --force -----------------------------


def test_export_force_onto_our_bundle_with_a_user_file_in_it_refuses_naming_it(tiny_itera, tmp_path):
    out = tmp_path / "x"
    shutil.copytree(tiny_itera.bundle, out)
    (out / "thesis.txt").write_text("my thesis")
    before = tree(out)
    line = one_error_line(export(tiny_itera.checkpoint, "-o", out, "--force"))
    assert "thesis.txt" in line and str(out) in line
    assert tree(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left beside it


def test_export_force_onto_our_bundle_with_an_edited_file_refuses_naming_it(tiny_itera, tmp_path):
    out = tmp_path / "x"
    shutil.copytree(tiny_itera.bundle, out)
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text() + " ")  # the user's edit
    before = tree(out)
    line = one_error_line(export(tiny_itera.checkpoint, "-o", out, "--force"))
    assert "tokenizer.json" in line
    assert tree(out) == before


def test_retrieval_index_force_never_replaces_a_user_folder_with_a_datastore_json(tiny_itera, tmp_path):
    u = tmp_path / "u"
    u.mkdir()
    (u / "datastore.json").write_text("mine")
    (u / "thesis.txt").write_text("thesis")
    before = tree(u)
    line = one_error_line(retrieval_index(tiny_itera.checkpoint, "--max-entries", "300", "--tune-tokens", "64",
                                          "-o", u, "--force"))
    assert "not a datastore of ours" in line and str(u) in line
    assert tree(u) == before


def test_retrieval_index_force_on_our_datastore_with_a_user_file_refuses_naming_it(retrieval_bundle, tiny_itera,
                                                                                   tmp_path):
    store, _, _ = retrieval_bundle
    u = tmp_path / "ds"
    shutil.copytree(store, u)
    (u / "thesis.txt").write_text("thesis")
    before = tree(u)
    line = one_error_line(retrieval_index(tiny_itera.checkpoint, "-o", u, "--force"))
    assert "thesis.txt" in line
    assert tree(u) == before


def test_retrieval_index_force_replaces_a_datastore_of_ours(retrieval_bundle, tiny_itera, tmp_path):
    from itera_lite.retrieval import build_datastore

    store, _, ids = retrieval_bundle
    u = tmp_path / "ds"
    shutil.copytree(store, u)
    out, meta = build_datastore(tiny_itera.checkpoint, u, max_entries=64, seq_len=32, progress=False,
                                texts=(ids, ids[:200]), force=True)
    assert out == u and json.loads((u / "datastore.json").read_text())["n_entries"] == 64 == meta["n_entries"]
    assert sorted(p.name for p in u.iterdir()) == ["datastore.json", "keys.npy", "values.npy"]


# --- a datastore is checked at export exactly as the runtime checks it at load -----------------


def _npy_text(path: Path) -> None:
    path.write_text("this is not an array but a text file a user saved as keys.npy by mistake, " * 3)


def _keys(store: Path) -> np.ndarray:
    return np.load(store / "keys.npy", allow_pickle=False)


ARRAY_EDITS = {
    # name: (edit of a datastore folder, words the one line must hold)
    "symlink out": (lambda d: (d / "keys.npy").unlink() or (d / "keys.npy").symlink_to("/etc/passwd"), "escapes"),
    "empty keys": (lambda d: (d / "keys.npy").write_bytes(b""), "empty file"),
    "text keys": (lambda d: _npy_text(d / "keys.npy"), "no NumPy header"),
    "pickled keys": (lambda d: np.save(d / "keys.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True),
                     "pickled"),
    "nan keys": (lambda d: np.save(d / "keys.npy", np.full_like(_keys(d), np.nan)), "NaN or Inf"),
    "one nan row": (lambda d: np.save(d / "keys.npy", np.concatenate([_keys(d)[:5], np.full_like(_keys(d)[:1], np.nan),
                                                                      _keys(d)[6:]])), "key row 5"),
    "inf keys": (lambda d: np.save(d / "keys.npy", _keys(d) * np.float16(np.inf)), "NaN or Inf"),
    "values outside vocab": (lambda d: np.save(d / "values.npy", np.load(d / "values.npy") + 300),
                             "outside the vocabulary"),
    "short values": (lambda d: np.save(d / "values.npy", np.load(d / "values.npy")[:-1]), "values are"),
}


@pytest.mark.parametrize("edit", list(ARRAY_EDITS))
def test_export_refuses_a_datastore_whose_arrays_the_runtime_would_refuse(retrieval_bundle, tiny_itera, tmp_path,
                                                                        edit):
    store, _, _ = retrieval_bundle
    ds = tmp_path / "ds"
    shutil.copytree(store, ds)
    change, words = ARRAY_EDITS[edit]
    change(ds)
    proc = export(tiny_itera.checkpoint, "--retrieval", ds, "-o", tmp_path / "b")
    line = one_error_line(proc)
    assert words in line and str(ds) in line, line
    assert line.endswith((")", "refused", "]")) or line.rstrip().endswith(tuple("0123456789")), line  # not cut
    assert "exporting" not in proc.stderr  # refused before the export's work
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("field, value, words", [
    ("k", 0, ".k must be >= 1"), ("k", "64", ".k: expected an integer"), ("lambda", 2, ".lambda"),
    ("lambda", float("nan"), ".lambda"), ("lambda", 1.0, "lambda must be in [0, 1)"),
    ("metric", "cosine", ".metric is 'cosine'"), ("n_entries", 5, "keys are float16"),
    ("temperature", 0, ".temperature"), ("n_entries", 0, "empty datastore"),
])
def test_export_refuses_bad_datastore_json_values_before_any_work_naming_the_file(retrieval_bundle, tiny_itera,
                                                                                  tmp_path, field, value, words):
    store, _, _ = retrieval_bundle
    ds = tmp_path / "ds"
    shutil.copytree(store, ds)
    meta = json.loads((ds / "datastore.json").read_text())
    (ds / "datastore.json").write_text(json.dumps({**meta, field: value}))
    proc = export(tiny_itera.checkpoint, "--retrieval", ds, "-o", tmp_path / "b")
    line = one_error_line(proc)
    assert words in line and (str(ds / "datastore.json") in line or str(ds / "keys.npy") in line), line
    assert "exporting" not in proc.stderr and ".manifest" not in line
    assert not (tmp_path / "b").exists()


# --- ... and at load, in itera-run and itera-bench quality -------------------------------------


def _bundle_with_keys(retrieval_bundle, tmp_path, write) -> Path:
    """A copy of the retrieval bundle whose keys.npy is rewritten, its manifest re-hashed to match."""
    _, path, _ = retrieval_bundle
    bad = tmp_path / "bundle"
    shutil.copytree(path, bad)
    write(bad / "retrieval" / "keys.npy")
    write_manifest(bad, load_bundle(bad, verify=False).manifest)
    return bad


@pytest.mark.parametrize("keys, words", [
    ("empty", "empty file"), ("nan", "NaN or Inf"), ("one nan row", "key row 3 holds NaN"), ("inf", "NaN or Inf"),
])
def test_run_and_bench_quality_refuse_bad_keys_in_one_line_naming_the_datastore(retrieval_bundle, tmp_path, keys,
                                                                              words):
    def write(p: Path):
        k = np.load(p, allow_pickle=False)
        if keys == "empty":
            p.write_bytes(b"")
        elif keys == "one nan row":
            k = k.copy()
            k[3, 7] = np.nan
            np.save(p, k)
        else:
            np.save(p, np.full_like(k, np.nan if keys == "nan" else np.inf))

    bad = _bundle_with_keys(retrieval_bundle, tmp_path, write)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's raw overflow/invalid-value warnings
        line = one_error_line(run_cli(bad, "-p", "To be", "-n", "2", "--temperature", "0"))
    assert words in line and "keys.npy" in line, line
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 4)
    line = one_error_line(bench("quality", bad, "--data", text, "--window", "32", "--threads", "1"))
    assert words in line and "keys.npy" in line, line


def test_retrieval_k_beyond_the_datastore_is_clamped_and_said(retrieval_bundle):
    _, path, _ = retrieval_bundle
    n = load_bundle(path).manifest.retrieval.n_entries
    proc = run_cli(path, "-p", "To be", "-n", "2", "--temperature", "0", "--json", "--retrieval-k", "1000000000")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["retrieval"]["k"] == n
    assert f"using k {n:,}" in proc.stderr and "1,000,000,000" in proc.stderr


def test_bench_quality_retrieval_settings_on_a_bundle_without_datastore_refused(tiny_itera, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 4)
    line = one_error_line(bench("quality", tiny_itera.bundle, "--data", text, "--window", "32", "--retrieval-k", "5"))
    assert "--retrieval-k" in line and "no bundle given has a retrieval datastore" in line
    assert one_error_line(run_cli(tiny_itera.bundle, "-p", "x", "--retrieval-k", "5"))  # as itera-run does



# --- itera-bench report -o / all -o: only files of an earlier report of ours are replaced --------


@pytest.fixture
def record_file(tiny_itera, tmp_path) -> Path:
    from test_report import crafted

    from itera_bench.record import format_records

    path = tmp_path / "rows.jsonl"
    path.write_text(format_records([crafted(tiny_itera.bundle, "memory", "d0", "peak_rss", "bytes", [60e6, 61e6])],
                                   "jsonl"))
    return path


@pytest.mark.parametrize("name", ["report.md", "claims.json", "memory_peak_rss.png"])
def test_report_never_overwrites_a_user_file_in_an_existing_folder(record_file, tmp_path, name):
    d = tmp_path / "d"
    d.mkdir()
    (d / name).write_text("mine")
    before = tree(d)
    line = one_error_line(bench("report", record_file, "-o", d))
    assert name in line and "not ours" in line
    assert tree(d) == before


def test_report_rerun_replaces_its_own_files_and_keeps_the_users(record_file, tmp_path):
    d = tmp_path / "d"
    assert bench("report", record_file, "-o", d).returncode == 0
    (d / "notes.txt").write_text("mine, beside the report")
    first = tree(d)
    proc = bench("report", record_file, "-o", d)
    assert proc.returncode == 0, proc.stderr
    assert (d / "notes.txt").read_text() == "mine, beside the report" and set(tree(d)) == set(first)
    (d / "report.md").write_text((d / "report.md").read_text() + "\nmy edit\n")  # now the user's
    edited = tree(d)
    line = one_error_line(bench("report", record_file, "-o", d))
    assert "report.md" in line
    assert tree(d) == edited


@pytest.mark.parametrize("where", ["latency.jsonl", "quality.err", "report/report.md"])
def test_bench_all_refuses_a_folder_of_user_files_before_measuring(tiny_itera, tmp_path, where):
    d = tmp_path / "results"
    (d / where).parent.mkdir(parents=True)
    (d / where).write_text("mine")
    before = tree(d)
    proc = bench("all", tiny_itera.bundle, "-o", d, "-r", "1")
    line = one_error_line(proc)
    assert Path(where).name in line and "not ours" in line
    assert "itera-bench latency" not in proc.stderr  # nothing measured
    assert tree(d) == before


def test_a_results_folder_of_ours_reads_back_as_its_records_only(record_file, tmp_path):
    """The listing run_all keeps in a results folder is not taken for a record file."""
    from itera_runtime.owned import record

    from itera_bench.results import load_results

    d = tmp_path / "results"
    d.mkdir()
    shutil.copy(record_file, d / "memory.jsonl")
    record(d, ["memory.jsonl"])
    records, _ = load_results([d])
    assert len(records) == 1


# --- two itera-train --out SAME at once --------------------------------------------------------

HOLD_LOCK = ("import sys, time\nfrom itera_runtime.owned import FolderLock\n"
             "FolderLock(sys.argv[1], 'itera-train').acquire()\nprint('held', flush=True)\ntime.sleep(300)\n")


@pytest.fixture
def lock_holder():
    """Start a real process holding a folder's lock (as a running itera-train does); killed after the test."""
    procs = []

    def start(lock: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("resume", [True, False])
def test_second_train_into_a_folder_in_use_is_refused_naming_the_writer(tiny_run, text_file, tmp_path, lock_holder,
                                                                        resume):
    from itera_lite.train import RUN_LOCK

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    if not resume:  # a first run still before its first checkpoint: the second must not start it over
        (out / "last.pt").unlink()
    holder = lock_holder(out / RUN_LOCK)
    before = tree(out)
    args = ["--resume", "--max-steps", "4"] if resume else ["--data", str(text_file), *TRAIN_FAST]
    line = one_error_line(itera_train("--out", out, *args, "--quiet", tmp_path=tmp_path))
    assert "in use by another itera-train" in line and f"pid {holder.pid} " in line and str(out) in line
    assert tree(out) == before


def test_a_lock_left_by_a_killed_run_is_taken_over_and_said(tiny_run, tmp_path):
    import socket

    from itera_lite.train import RUN_LOCK

    assert not (tiny_run / RUN_LOCK).exists()  # a finished run leaves no lock
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (out / RUN_LOCK).write_text(json.dumps({"tool": "itera-train", "pid": pid, "host": socket.gethostname(),
                                            "started": "2026-12-06T23:00:00+0000"}))
    proc = itera_train("--out", out, "--resume", "--max-steps", "3", "--quiet", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"taking over the lock of itera-train pid {pid} " in proc.stderr
    assert not (out / RUN_LOCK).exists()
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


@pytest.mark.slow  # a real training process beside the test: ~20 s on 2 cores
def test_two_trainings_into_one_folder_the_second_is_refused(text_file, tmp_path):
    from itera_lite.train import RUN_LOCK

    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "itera_lite.cli", "--out", str(out), "--data", str(text_file),
                              *TRAIN_FAST, "--max-steps", "100000", "--eval-every", "100000"],
                             env={**os.environ, "ITERA_CACHE_DIR": str(tmp_path.parent / "itera-cache")},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and not (out / "train.csv").exists():
            time.sleep(0.05)
        assert (out / RUN_LOCK).exists()
        line = one_error_line(itera_train("--out", out, "--data", text_file, *TRAIN_FAST, "--max-steps", "2",
                                          tmp_path=tmp_path))
        assert f"pid {first.pid} " in line
        assert first.poll() is None  # the first still runs, its files untouched
    finally:
        first.kill()
        first.wait()


# --- a time budget means what it says: warm-up and the closing evaluation inside it -------------


def test_warmup_of_a_time_budgeted_run_ends_by_its_share_of_the_budget():
    from itera_lite.train import (CLOSING_SHARE, WARMUP_MAX_SHARE, TrainConfig, lr_at, training_seconds,
                                  warmup_over, warmup_progress)

    cfg = TrainConfig(lr=1e-2, warmup_steps=100, max_steps=10**6, max_minutes=0.5)  # 30 s; 100 steps take longer
    seconds = training_seconds(cfg)
    assert seconds == pytest.approx(30 * (1 - CLOSING_SHARE))
    share = WARMUP_MAX_SHARE * seconds
    assert not warmup_over(cfg, 3, 0, 0.5 * share) and warmup_over(cfg, 3, 0, share)
    assert warmup_progress(cfg, 3, 0, 0.5 * share) == pytest.approx(0.5)  # the clock, not 4 of 100 steps
    assert lr_at(cfg, 3, 0.0, None, warmup_progress(cfg, 3, 0, share)) == pytest.approx(cfg.lr)
    # Only a step budget: the warm-up is --warmup-steps, as before.
    steps = TrainConfig(lr=1e-2, warmup_steps=100, max_steps=200)
    assert not warmup_over(steps, 3, 0, 1e6) and warmup_progress(steps, 3, 0, 1e6) == pytest.approx(0.04)


@pytest.fixture(scope="module")
def big_text(tmp_path_factory) -> Path:
    """~1.5 MB of made-up words: a validation split whose whole evaluation outlasts a 6-second budget."""
    rng = np.random.default_rng(1)
    words = ["thou", "art", "the", "king", "of", "night", "and", "day", "to", "be", "or", "not"]
    path = tmp_path_factory.mktemp("big") / "big.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, size=12)) for _ in range(30_000)) + "\n")
    return path


@pytest.mark.slow  # a 6-second run on 1.5 MB of text (prepared once), with its closing evaluation
def test_time_budget_includes_the_closing_evaluation_and_says_so(big_text, tmp_path, monkeypatch):
    from itera_lite.data import prepare_data

    cache = tmp_path.parent / "itera-cache"
    monkeypatch.setenv("ITERA_CACHE_DIR", str(cache))
    prepare_data(str(big_text), 256, progress=False)  # the preparation is not part of the budget
    fast = [a for a in TRAIN_FAST if a != "--quiet"]
    i = fast.index("--final-eval-batches")
    fast = fast[:i] + fast[i + 2:]  # whole splits, as a user's run evaluates
    out = tmp_path / "run"
    start = time.perf_counter()
    proc = itera_train("--out", out, "--data", big_text, *fast, "--max-steps", "1000000", "--eval-every", "1000000",
                       "--warmup-steps", "1000000", "--max-minutes", "0.1", tmp_path=tmp_path)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    final = summary["final_eval"]
    assert summary["stop_reason"] == "max_minutes" and final["bounded_by"] == "max_minutes"
    assert summary["elapsed_s"] < 6 * 0.9 + 2  # training stopped at its share (one step of slack)
    assert not final["val"]["complete"] and 0 < final["val"]["windows"] < final["val"]["windows_in_split"]
    assert final["seconds"] <= final["seconds_left"] + 2  # one batch past the deadline at most, and its slack
    assert wall < 6 + 15, wall  # model build, checkpoints and a loaded machine; the whole splits took minutes
    assert "evaluating best.pt on the validation and test splits" in proc.stderr and "final eval val" in proc.stderr
    assert f"of {final['val']['windows_in_split']:,} val" in proc.stderr  # the user is told
    # Warm-up ended by its share of the budget although --warmup-steps was never reached.
    lrs = [json.loads(ln)["lr"] for ln in (out / "metrics.jsonl").read_text().splitlines()
           if json.loads(ln)["kind"] == "train"]
    assert max(lrs) > 0.9 * 3e-3 > lrs[0]


def test_bench_all_results_folder_reruns_over_its_own_files_and_refuses_a_users(tiny_itera, tmp_path):
    """run_all (what `all` and the pipeline measure with) on the cheapest subcommand, twice into one folder."""
    from itera_bench.cli import flops
    from itera_bench.invocation import Invocation
    from itera_bench.suite import run_all
    from itera_runtime.owned import NotOursError

    d = tmp_path / "results"
    inv = [Invocation.of(flops, [tiny_itera.bundle], n_depth=[0])]
    assert run_all(inv, d) == {"flops": "ok"}
    assert run_all(inv, d) == {"flops": "ok"}  # its own flops.jsonl, replaced
    (d / "flops.jsonl").write_text((d / "flops.jsonl").read_text() + "\n")  # the user's edit: now theirs
    before = tree(d)
    with pytest.raises(NotOursError, match="flops.jsonl is not ours"):
        run_all(inv, d)
    assert tree(d) == before
