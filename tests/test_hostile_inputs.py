"""Hostile inputs, second pass (issue 24): record files, run folders, data files and device
profiles a careless or malicious user hands the tools. Each ends in one clear line (or a
warning and the usable part), never a traceback, and a failed command leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from itera_bench.record import Record, format_records
from clirun import bench, one_error_line


def devices(*args, env: dict | None = None):
    from clirun import invoke

    from itera_devices.cli import main

    return invoke(main, *args, env=env)


def _row(bundle: str, family: str, samples: list, **kw) -> Record:
    base = dict(kind="latency", test="tg32@d128", metric="tokens_per_s", unit="tok/s", n_gen=32, n_depth=128,
                n_threads=1, repetitions=len(samples))
    base.update(kw)
    return Record(samples=samples, bundle=bundle, model_filename=bundle, family=family, **base)


def _write_records(path: Path, records: list[Record]) -> Path:
    path.write_text(format_records(records, "json"))
    return path


# --- records: non-finite, implausible, nested (items 6, 11, 23) ------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e308])
def test_report_refuses_a_non_finite_or_absurd_sample_and_leaves_no_folder(tmp_path, bad):
    f = _write_records(tmp_path / "rows.json", [_row("itera", "itera", [100.0, bad, 101.0])])
    out = tmp_path / "new" / "report"
    line = one_error_line(bench("report", f, "-o", out))
    assert "rows.json: row 1" in line and ("non-finite" in line if not math.isfinite(bad) else "implausible" in line)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("bad", [math.nan, 1e308])
def test_claims_refuses_a_non_finite_or_absurd_sample(tmp_path, tiny_itera, tiny_baseline, bad):
    f = _write_records(tmp_path / "rows.json", [_row(str(tiny_itera.bundle), "itera", [bad]),
                                                _row(str(tiny_baseline.bundle), "baseline", [10.0])])
    line = one_error_line(bench("claims", tiny_itera.bundle, "--baseline", tiny_baseline.bundle, "--results", f,
                                "--no-measure"))
    assert "rows.json: row 1" in line


def test_report_that_fails_on_a_full_disk_removes_the_folders_it_made(tmp_path):
    """A real one-page (4 KB) filesystem: claims.json fits, report.md does not, and out/ (made by this call) goes again."""
    import subprocess

    f = _write_records(tmp_path / "rows.json", [_row("itera", "itera", [100.0, 101.0, 99.0]),
                                                _row("base", "baseline", [50.0, 51.0, 49.0])])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mnt)], check=True)
    try:
        line = one_error_line(bench("report", f, "-o", mnt / "new" / "report"))
        assert "No space left" in line
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_implausible_ratio_in_claims_is_shown_and_never_met(tmp_path):
    f = _write_records(tmp_path / "rows.json", [
        _row("itera", "itera", [1e14]), _row("base", "baseline", [1e-3]),
        _row("itera", "itera", [3.0], kind="quality", test="q", metric="bits_per_byte", unit="bits/byte"),
        _row("base", "baseline", [0.0], kind="quality", test="q", metric="bits_per_byte", unit="bits/byte")])
    out = tmp_path / "report"
    proc = bench("report", f, "-o", out)
    assert proc.returncode == 0, proc.stderr
    claims = {c["claim"]: c for c in json.loads((out / "claims.json").read_text())["claims"][0]["claims"]}
    assert claims["speed"]["verdict"] == "not measured" and "implausible" in claims["speed"]["measured"]
    assert claims["quality"]["verdict"] == "not measured" and "not finite" in claims["quality"]["measured"]
    report = (out / "report.md").read_text()
    assert "implausible" in report and "nan" not in report.lower().replace("nano", "")


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("name,text", [
    ("deep.json", _nested(100_000)),
    ("deep.jsonl", '{"kind": "latency", "extra": ' + _nested(100_000) + "}\n"),
])
def test_deeply_nested_record_file_is_one_line_in_report_and_claims(tmp_path, tiny_itera, tiny_baseline, name, text):
    f = tmp_path / name
    f.write_text(text)
    assert "nested too deeply" in one_error_line(bench("report", f, "-o", tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    line = one_error_line(bench("claims", tiny_itera.bundle, "--baseline", tiny_baseline.bundle, "--results", f,
                                "--no-measure"))
    assert "nested too deeply" in line


# --- training runs: a cut last line (item 24) ---------------------------------------------------


def _run_folder(path: Path, tail: str) -> Path:
    path.mkdir()
    rows = [{"kind": "train", "step": s, "tokens": 64 * s, "time_s": 0.1 * s, "loss": 5.0 - s * 0.1, "lr": 1e-3}
            for s in range(1, 6)]
    rows.append({"kind": "eval", "step": 5, "tokens": 320, "time_s": 0.5, "val_loss": 4.6, "val_bpb": 2.1})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def test_run_with_a_cut_last_metrics_line_is_read_and_the_cut_is_said(tmp_path):
    run = _run_folder(tmp_path / "run", '{"kind": "train", "step": 6, "tokens": 38')
    out = tmp_path / "report"
    proc = bench("report", "--runs", run, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "last line is cut" in proc.stderr and "6 complete" in proc.stderr
    assert "last line is cut" in (out / "report.md").read_text()


def test_run_with_a_broken_line_inside_metrics_is_still_refused(tmp_path):
    run = _run_folder(tmp_path / "run", "")
    text = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    text.insert(2, '{"kind": "tr\n')
    (run / "metrics.jsonl").write_text("".join(text))
    assert "unreadable training run" in one_error_line(bench("report", "--runs", run, "-o", tmp_path / "out"))


# --- device profiles and targets (items 7, 12, 17, 21, 25) ---------------------------------------


def _latin1_profile(path: Path) -> Path:
    path.write_bytes(b'host = "pi@10.0.0.7"\ndescription = "caf\xe9"\n')
    return path


def test_profile_that_is_not_utf8_is_one_line_naming_the_file(tmp_path):
    prof = _latin1_profile(tmp_path / "latin.toml")
    for proc in (devices("check", prof), bench("latency", tmp_path, "--device-profile", prof)):
        line = one_error_line(proc)
        assert str(prof) in line and "UTF-8" in line


def test_fleet_that_is_not_utf8_is_one_line_naming_the_file(tmp_path):
    fleet = tmp_path / "fleet.toml"
    fleet.write_bytes(b'[[hosts]]\nname = "a"\nhost = "pi@10.0.0.7"\ndescription = "caf\xe9"\n')
    line = one_error_line(bench("latency", tmp_path, "--fleet", fleet))
    assert str(fleet) in line and "UTF-8" in line


def test_fleet_naming_a_profile_that_is_not_utf8_names_both_files(tmp_path):
    _latin1_profile(tmp_path / "latin.toml")
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[hosts]]\nprofile = "{tmp_path / "latin.toml"}"\n')
    line = one_error_line(bench("latency", tmp_path, "--fleet", fleet))
    assert str(fleet) in line and str(tmp_path / "latin.toml") in line


@pytest.mark.parametrize("url,words", [
    ("ssh://root@127.0.0.1:99999", "port"),
    ("ssh://root@127.0.0.1:0", "port"),
    ("ssh://root@127.0.0.1:http", "port"),
    ("ssh://root@:22", "no host"),
    ("ssh://root@127.0.0.1:22/tmp", "path"),
])
def test_ssh_url_with_a_bad_port_or_host_is_one_line_before_ssh_runs(tmp_path, url, words):
    line = one_error_line(devices("check", url))
    assert url in line and words in line and "usage" not in line
    prof = tmp_path / "p.toml"
    prof.write_text(f'host = "{url}"\n')
    assert words in one_error_line(devices("check", prof))


def test_unknown_profile_name_is_not_taken_for_a_host():
    line = one_error_line(devices("check", "nosuchprofile"))
    assert "no device profile named 'nosuchprofile'" in line and "pi5" in line and "user@nosuchprofile" in line


@pytest.mark.parametrize("target", ["root@nosuchhost.invalid", "ssh://nosuchhost.invalid", "nosuchhost.invalid"])
def test_host_forms_are_still_taken_for_hosts(target):
    proc = devices("check", target, "--no-index")
    line = proc.stderr.splitlines()[0]  # then ssh's own lines under it (`  | ...`)
    assert proc.returncode == 1 and line.startswith("error: ") and "Traceback" not in proc.stderr
    assert "no device profile" not in line and "resolve" in line and "nosuchhost.invalid" in line


def test_check_honours_the_profiles_timeout(tmp_path):
    """A listener that accepts and never speaks: ssh alone would wait its ConnectTimeout (15 s)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        prof = tmp_path / "slow.toml"
        prof.write_text(f'host = "root@127.0.0.1"\nport = {silent.getsockname()[1]}\ntimeout_s = 2\n')
        t0 = time.monotonic()
        line = one_error_line(devices("check", prof, "--no-index"))
        took = time.monotonic() - t0
    assert "timed out after 2 s" in line and took < 10, (line, took)


