"""Hostile inputs: what a careless or malicious user can do to each tool, and what must happen
(one clear line, a non-zero exit, the user's files intact, nothing half-written).
One module so that the next hostile pass extends it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from itera_runtime import BundleError, load_bundle
from clirun import bench, one_error_line


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under a folder with its content: what must survive.

    ~/.cache is left out: importing onnxruntime (1.32) writes a device id under
    ~/.cache/Microsoft/DeveloperTools whatever the command then does.
    """
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] != ".cache"}


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m", read_only: bool = False):
    """A real small (or read-only) filesystem: disk-full and read-only cases, no mocks."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# --- export, runtime and bench ------------------------------------------------------------


def export(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """itera-export in this process (tests/clirun.py): a fresh interpreter proves nothing about its refusals."""
    from clirun import invoke

    from itera_export.cli import main

    here = os.getcwd()
    os.chdir(cwd or here)
    try:
        return invoke(main, *args, env=env)
    finally:
        os.chdir(here)


def run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "itera_runtime.cli", *map(str, args)],
                          capture_output=True, timeout=300, **kw)


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """A folder of a user's own files, with a place to run commands from."""
    home = tmp_path / "home"
    (home / "proj").mkdir(parents=True)
    (home / "important.txt").write_text("do not lose me")
    (home / "proj" / "notes.md").write_text("# mine")
    return home


@pytest.mark.parametrize("target", [".", "..", "HOME", "/"])
def test_force_never_replaces_the_working_dir_its_parents_home_or_root(tiny_itera, user_folder, target):
    cwd = user_folder / "proj"
    before = tree(user_folder)
    env = {**os.environ, "HOME": str(user_folder)}
    out = str(user_folder) if target == "HOME" else target
    line = one_error_line(export(tiny_itera.checkpoint, "-o", out, "--force", cwd=cwd, env=env))
    assert "refusing to replace" in line or "not an itera bundle" in line
    assert tree(user_folder) == before
    assert not [p for p in user_folder.parent.rglob(".*.tmp")]


@pytest.mark.slow
def test_force_never_replaces_a_folder_of_user_files_or_a_file(tiny_itera, user_folder):
    before = tree(user_folder)
    line = one_error_line(export(tiny_itera.checkpoint, "-o", user_folder / "proj", "--force"))
    assert "not an itera bundle" in line
    line = one_error_line(export(tiny_itera.checkpoint, "-o", user_folder / "important.txt", "--force"))
    assert "is a file" in line
    assert tree(user_folder) == before


