"""An itera-serve process on a free loopback port, for `itera-bench serve` and the tests.

The server is started with `--port 0` and says which port it got on its first line, so no
port is ever guessed (and raced for); its stderr is kept for the caller's error message.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from .errors import UserError

__all__ = ["ServerProcess"]

_LISTENING = re.compile(r"listening on (http://\S+)")


class ServerProcess:
    """`itera-serve BUNDLES... --port 0 ARGS` as a child process; `.url` once it listens."""

    def __init__(self, bundles: Sequence[str], args: Sequence[str] = (), timeout_s: float = 120.0,
                 env: dict | None = None):
        self.command = [sys.executable, "-m", "itera_runtime.serve", *map(str, bundles), "--host", "127.0.0.1",
                        "--port", "0", *map(str, args)]
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        ready = threading.Event()
        self.url = ""

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                m = _LISTENING.search(line)
                if m and not self.url:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.1):
            if time.monotonic() > deadline:
                self.stop()
                raise UserError(f"itera-serve did not start within {timeout_s:g} s")
        if not self.url:
            self.proc.wait(timeout=10)
            last = next((ln for ln in reversed(self.lines) if ln.strip()), f"exit status {self.proc.returncode}")
            raise UserError(f"itera-serve did not start: {last.removeprefix('error: ')}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL past `timeout_s`; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def peak_rss_bytes(self) -> int | None:
        """The server's own peak resident memory so far (VmHWM), where /proc has it."""
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