def test_devices_readme_says_profiles_are_trusted_like_ssh_config():
    from itera_devices import profiles

    readme = (Path(profiles.__file__).parent / "README.md").read_text()
    assert "ProxyCommand" in readme and "trusted like" in readme
    assert "ProxyCommand" in (profiles.__doc__ or "")


# --- data given as text: binary refused, bad bytes said, a folder named (items 13, 20) ------------


@pytest.fixture
def binary_file(tmp_path) -> Path:
    path = tmp_path / "random.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 64_000, dtype=np.uint8).tobytes())
    return path


def test_train_refuses_binary_data_in_one_line_and_writes_no_run(binary_file, tmp_path):
    from clirun import invoke

    from itera_lite.cli import main

    out = tmp_path / "run"
    proc = invoke(main, "--data", binary_file, "--out", out, "--max-steps", "1", "--vocab-size", "256",
                  env={"ITERA_CACHE_DIR": str(tmp_path / "cache")})
    line = one_error_line(proc)
    assert str(binary_file) in line and "not text" in line
    assert not out.exists()


def test_quality_refuses_binary_data_in_one_line(binary_file, tiny_itera):
    line = one_error_line(bench("quality", tiny_itera.bundle, "--data", binary_file))
    assert str(binary_file) in line and "not text" in line


