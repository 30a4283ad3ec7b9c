"""itera-bench latency/step/profile: one record type in every format, provenance on every row,
round-robin sweeps, ratios against the baseline, Ctrl-C, and refusals in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from itera_bench.record import FORMATS, Record, format_records, markdown, parse
from clirun import bench, one_error_line


@pytest.fixture(scope="module")
def latency_rows(tiny_itera, tiny_baseline):
    proc = bench("latency", tiny_itera.bundle, tiny_baseline.bundle, "-p", "8", "-n", "4", "-d", "8,24",
                 "-t", "1", "-r", "2", "-o", "json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_latency_sweeps_the_product_of_lists(latency_rows):
    tests = [(r["family"], r["test"]) for r in latency_rows]
    assert tests == [(f, t) for f in ("itera", "baseline") for t in ("pp8@d8", "pp8@d24", "tg4@d8", "tg4@d24")]
    for r in latency_rows:
        assert r["min"] <= r["median"] <= r["max"] and r["median"] > 0
        assert r["estimated"] is False and r["repetitions"] == 2 and len(r["samples_ns"]) == 2
        assert r["provenance"]["versions"]["onnxruntime"] and r["n_threads"] == 1 and r["build_commit"]
        assert r["model_size"] > 0 and r["model_n_params"] > 0
        n = r["n_prompt"] or r["n_gen"]
        # tokens/s is n tokens over each repetition's wall time: the two fields agree.
        assert r["samples"] == pytest.approx([n / (ns / 1e9) for ns in r["samples_ns"]], rel=1e-4)
        if r["test"].startswith("pp"):
            assert r["extra"]["ttft_ms"] * 1e6 >= min(r["samples_ns"])
    # Ratios against the baseline bundle (the first baseline-family one by default).
    for r in latency_rows:
        if r["family"] == "baseline":
            assert r["vs_baseline"] == 1.0 and r["baseline"] == r["bundle"]
        ref = next(b for b in latency_rows if b["family"] == "baseline" and b["test"] == r["test"])
        assert r["vs_baseline"] == pytest.approx(r["median"] / ref["median"])


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_every_format_parses_back_into_the_same_records(latency_rows, fmt):
    records = [Record.from_dict(r) for r in latency_rows]
    again = parse(format_records(records, fmt), fmt)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in records]


def test_markdown_table_and_spread_warning(latency_rows):
    md = format_records([Record.from_dict(r) for r in latency_rows], "md")
    assert md.startswith("| model | family |") and "tg4@d24" in md and "x |" in md
    steady = Record(kind="latency", test="tg1", metric="tokens_per_s", unit="tok/s", samples=[100, 101, 99])
    noisy = Record(kind="latency", test="tg1", metric="tokens_per_s", unit="tok/s", samples=[100, 140, 60])
    assert not steady.noisy and noisy.noisy and noisy.spread == pytest.approx(0.8)
    assert "warning" not in markdown([steady])
    assert "(noisy)" in markdown([noisy]) and "warning: 1 row(s)" in markdown([noisy])
    est = Record(kind="energy", test="tg1", metric="joules_per_token", unit="J", samples=[0.1], estimated=True)
    assert "(est.)" in markdown([est])
    assert set(FORMATS) == {"md", "csv", "json", "jsonl"}


def test_step_and_profile(tiny_itera):
    proc = bench("step", tiny_itera.bundle, "-n", "8", "-d", "4", "-r", "2", "-o", "json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(proc.stdout)
    assert row["test"] == "step@d4" and row["unit"] == "µs" and row["higher_is_better"] is False
    proc = bench("profile", tiny_itera.bundle, "-n", "16", "-d", "4", "-o", "json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["test"]: r for r in json.loads(proc.stdout)}
    ops = [r for t, r in rows.items() if t.startswith("op ")]
    assert ops and "kernels" in rows and "loop (step + sampling)" in rows
    loop_cpu = rows["loop (step + sampling)"]["extra"]["main_thread_cpu_us"]
    assert 0 <= rows["sampling + loop python"]["extra"]["main_thread_cpu_us"] <= loop_cpu
    # The per-op rows add up to the kernels row, and the layers to it as well.
    assert sum(r["median"] for r in ops) == pytest.approx(rows["kernels"]["median"], rel=1e-6)
    layers = [r for t, r in rows.items() if t.startswith("layer ") or t == "other"]
    assert sum(r["median"] for r in layers) == pytest.approx(rows["kernels"]["median"], rel=1e-6)
    assert any(t.startswith("layer 1") for t in rows)  # the tiny test model has two layers


def test_a_prompt_profile_splits_one_prefill_call_per_token(tiny_bundle):
    proc = bench("profile", tiny_bundle.bundle, "-p", "32", "-d", "4", "-o", "json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["test"]: r for r in json.loads(proc.stdout)}
    assert all((r["n_prompt"], r["n_gen"], r["n_depth"], r["unit"]) == (32, 0, 4, "µs") for r in rows.values())
    assert "loop (step + sampling)" not in rows and rows["prompt (prefill + first token)"]["median"] > 0
    ops = [r for t, r in rows.items() if t.startswith("op ")]
    assert sum(r["median"] for r in ops) == pytest.approx(rows["kernels"]["median"], rel=1e-6)
    layers = [r for t, r in rows.items() if t.startswith("layer ") or t == "other"]
    assert sum(r["median"] for r in layers) == pytest.approx(rows["kernels"]["median"], rel=1e-6)
    # Per prompt token: one 32-token call's kernels, not one decode step's (which run every node too).
    step = {r["test"]: r for r in json.loads(bench("profile", tiny_bundle.bundle, "-n", "16", "-d", "4",
                                                   "-o", "json").stdout)}
    assert rows["kernels"]["median"] < step["kernels"]["median"]
    assert "at most 512 tokens" in one_error_line(bench("profile", tiny_bundle.bundle, "-p", "513"))


def test_ctrl_c_keeps_finished_rows(tiny_itera):
    proc = subprocess.Popen([sys.executable, "-m", "itera_bench.cli", "latency", str(tiny_itera.bundle), "-p", "0",
                             "-n", "2", "-d", "4", "-r", "100000", "-o", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_MININTERVAL": "0"})
    deadline = time.time() + 60
    seen = ""
    while time.time() < deadline and "latency:" not in seen:
        seen += proc.stderr.read(1)
    time.sleep(1.0)  # some repetitions run
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    (row,) = json.loads(out)
    assert row["interrupted"] is True and 1 <= row["repetitions"] < 100000


def test_bad_bundle_is_one_line(tmp_path):
    line = one_error_line(bench("latency", tmp_path / "missing", "-d", "8"))
    assert "missing" in line


def test_depth_beyond_max_seq_len_is_refused(tiny_baseline):
    line = one_error_line(bench("latency", tiny_baseline.bundle, "-d", "100000", "-p", "0"))
    assert "max_seq_len 4096" in line


def test_threads_beyond_cpus_are_refused(tiny_itera):
    line = one_error_line(bench("latency", tiny_itera.bundle, "-t", str((os.cpu_count() or 1) + 1)))
    assert "CPUs" in line


def test_thread_settings_are_applied_and_recorded(tiny_itera):
    """A row says which onnxruntime thread-pool settings ran, $ITERA_ORT_CONFIG included, and
    the session really ran with them."""
    from itera_runtime.bundle import load_bundle
    from itera_runtime.options import ORT_CONFIG_ENV
    from itera_runtime.session import ModelSession

    env = {**os.environ, ORT_CONFIG_ENV: "session.dynamic_block_base=4"}
    proc = bench("step", tiny_itera.bundle, "-n", "8", "-d", "4", "-r", "2", "-t", "1", "-o", "jsonl", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert row["ort_settings"]["session.dynamic_block_base"] == "4"
    assert row["ort_settings"]["intra_op_num_threads"] == "1"
    assert row["extra"]["cpu_us_per_step"] > 0
    (back,) = parse(format_records([Record.from_dict(row)], "csv"), "csv")
    assert back.ort_settings == row["ort_settings"]

    os.environ[ORT_CONFIG_ENV] = "session.dynamic_block_base=4"
    try:
        session = ModelSession(load_bundle(tiny_itera.bundle), threads=1)
    finally:
        del os.environ[ORT_CONFIG_ENV]
    for sess in session.graphs.values():
        assert sess.get_session_options().get_session_config_entry("session.dynamic_block_base") == "4"
    assert session.settings["session.dynamic_block_base"] == "4"


def test_bad_ort_config_is_one_line(tiny_itera):
    env = {**os.environ, "ITERA_ORT_CONFIG": "allow_spinning"}
    line = one_error_line(bench("step", tiny_itera.bundle, "-n", "2", "-d", "4", env=env))
    assert "ITERA_ORT_CONFIG" in line and "'allow_spinning'" in line and "cannot load" not in line


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs for a 2-thread session")
def test_profile_marks_kernels_that_used_the_thread_pool(tiny_itera):
    proc = bench("profile", tiny_itera.bundle, "-n", "16", "-d", "4", "-t", "2", "-o", "json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["test"]: r for r in json.loads(proc.stdout)}
    pooled = rows["kernels that used the thread pool"]
    ops = {t[3:]: r for t, r in rows.items() if t.startswith("op ")}
    # The sum is over the ops it names, each of which did split some of its calls.
    assert pooled["extra"]["ops"] and set(pooled["extra"]["ops"]) <= set(ops)
    assert all(ops[o]["extra"]["thread_pool_share"] > 0 for o in pooled["extra"]["ops"])
    assert pooled["median"] == pytest.approx(sum(ops[o]["median"] * ops[o]["extra"]["thread_pool_share"]
                                                 for o in pooled["extra"]["ops"]), rel=1e-6)
    assert pooled["median"] <= rows["kernels"]["median"]
    assert ops["Reshape"]["extra"]["thread_pool_share"] == 0  # an alias never splits


def test_prompt_then_generation_is_one_request_with_its_ttft_row(tiny_itera):
    proc = bench("latency", tiny_itera.bundle, "-p", "0", "-n", "0", "-pg", "16,8", "-d", "0,4", "-r", "2", "-o", "json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert [(r["test"], r["metric"], r["unit"]) for r in rows] == [
        ("pp16+tg8", "tokens_per_s", "tok/s"), ("pp16+tg8@d4", "tokens_per_s", "tok/s"),
        ("pp16+tg8", "time_to_first_token", "ms"), ("pp16+tg8@d4", "time_to_first_token", "ms")]
    speed, ttft = rows[0], rows[2]
    assert speed["n_prompt"] == 16 and speed["n_gen"] == 8 and not ttft["higher_is_better"]
    for tps, ns, ms, first_ns in zip(speed["samples"], speed["samples_ns"], ttft["samples"], ttft["samples_ns"]):
        assert tps == pytest.approx(24 / (ns / 1e9), rel=1e-5)  # (P + G) over the whole request
        assert ms == pytest.approx(first_ns / 1e6, abs=1e-5) and first_ns < ns  # ns truncated to an int
    assert "| pp16+tg8 | 1 |" in format_records(parse(proc.stdout, "json"), "md")
    bad = bench("latency", tiny_itera.bundle, "-pg", "16")
    assert bad.returncode == 2 and "expected P,G" in bad.stderr