@pytest.mark.slow
def test_force_swaps_a_bundle_atomically_for_readers(tiny_itera, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_itera.bundle, out)
    old = load_bundle(out).manifest.created
    failures, loads = [], 0
    proc = subprocess.Popen([sys.executable, "-m", "itera_export.cli", str(tiny_itera.checkpoint), "-o", str(out),
                             "--force"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        try:
            load_bundle(out)  # every file hashed: a half-replaced bundle would fail here
            loads += 1
        except BundleError as e:
            failures.append(str(e))
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    assert failures == [] and loads > 10
    assert load_bundle(out).manifest.created >= old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.slow
def test_concurrent_exports_to_one_place_say_who_won(tiny_itera, tmp_path):
    out = tmp_path / "b"
    procs = [subprocess.Popen([sys.executable, "-m", "itera_export.cli", str(tiny_itera.checkpoint), "-o", str(out),
                               "--force"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    notes = [e for e in errs if "another export wrote" in e and "last writer wins" in e]
    assert len(notes) == 1
    load_bundle(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.slow
def test_stale_temp_folder_of_a_killed_export_is_cleaned_next_time(tiny_itera, tmp_path):
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "itera_export.cli", str(tiny_itera.checkpoint), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".b.*.tmp")):
        time.sleep(0.01)
    time.sleep(0.5)  # let it write something into the temp folder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".b.*.tmp")), "the export finished before it could be killed"
    assert not out.exists()
    proc = export(tiny_itera.checkpoint, "-o", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.slow
def test_export_to_read_only_place_or_full_disk_is_one_line(tiny_itera, tmp_path):
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        line = one_error_line(export(tiny_itera.checkpoint, "-o", ro / "b"))
        assert "Read-only file system" in line and str(ro) in line
    with tmpfs(tmp_path / "full", size="64k") as full:
        line = one_error_line(export(tiny_itera.checkpoint, "-o", full / "b"))
        assert "No space left on device" in line and "disk full" in line
        assert list(full.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize("opts", [["--quantize", "int4", "--quant-option", "blocksize=64"],
                                  ["--quantize", "int4", "--quant-option", "block_size=big"],
                                  ["--quant-option", "block_size=64"]])
def test_bad_quant_option_is_one_line(tiny_itera, tmp_path, opts):
    line = one_error_line(export(tiny_itera.checkpoint, "-o", tmp_path / "b", *opts))
    assert "--quant" in line
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_with_a_broken_tokenizer_is_one_line(tiny_itera, tmp_path):
    import torch

    from itera_lite.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_itera.checkpoint)
    ckpt["tokenizer_json"] = '{"model": "not a tokenizer"}'
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    line = one_error_line(export(bad, "-o", tmp_path / "b"))
    assert "tokenizer" in line and "bad.pt" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def _edit(bundle: Path, tmp_path: Path, edit) -> Path:
    copy = shutil.copytree(bundle, tmp_path / "edited")
    m = json.loads((copy / "manifest.json").read_text())
    edit(m)
    (copy / "manifest.json").write_text(json.dumps(m))  # not re-hashed: the manifest is not
    return copy


EDITS = {
    "state shape": lambda m: m["state"]["tensors"][0]["shape"].__setitem__(1, m["state"]["tensors"][0]["shape"][1] + 1),
    "state dtype": lambda m: m["state"]["tensors"][0].__setitem__("dtype", "float16"),
    "io logits": lambda m: m["io"].__setitem__("logits", "scores"),
    "io input_ids": lambda m: m["io"].__setitem__("input_ids", "tokens"),
    "io logits_start renamed": lambda m: m["io"].__setitem__("logits_start", "first"),
    "io logits_start dropped": lambda m: m["io"].__setitem__("logits_start", None),
    "vocab smaller": lambda m: m.__setitem__("vocab_size", m["vocab_size"] - 1),
    "vocab larger": lambda m: m.__setitem__("vocab_size", m["vocab_size"] + 1),
    "family": lambda m: m.__setitem__("family", "baseline" if m["family"] == "itera" else "itera"),
    "graph input dtype": lambda m: m["graphs"]["decode"]["inputs"][0].__setitem__("dtype", "int32"),
    "requires version": lambda m: m["requires"].__setitem__("onnxruntime", "newest"),
    "graph set repeated": lambda m: m.__setitem__("alt_graph_sets", {m["graph_set"]: {"graphs": m["graphs"]}}),
    # A KV buffer is written in place, so its capacity must be fixed.
    "kv buffer capacity": lambda m: (m["state"].__setitem__("kind", "kv_buffer"),
                                     m["state"]["tensors"][0]["shape"].__setitem__(2, "past_sequence")),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edited_manifest_is_refused_by_run_and_bench(tiny_bundle, tmp_path, edit):
    bundle = _edit(tiny_bundle.bundle, tmp_path, EDITS[edit])
    proc = run(bundle, "-p", "To be", "-n", "4", "--threads", "1", text=True)
    line = one_error_line(proc)
    assert proc.stdout == ""  # not a token printed before the refusal
    assert "manifest" in line or "vocab" in line
    line = one_error_line(bench("latency", bundle, "-p", "0", "-n", "2", "-d", "4", "-r", "1"))
    assert "manifest" in line or "vocab" in line


def test_edited_portable_set_of_a_dual_bundle_is_refused_when_it_runs(tiny_itera, tmp_path):
    m = load_bundle(tiny_itera.bundle).manifest
    if "portable" not in m.alt_graph_sets:
        pytest.skip("this onnxruntime exports portable-only bundles")

    def edit(d):
        d["alt_graph_sets"]["portable"]["graphs"]["decode"]["inputs"][1]["dtype"] = "float16"

    bundle = _edit(tiny_itera.bundle, tmp_path, edit)
    env = {**os.environ, "ITERA_GRAPH_SET": "portable"}
    proc = subprocess.run([sys.executable, "-m", "itera_runtime.cli", str(bundle), "-p", "To be", "-n", "4"],
                          capture_output=True, text=True, env=env)
    line = one_error_line(proc)
    assert "decode.portable.onnx" in line and "float16" in line


def test_bundle_files_are_readable_by_others(tiny_bundle):
    for p in Path(tiny_bundle.bundle).iterdir():
        assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044, (p.name, oct(p.stat().st_mode))


def test_unreadable_bundle_file_is_one_line(tiny_itera, tmp_path):
    bundle = shutil.copytree(tiny_itera.bundle, tmp_path / "b")
    (bundle / "tokenizer.json").chmod(0)
    # Root reads anything; drop the capabilities that let it, as an ordinary user would be.
    proc = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-m",
                           "itera_runtime.cli", str(bundle), "-p", "x", "-n", "2"],
                          capture_output=True, text=True, timeout=120)
    line = one_error_line(proc)
    assert "tokenizer.json: permission denied" in line


def test_threads_beyond_cpus_is_one_line(tiny_itera):
    proc = run(tiny_itera.bundle, "-p", "x", "--threads", "1000", text=True)
    assert "1000 threads" in one_error_line(proc)


def test_invalid_utf8_on_stdin_is_replaced_and_said(tiny_itera):
    proc = run(tiny_itera.bundle, "-n", "4", "--temperature", "0", "--json", input=b"To be \xff\xfe or not\n")
    assert proc.returncode == 0, proc.stderr
    assert b"warning: stdin is not valid UTF-8" in proc.stderr and b"Traceback" not in proc.stderr
    assert json.loads(proc.stdout)["prompt"] == "To be \ufffd\ufffd or not"


@pytest.mark.slow  # two fresh processes' memory, ~15-20 s on 2 cores
def test_long_ssm_prompt_prefills_in_bounded_memory(tiny_itera):
    """20,000 prompt tokens: chunked prefill with the state carried keeps memory flat; one call
    over the whole prompt (what main did) needs far more."""
    code = (
        "import sys, numpy as np\n"
        "from itera_runtime import load_bundle\n"
        "from itera_runtime.generate import peak_rss_mb\n"
        "from itera_runtime.session import ModelSession\n"
        "s = ModelSession(load_bundle(sys.argv[1]), threads=1)\n"
        "s.prefill(np.arange(8) % 200)\n"
        "before = peak_rss_mb()\n"
        "kw = {} if sys.argv[2] == 'default' else {'chunk': 20000}\n"
        "logits, _ = s.prefill(np.arange(20000) % 200, **kw)\n"
        "assert logits.shape == (s.bundle.vocab_size,)\n"
        "print(peak_rss_mb() - before)\n"
    )
    growth = {}
    for mode in ("default", "one-call"):
        proc = subprocess.run([sys.executable, "-c", code, str(tiny_itera.bundle), mode],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        growth[mode] = float(proc.stdout)
    # Measured: +13 MB chunked vs +280 MB in one call (2-layer test model, vocab 256).
    assert growth["default"] < 50 and growth["one-call"] > 4 * growth["default"], growth


# --- training -----------------------------------------------------------------------------

# Tiny and fast: byte vocab, short windows, one thread (bit-exact reruns).
TRAIN_FAST = ["--model", "itera", "--vocab-size", "256", "--seq-len", "32", "--batch-size", "4", "--threads", "1",
              "--warmup-steps", "2", "--eval-batches", "2", "--final-eval-batches", "2", "--quiet"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """About 60 KB of made-up words: enough for every split at --seq-len 32, no network."""
    rng = np.random.default_rng(0)
    words = ["thou", "art", "the", "king", "of", "night", "and", "day", "to", "be", "or", "not", "café", "naïve"]
    lines = [" ".join(rng.choice(words, size=10)) for _ in range(1200)]
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_run(text_file, tmp_path_factory) -> Path:
    """A finished 2-step run that tests may only read (copy it to change it)."""
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    trained(out, text_file, out.parent, "--max-steps", "2", "--eval-every", "2")
    return out


def itera_train(*args, tmp_path: Path) -> subprocess.CompletedProcess:
    """itera-train in this process (tests/clirun.py); prepared data is cached beside the text it
    came from, so tests share one preparation."""
    from clirun import invoke

    from itera_lite.cli import main

    return invoke(main, *args, env={"ITERA_CACHE_DIR": str(tmp_path.parent / "itera-cache")})


def trained(out: Path, data: Path, tmp_path: Path, *args) -> None:
    proc = itera_train("--out", out, "--data", data, *TRAIN_FAST, *args, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_train_out_on_a_user_folder_is_refused(text_file, user_folder, tmp_path):
    # Names a run writes, but the user's: no last.pt and no run marker, so not a run of ours.
    for name in ("train.csv", "summary.json", "best.pt"):
        (user_folder / name).write_text("mine")
    before = tree(user_folder)
    line = one_error_line(itera_train("--out", user_folder, "--data", text_file, "--max-steps", "2", *TRAIN_FAST,
                                      tmp_path=tmp_path))
    assert "not an itera-train run" in line and str(user_folder) in line
    assert tree(user_folder) == before


@pytest.mark.slow
def test_resume_with_spent_budget_keeps_best_pt(text_file, tmp_path):
    out = tmp_path / "run"
    trained(out, text_file, tmp_path, "--max-steps", "4", "--eval-every", "2")
    best, last = (out / "best.pt").read_bytes(), (out / "last.pt").read_bytes()
    proc = itera_train("--out", out, "--resume", "--quiet", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "best.pt").read_bytes() == best and (out / "last.pt").read_bytes() == last
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_early_stopped_run_resumed_keeps_best_pt(text_file, tmp_path):
    out = tmp_path / "run"
    # A rate this high makes validation loss worse after the first eval: early stopping.
    trained(out, text_file, tmp_path, "--max-steps", "40", "--eval-every", "2", "--patience", "1", "--lr", "2")
    from itera_lite.checkpoint import load_checkpoint

    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "early_stopping", summary["stop_reason"]
    best_step, last_step = load_checkpoint(out / "best.pt")["step"], load_checkpoint(out / "last.pt")["step"]
    assert best_step < last_step
    best = (out / "best.pt").read_bytes()
    for extra in ([], ["--max-steps", "40"]):
        proc = itera_train("--out", out, "--resume", "--quiet", *extra, tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "best.pt").read_bytes() == best
        assert load_checkpoint(out / "last.pt")["step"] == last_step


@pytest.mark.parametrize("args, words", [
    (["--max-minutes", "0"], "--max-minutes"), (["--max-minutes", "-1"], "--max-minutes"),
    (["--max-minutes", "nan"], "--max-minutes"), (["--max-steps", "0"], "--max-steps"),
    (["--max-tokens", "-5"], "--max-tokens"), (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"),
    (["--lr", "inf"], "--lr"), (["--threads", "1000"], "1000 threads"),
])
def test_bad_training_numbers_are_one_line_and_write_nothing(text_file, tmp_path, args, words):
    out = tmp_path / "run"
    line = one_error_line(itera_train("--out", out, "--data", text_file, *TRAIN_FAST, "--max-steps", "2", *args,
                                      tmp_path=tmp_path))
    assert words in line
    assert not out.exists()


def test_budget_that_ends_before_the_first_step_leaves_nothing(text_file, tmp_path):
    out = tmp_path / "run"
    line = one_error_line(itera_train("--out", out, "--data", text_file, "--max-minutes", "1e-9", *TRAIN_FAST,
                                      tmp_path=tmp_path))
    assert "before the first training step" in line
    assert not out.exists()


@pytest.mark.parametrize("size, words", [(0, "too little text"), (1500, "--seq-len 128")])
def test_too_little_data_is_one_line(tmp_path, size, words):
    data = tmp_path / "small.txt"
    data.write_text(("to be or not to be\n" * 200)[:size])  # 1500 bytes: a 75-byte val split
    out = tmp_path / "run"
    line = one_error_line(itera_train("--out", out, "--data", data, *TRAIN_FAST, "--seq-len", "128",
                                      "--max-steps", "2", tmp_path=tmp_path))
    assert words in line and "Traceback" not in line
    assert not out.exists()


def test_disk_full_while_saving_a_checkpoint_is_one_line(text_file, tmp_path):
    # The logs fit in 256 KB; a tiny model's checkpoint (weights + Adam moments, ~15 MB) does not.
    with tmpfs(tmp_path / "full", size="256k") as full:
        line = one_error_line(itera_train("--out", full / "run", "--data", text_file, "--max-steps", "2",
                                          "--eval-every", "2", *TRAIN_FAST, tmp_path=tmp_path))
        assert "No space left on device" in line and str(full / "run") in line
        assert not [p for p in (full / "run").iterdir() if p.name.endswith(".tmp")]


def test_unwritable_out_is_one_line(text_file, tmp_path):
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        line = one_error_line(itera_train("--out", ro / "run", "--data", text_file, "--max-steps", "2",
                                          *TRAIN_FAST, tmp_path=tmp_path))
        assert "Read-only file system" in line and str(ro / "run") in line


def test_stale_checkpoint_temp_files_are_cleaned_next_run(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    # What a SIGKILL inside save_checkpoint leaves: 0-byte temp files of our naming.
    for name in (".best.pt.k3j2h1.tmp", ".last.pt.a8b7c6.tmp", "summary.json.tmp"):
        (out / name).write_bytes(b"")
    (out / "mine.tmp").write_text("not ours")
    proc = itera_train("--out", out, "--resume", "--max-steps", "4", "--quiet", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == ["mine.tmp"]


@pytest.mark.parametrize("args", [["--model", "baseline"], ["--preset", "small"], ["--seed", "7"],
                                  ["--lr", "0.01"], ["--data", "OTHER"], ["--seq-len", "64"]])
def test_resume_with_other_settings_is_refused(tiny_run, tmp_path, args):
    out = tiny_run
    before = tree(out)
    args = [str(tmp_path / "other.txt") if a == "OTHER" else a for a in args]
    line = one_error_line(itera_train("--out", out, "--resume", *args, tmp_path=tmp_path))
    assert args[0] in line and "--resume cannot change" in line
    assert tree(out) == before


@pytest.mark.slow
def test_run_killed_before_its_first_checkpoint_starts_over(text_file, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "itera_lite.cli", "--out", str(out), "--data", str(text_file),
                             *TRAIN_FAST, "--max-steps", "1000", "--eval-every", "1000"],
                            env={**os.environ, "ITERA_CACHE_DIR": str(tmp_path.parent / "itera-cache")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (out / "train.csv").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "train.csv").exists() and not (out / "last.pt").exists()
    trained(out, text_file, tmp_path, "--max-steps", "2", "--eval-every", "2")
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow  # two ranks, each a fresh interpreter with torch: ~30 s on 2 cores
def test_torchrun_into_a_user_folder_stops_every_rank(text_file, user_folder, tmp_path):
    # Rank 0 refuses the folder; the other rank must stop too, not wait for it forever.
    before = tree(user_folder)
    env = {**os.environ, "ITERA_CACHE_DIR": str(tmp_path.parent / "itera-cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29541", "-m", "itera_lite.cli", "--out", str(user_folder), "--data", str(text_file),
                           *TRAIN_FAST, "--max-steps", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "not an itera-train run" in proc.stderr
    assert tree(user_folder) == before

# --------------------------------------------------------------------------- itera-bench report


@pytest.mark.parametrize("name, text", [
    ("table.csv", "a,b\n1,2\n"),  # any CSV: DictReader would fill every record field with nothing
    ("rows.json", '[{"kind": "latency", "test": "tg4", "metric": "tokens_per_s", "unit": "tok/s", '
                  '"samples": ["fast"]}]'),
    ("rows.json", "[1, 2, 3]"),
    ("rows.jsonl", '{"kind": "latency"\n'),
    ("rows.json", '{"kind": "latency", "test": "x", "metric": "m", "unit": "u"}'),
    ("rows.txt", "hello"),
    ("rows.jsonl", b"\xff\xfe\x00\x81 not text"),
])
def test_report_refuses_foreign_record_files_in_one_line(tmp_path, name, text):
    f = tmp_path / name
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "report"
    proc = bench("report", f, "-o", out)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert not (out / "report.md").exists()


# --- devices over ssh (a real sshd: the `ssh_device` fixture in conftest.py) ------------------


def test_device_host_that_looks_like_an_ssh_option_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    line = one_error_line(bench("latency", tmp_path, "--host", f"-oProxyCommand=touch {marker}"))
    assert "'host'" in line
    assert not marker.exists()


PWNED = ["itd-pwned-1", "itd-pwned-2", "itd-pwned-3"]


def _hostile_name(prefix: str) -> str:
    """Shell syntax that would create the PWNED files if anything handed it to a shell unquoted."""
    return f"{prefix} $(touch {PWNED[0]}) `touch {PWNED[1]}` 'q\" ;touch {PWNED[2]}"


def _nothing_ran(*folders: Path) -> None:
    for where in (Path.home(), Path.cwd(), *folders):
        assert not any((where / n).exists() for n in PWNED), where


def test_device_python_with_shell_syntax_is_one_word_there(ssh_device, device_env, tiny_baseline, tmp_path):
    server, root = ssh_device
    prof = server.profile(tmp_path / "dev.toml", "dev", root / "cache", python=_hostile_name("python3"))
    env = {**device_env, "XDG_CACHE_HOME": str(tmp_path / "local-cache")}
    r = subprocess.run([sys.executable, "-m", "itera_bench.cli", "latency", str(tiny_baseline.bundle),
                        "--device-profile", str(prof)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "error: dev (" in r.stderr  # no such program on the device
    assert not (tmp_path / "local-cache" / "itera-lite" / "wheels").exists()  # refused before building the wheel
    _nothing_ran(root, tmp_path)


@pytest.mark.slow
def test_device_bundle_path_with_shell_syntax_runs_nothing_on_either_side(ssh_device, device_env, tiny_baseline,
                                                                          tmp_path):
    from itera_bench.record import parse

    server, root = ssh_device
    prof = server.profile(tmp_path / "dev.toml", "dev", root / "cache")
    hostile = tmp_path / _hostile_name("b")
    shutil.copytree(tiny_baseline.bundle, hostile)
    r = subprocess.run([sys.executable, "-m", "itera_bench.cli", "latency", str(hostile), "-p", "8", "-n", "4",
                        "-d", "0", "-r", "1", "--device-profile", str(prof), "-o", "jsonl"],
                       capture_output=True, text=True, env=device_env, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = parse(r.stdout, "jsonl")
    assert rows and all(row.model_filename == hostile.name and row.bundle == str(hostile) for row in rows)
    assert rows[0].provenance["host"]["remote_bundle"].endswith("/" + hostile.name)  # same name on the device
    _nothing_ran(root, tmp_path)
