"""itera-bench latency: one record type in every format, provenance on every row."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys


def bench(*args):
    return subprocess.run([sys.executable, "-m", "itera_bench.cli", "latency", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_latency_sweeps_the_product_of_lists(tiny_itera, tiny_baseline):
    proc = bench(tiny_itera.bundle, tiny_baseline.bundle, "-c", "8,24", "-t", "1", "-n", "4", "-r", "2", "-o", "json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert [(r["family"], r["context"]) for r in rows] == [("itera", 8), ("itera", 24), ("baseline", 8), ("baseline", 24)]
    for r in rows:
        assert r["decode_tokens_per_s_min"] <= r["decode_tokens_per_s"] <= r["decode_tokens_per_s_max"]
        assert r["estimated"] is False and r["repeats"] == 2 and r["new_tokens"] == 4
        assert r["provenance"]["versions"]["onnxruntime"] and r["provenance"]["threads"] == 1


def test_latency_csv_and_markdown(tiny_itera):
    out = bench(tiny_itera.bundle, "-c", "8", "-n", "2", "-r", "1", "-o", "csv")
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = list(csv.DictReader(io.StringIO(out.stdout)))
    assert row["family"] == "itera" and float(row["decode_tokens_per_s"]) > 0 and row["git_commit"]
    md = bench(tiny_itera.bundle, "-c", "8", "-n", "2", "-r", "1")
    assert md.stdout.startswith("| family |") and "| itera |" in md.stdout


def test_latency_bad_bundle_is_one_line(tmp_path):
    proc = bench(tmp_path / "missing", "-c", "8")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]