def test_text_with_a_few_bad_bytes_is_read_with_the_same_warning_everywhere(tmp_path, tiny_itera, capsys):
    """itera-run's stdin rule, for a data file: a Latin-1 é is replaced and said, the rest is read."""
    from itera_lite.data import load_corpus

    latin = tmp_path / "latin.txt"
    latin.write_bytes("To be or not to be, café, that is the question.\n".encode("latin-1") * 300)
    corpus = load_corpus(str(latin))
    assert "caf\ufffd" in corpus.splits["train"][0].text
    assert f"warning: {latin} is not valid UTF-8; undecodable bytes replaced by U+FFFD" in capsys.readouterr().err
    proc = bench("quality", tiny_itera.bundle, "--data", latin, "--max-bytes", "2000")
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {latin} is not valid UTF-8" in proc.stderr


def test_quality_data_that_is_a_folder_says_so(tmp_path, tiny_itera):
    (tmp_path / "texts").mkdir()
    line = one_error_line(bench("quality", tiny_itera.bundle, "--data", tmp_path / "texts"))
    assert "is a folder" in line and "no such file" not in line


# --- bench depth on a model without a context limit (item 18) -------------------------------------


@pytest.mark.parametrize("sub", ["latency", "step", "memory"])
def test_depth_beyond_the_bench_limit_on_an_ssm_is_refused_before_any_work(tiny_itera, sub):
    from itera_bench.latency import MAX_BENCH_CONTEXT

    t0 = time.monotonic()
    line = one_error_line(bench(sub, tiny_itera.bundle, "-d", "99999999", "-r", "1"))
    assert "99,999,999" in line and f"{MAX_BENCH_CONTEXT:,}" in line
    assert time.monotonic() - t0 < 30


# --- Ctrl-C during itera-run --json (item 22) ---------------------------------------------------


def test_ctrl_c_during_json_generation_prints_the_partial_result(tiny_itera, capsys):
    import _thread
    import threading

    from itera_runtime.cli import run_once
    from itera_runtime.generate import Generator
    from itera_runtime.sampling import SamplingConfig

    generator = Generator(tiny_itera.bundle, threads=1)
    timer = threading.Timer(1.0, _thread.interrupt_main)  # a real KeyboardInterrupt, as Ctrl-C raises it
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_once(generator, "To be", 10_000_000, SamplingConfig(temperature=0), (), True, True)
    finally:
        timer.cancel()
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["stop_reason"] == "interrupted" and out["stats"]["new_tokens"] > 0
    assert out["prompt"] == "To be" and isinstance(out["text"], str) and out["text"]


@pytest.mark.slow  # a fresh process left 12 s to load before the Ctrl-C; the test above covers the logic fast
def test_ctrl_c_of_itera_run_json_exits_130_with_the_partial_object(tiny_itera):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "itera_runtime.cli", str(tiny_itera.bundle), "-p", "To be",
                             "-n", "10000000", "--temperature", "0", "--json", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(12)  # imports and session (2-6 s on 2 loaded cores); then it decodes for hours
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert json.loads(out)["stats"]["stop_reason"] == "interrupted", (out, err)


# --- file modes: checkpoints private, bundles shareable (item 25) ---------------------------------


def test_checkpoints_are_private_and_bundles_readable_by_all_as_documented(tiny_itera, tmp_path):
    import os
    import stat

    from itera_lite.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "c.pt", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == 0o600
    for p in Path(tiny_itera.bundle).iterdir():
        assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044, p
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "0600" in readme and "0644" in readme and "checkpoint" in readme[readme.index("0600") - 400:][:800]
