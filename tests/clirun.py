"""Run a click command in this process the way its console script runs it.

A subprocess costs a Python start and a torch import (5-15 s on 2 cores) and proves nothing
more for a command's own error handling, which lives inside the click command. Exceptions
that are not SystemExit propagate: a bug fails the test with its traceback.
"""

from __future__ import annotations

import subprocess

from click.testing import CliRunner


def invoke(command, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """exit code, stdout and stderr of `command ARGS` as a CompletedProcess."""
    argv = [str(a) for a in args]
    result = CliRunner().invoke(command, argv, env=env, catch_exceptions=False)
    return subprocess.CompletedProcess(argv, result.exit_code, result.stdout, result.stderr)


def bench(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`itera-bench ARGS` in this process."""
    from itera_bench.cli import main

    return invoke(main, *args, env=env)


def one_error_line(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    """The one `error: ` line of a failed command (progress lines "· ..." may come before it), no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("· ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]
