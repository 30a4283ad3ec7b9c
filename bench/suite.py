"""itera-bench all: every measuring subcommand into one results folder, then the report.

The subcommands are found by name in the click group at run time (every command made with
`bench_command`, i.e. one that takes bundles and writes records), so a subcommand merged
later (memory, quality, energy, flops) is run without touching this file. Each runs in its
own process: a fresh process is what memory measures, and one that fails (no energy counter
here) cannot take the others down. Its rows go to NAME.jsonl; a failure's one-line reason
goes to NAME.err, which the report shows and the claims table uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# Report-level commands, not measurements.
NOT_MEASUREMENTS = {"all", "report", "claims", "compare"}

# Small defaults for the subcommands we know, so `all` finishes in minutes on 2 cores;
# depths come from the caller. Subcommands not listed run on their own defaults.
SMALL = {
    "latency": lambda depths: ["-p", "512", "-n", "32", "-pg", "512,32", "-d", ",".join(map(str, [0, *depths]))],
    "step": lambda depths: ["-n", "64", "-d", ",".join(map(str, depths))],
    "profile": lambda depths: ["-n", "64", "-d", str(depths[0])],
    # A renamed option makes that subcommand fail with a usage line, which the report shows
    # under "Not measured".
    "memory": lambda depths: ["-n", "16", "-d", ",".join(map(str, [0, *depths]))],
    "quality": lambda depths: ["--max-tokens", "32768"],
    "flops": lambda depths: ["-d", ",".join(map(str, [0, *depths]))],
    "energy": lambda depths: ["-p", "128", "-n", "64", "-d", "0", "--min-time", "1", "--idle", "2"],
    "serve": lambda depths: ["-c", "1,4,16", "-p", "128", "-n", "32", "--chat-turns", "10"],
}


def quantization_reference(bundles: list):
    """The first unquantized bundle another of the bundles was exported from (same checkpoint):
    the reference quality's KL rows are against; None when there is no such pair."""
    source = lambda b: (b.manifest.source_checkpoint or {}).get("model_sha256")  # noqa: E731
    for b in bundles:
        if b.quantization in ("none", "fp32") and source(b) and any(
                o is not b and source(o) == source(b) for o in bundles):
            return b
    return None


def measuring_commands(group) -> dict:
    """The group's commands that take bundles and write records, by name, in their order."""
    out = {}
    for name, cmd in group.commands.items():
        params = {p.name for p in cmd.params}
        if name not in NOT_MEASUREMENTS and {"bundles", "output"} <= params:
            out[name] = cmd
    return out


def run_all(bundles: list[str], results_dir: str | os.PathLike, threads: str = "1", repetitions: int = 3,
            depths: list[int] = (128, 2048), baseline: str | None = None, skip=(), only=None,
            options: dict[str, list[str]] | None = None, shared: dict[str, str] | None = None,
            log: Callable[[str], None] = lambda m: None) -> dict[str, str]:
    """Run each measuring subcommand on the bundles; returns {name: "ok" | error line}.

    options: arguments for a named subcommand, in place of its SMALL defaults; shared:
    {parameter name: value} passed to every subcommand that has that parameter (e.g. the
    pipeline's `data` to whichever subcommand reads text).
    """
    from .cli import main as group
    from .llamacpp import is_gguf

    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    status = {}
    for name, cmd in measuring_commands(group).items():
        if name in skip or (only is not None and name not in only):
            continue
        params = {p.name: p for p in cmd.params}
        # .gguf models (llama.cpp) go only to the subcommands that measure them
        models = [b for b in bundles if getattr(cmd.callback, "accepts_gguf", False) or not is_gguf(b)]
        if not models:
            continue
        args = [name, *models, "-o", "jsonl"]
        if "threads" in params:
            args += ["-t", threads]
        if "repetitions" in params:
            args += ["-r", str(repetitions)]
        if baseline and "baseline" in params:
            args += ["--baseline", baseline]
        if options and name in options:
            args += options[name]
        elif name in SMALL:
            args += SMALL[name](list(depths))
        for key, value in (shared or {}).items():
            flag = next((o for o in getattr(params.get(key), "opts", ()) if o.startswith("--")), None)
            if flag:
                args += [flag, str(value)]
        log(f"itera-bench {' '.join(args)}")
        proc = subprocess.run([sys.executable, "-m", "itera_bench.cli", *args], capture_output=True, text=True)
        err_file, rows_file = out / f"{name}.err", out / f"{name}.jsonl"
        if proc.returncode == 0 and proc.stdout.strip():
            tmp = rows_file.with_name(rows_file.name + ".tmp")
            tmp.write_text(proc.stdout)
            os.replace(tmp, rows_file)
            err_file.unlink(missing_ok=True)
            status[name] = "ok"
        else:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            reason = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else
                          f"exit status {proc.returncode}, no output")
            err_file.write_text(reason + "\n")
            rows_file.unlink(missing_ok=True)  # no stale rows from an earlier run beside a failure
            status[name] = reason
            log(f"{name}: {reason}")
    return status


def collect(results_dir: str | os.PathLike, status: dict[str, str]):
    """The records and the not-measured reasons of this run only (no stale files of an earlier one)."""
    from .report import load_results

    out = Path(results_dir)
    records, _ = load_results([out / f"{name}.jsonl" for name, s in status.items() if s == "ok"])
    return records, {name: s for name, s in status.items() if s != "ok"}
