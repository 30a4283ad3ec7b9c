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
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from itera_runtime import BundleError, load_bundle


def one_error_line(proc) -> str:
    """The one `error:` line of a failed command (progress lines "· ..." may come before it)."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("· ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


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
    return subprocess.run([sys.executable, "-m", "itera_export.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "itera_runtime.cli", *map(str, args)],
                          capture_output=True, timeout=300, **kw)


def bench(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "itera_bench.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


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


def test_force_never_replaces_a_folder_of_user_files_or_a_file(tiny_itera, user_folder):
    before = tree(user_folder)
    line = one_error_line(export(tiny_itera.checkpoint, "-o", user_folder / "proj", "--force"))
    assert "not an itera bundle" in line
    line = one_error_line(export(tiny_itera.checkpoint, "-o", user_folder / "important.txt", "--force"))
    assert "is a file" in line
    assert tree(user_folder) == before


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


def test_export_to_read_only_place_or_full_disk_is_one_line(tiny_itera, tmp_path):
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        line = one_error_line(export(tiny_itera.checkpoint, "-o", ro / "b"))
        assert "Read-only file system" in line and str(ro) in line
    with tmpfs(tmp_path / "full", size="64k") as full:
        line = one_error_line(export(tiny_itera.checkpoint, "-o", full / "b"))
        assert "No space left on device" in line and "disk full" in line
        assert list(full.iterdir()) == []  # nothing half-written


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
    "vocab smaller": lambda m: m.__setitem__("vocab_size", m["vocab_size"] - 1),
    "vocab larger": lambda m: m.__setitem__("vocab_size", m["vocab_size"] + 1),
    "family": lambda m: m.__setitem__("family", "baseline" if m["family"] == "itera" else "itera"),
    "graph input dtype": lambda m: m["graphs"]["decode"]["inputs"][0].__setitem__("dtype", "int32"),
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


# --- devices over ssh (a real sshd: the `device` fixture in conftest.py) ------------------


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


def test_device_python_with_shell_syntax_is_one_word_there(device, device_env, tiny_baseline, tmp_path):
    server, root = device
    prof = server.profile(tmp_path / "dev.toml", "dev", root / "cache", python=_hostile_name("python3"))
    r = subprocess.run([sys.executable, "-m", "itera_bench.cli", "latency", str(tiny_baseline.bundle),
                        "--device-profile", str(prof)], capture_output=True, text=True, env=device_env, timeout=300)
    assert r.returncode == 1 and "error: dev (" in r.stderr  # no such program on the device
    _nothing_ran(root, tmp_path)


@pytest.mark.slow
def test_device_bundle_path_with_shell_syntax_runs_nothing_on_either_side(device, device_env, tiny_baseline,
                                                                          tmp_path):
    from itera_bench.record import parse

    server, root = device
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
