"""The system OpenSSH client, one shared connection per host, strict host keys.

We call `ssh` rather than a Python ssh library so that what users set up for ssh works
unchanged: ~/.ssh/config aliases, the agent, ProxyJump, known_hosts. One master connection
per host (ControlMaster) carries every step of a run. StrictHostKeyChecking=yes and
BatchMode=yes are given on the command line, where they beat any config file: an unknown
or changed host key, or a login that would need a password, is one clear error.

Remote commands are argument lists joined with shlex.quote: the device's shell sees each
argument as one word, whatever quotes, spaces or `$(...)` it holds.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from .profiles import Profile
from itera_runtime.errors import UserError

TAIL_LINES = 12
CONNECT_TIMEOUT_S = 15


class SshError(UserError):
    """A host could not be reached or a remote step failed; `tail` is the end of its stderr."""

    def __init__(self, message: str, tail: list[str] | None = None):
        super().__init__(message)
        self.tail = tail or []


def tail_lines(text: str, n: int = TAIL_LINES) -> list[str]:
    """The last n non-empty lines (progress bars rewrite with \\r: each redraw is a line)."""
    lines = [ln.rstrip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    return lines[-n:]


def explain(stderr: str, target: str, port: int | None = None) -> str:
    """One line saying why ssh itself failed (exit 255), from what ssh printed."""
    retry = f"ssh -p {port} {target}" if port else f"ssh {target}"
    where = f"{target} port {port}" if port else target
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        return (f"host key of {where} has CHANGED since it was stored in known_hosts (a reinstalled device, or "
                "someone in between): check it, then remove the old key with `ssh-keygen -R HOST`")
    if "Host key verification failed" in stderr or "host key is known" in stderr:
        return (f"host key of {where} is not in known_hosts and strict checking is on: run `{retry}` once, "
                "check the fingerprint, accept it, then retry")
    if "Connection refused" in stderr:
        return f"connection refused by {where} (no ssh server listening there?)"
    if "timed out" in stderr:
        return f"connection to {where} timed out"
    if "Could not resolve hostname" in stderr or "Name or service not known" in stderr:
        return f"cannot resolve the host name of {target}"
    if "Permission denied" in stderr:
        return (f"login to {where} refused (key not accepted; passwords are not asked for: "
                "use a key, e.g. `ssh-copy-id`)")
    last = tail_lines(stderr, 1)
    return f"ssh to {where} failed: {last[0] if last else 'no message'}"


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str


class Connection:
    """ssh to one profile's host, sharing one master connection; use as a context manager."""

    def __init__(self, profile: Profile, deadline: float | None = None):
        self.profile = profile
        self.deadline = deadline  # time.monotonic() after which every step is killed
        self._dir = tempfile.mkdtemp(prefix="itd-")  # short: unix socket paths are limited to ~100 bytes
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.closed = False

    # -- ssh command lines ------------------------------------------------------------
    def _options(self, master: bool) -> list[str]:
        p = self.profile
        opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"ControlPath={self._dir}/%C",
                "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
                "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3"]
        opts += ["-o", "ControlMaster=yes", "-o", "ControlPersist=120"] if master else ["-o", "ControlMaster=no"]
        if p.port:
            opts += ["-p", str(p.port)]
        if p.identity_file:
            opts += ["-i", os.path.expanduser(p.identity_file), "-o", "IdentitiesOnly=yes"]
        for o in p.ssh_options:
            opts += ["-o", o]
        return opts

    def ssh_argv(self, remote: list[str]) -> list[str]:
        """The local argv that runs `remote` (an argument list) on the device."""
        return ["ssh", *self._options(False), "--", self.profile.host, shlex.join(remote)]

    # -- running ------------------------------------------------------------------------
    def _remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def _popen(self, argv: list[str], feed: Callable[[IO[bytes]], None] | None, hold_stdin: bool = False) -> Result:
        if shutil.which(argv[0]) is None:
            raise SshError(f"no `{argv[0]}` on this machine (install the OpenSSH client)")
        if self.closed:
            raise SshError("interrupted")
        remaining = self._remaining()
        if remaining is not None and remaining <= 0:
            raise SshError(f"timed out after {self.profile.timeout_s:.0f} s (the profile's timeout_s)")
        # Files, not pipes, for the output: nothing blocks while we feed stdin.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if feed or hold_stdin else subprocess.DEVNULL,
                                    stdout=out, stderr=err)
            with self._lock:
                self._procs.add(proc)
                if self.closed:  # kill() ran between the check above and now
                    proc.kill()
            timer = threading.Timer(remaining, proc.kill) if remaining is not None else None
            if timer:
                timer.daemon = True
                timer.start()
            try:
                if feed:
                    try:
                        feed(proc.stdin)
                    except (BrokenPipeError, OSError):
                        pass  # the remote side stopped reading: its stderr says why
                    finally:
                        try:
                            proc.stdin.close()
                        except OSError:
                            pass
                proc.wait()
            finally:
                if hold_stdin:
                    proc.stdin.close()
                if timer:
                    timer.cancel()
                with self._lock:
                    self._procs.discard(proc)
            out.seek(0)
            err.seek(0)
            stderr = err.read().decode("utf-8", "replace")
            timed_out = self.deadline is not None and time.monotonic() >= self.deadline
            if timed_out and proc.returncode != 0:
                raise SshError(f"timed out after {self.profile.timeout_s:.0f} s (the profile's timeout_s)",
                               tail_lines(stderr))
            if self.closed and proc.returncode != 0:
                raise SshError("interrupted", tail_lines(stderr))
            return Result(proc.returncode, out.read(), stderr)

    def connect(self) -> None:
        """Open the master connection (authenticates once; host key checked here)."""
        argv = ["ssh", *self._options(True), "-N", "-f", "--", self.profile.host]
        r = self._popen(argv, None)
        if r.returncode != 0:
            raise SshError(explain(r.stderr, self.profile.host, self.profile.port), tail_lines(r.stderr))

    def run(self, remote: list[str], feed: Callable[[IO[bytes]], None] | None = None,
            what: str | None = None, check: bool = True, hold_stdin: bool = False) -> Result:
        """Run an argument list on the device; a failure is an SshError with its stderr tail.

        hold_stdin: keep the remote stdin open until the command ends, so that a remote
        `agent guard` sees it close when this client goes away.
        """
        r = self._popen(self.ssh_argv(remote), feed, hold_stdin)
        if r.returncode == 255:  # ssh's own failure (the connection), not the command's
            raise SshError(explain(r.stderr, self.profile.host, self.profile.port), tail_lines(r.stderr))
        if check and r.returncode != 0:
            raise SshError(f"{what or remote[0]} exited {r.returncode} on {self.profile.host}",
                           tail_lines(r.stderr))
        return r

    def kill(self) -> None:
        """Stop every running step now (Ctrl-C, fleet shutdown)."""
        self.closed = True
        with self._lock:
            for proc in list(self._procs):
                proc.kill()

    def close(self) -> None:
        """Close the master connection and its socket folder."""
        subprocess.run(["ssh", *self._options(False), "-O", "exit", "--", self.profile.host],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
        shutil.rmtree(self._dir, ignore_errors=True)  # our own mkdtemp folder

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        except (OSError, subprocess.SubprocessError):
            shutil.rmtree(self._dir, ignore_errors=True)
