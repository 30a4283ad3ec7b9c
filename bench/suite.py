"""itera-bench all: measuring subcommands into one results folder, each in its own process.

A fresh process is what memory measures, and one that fails (no energy counter here) cannot
take the others down. Its rows go to NAME.jsonl; a failure's one-line reason goes to
NAME.err, which the report shows and the claims table uses. What runs is a list of
`Invocation`s (`itera_bench.cli.suite` builds the list `all` runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from itera_runtime.owned import NotOursError, check_in_the_way, record

from .invocation import Invocation


def quantization_reference(bundles: list):
    """The first unquantized bundle another of the bundles was exported from (same checkpoint):
    the reference quality's KL rows are against; None when there is no such pair."""
    source = lambda b: (b.manifest.source_checkpoint or {}).get("model_sha256")  # noqa: E731
    for b in bundles:
        if b.quantization in ("none", "fp32") and source(b) and any(
                o is not b and source(o) == source(b) for o in bundles):
            return b
    return None


def run_all(invocations: list[Invocation], results_dir: str | os.PathLike,
            log: Callable[[str], None] = lambda m: None) -> dict[str, str]:
    """Run each invocation (with -o jsonl) in a fresh process; returns {name: "ok" | error line}."""
    out = Path(results_dir)
    check_results_folder(out, invocations)
    out.mkdir(parents=True, exist_ok=True)
    status = {}
    for inv in invocations:
        name, argv = inv.name, inv.replace(output="jsonl").argv()
        log(f"itera-bench {' '.join(argv)}")
        proc = subprocess.run([sys.executable, "-m", "itera_bench.cli", *argv], capture_output=True, text=True)
        err_file, rows_file = out / f"{name}.err", out / f"{name}.jsonl"
        check_in_the_way(out, [err_file.name, rows_file.name], "itera-bench all")  # a user's file may have arrived
        if proc.returncode == 0 and proc.stdout.strip():
            fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{rows_file.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(proc.stdout)
            os.chmod(tmp, 0o644)
            os.replace(tmp, rows_file)
            err_file.unlink(missing_ok=True)
            record(out, [rows_file.name], removed=[err_file.name])
            status[name] = "ok"
        else:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            reason = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else
                          f"exit status {proc.returncode}, no output")
            err_file.write_text(reason + "\n")
            rows_file.unlink(missing_ok=True)  # no stale rows from an earlier run beside a failure
            record(out, [err_file.name], removed=[rows_file.name])
            status[name] = reason
            log(f"{name}: {reason}")
    return status


def check_results_folder(results_dir: str | os.PathLike, invocations: list[Invocation]) -> None:
    """Refuse, before any measuring, a results folder holding NAME.jsonl / NAME.err files we did not write."""
    out = Path(results_dir)
    if out.exists() and not out.is_dir():
        raise NotOursError(f"{out}: a file, not a results folder")
    check_in_the_way(out, [f"{inv.name}{ext}" for inv in invocations for ext in (".jsonl", ".err")],
                     "itera-bench all")


def collect(results_dir: str | os.PathLike, status: dict[str, str]):
    """The records and the not-measured reasons of this run only (no stale files of an earlier one)."""
    from .results import load_results

    out = Path(results_dir)
    records, _ = load_results([out / f"{name}.jsonl" for name, s in status.items() if s == "ok"])
    return records, {name: s for name, s in status.items() if s != "ok"}
