"""A real OpenSSH server on a loopback port, for the device tests (no mocks).

Each `Sshd` has its own host key, authorized key, config and known_hosts. The "device" is
this machine: its login shell gets `PYTHONPATH` pointing at a folder that holds only the
base install's dependencies (linked from the running environment, never itera-lite itself),
like a board whose numpy and onnxruntime came with the system, and `PIP_NO_INDEX` with pip's
config files switched off, so installing into the device's venv cannot download anything
(torch least of all): if the wheel needed a package the device lacks, the test fails.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SSH_PACKAGES = ["openssh-server", "openssh-client"]


def required() -> bool:
    """Under CI a missing sshd is a failure; elsewhere the device tests skip with the reason."""
    return bool(os.environ.get("CI") or os.environ.get("ITERA_REQUIRE_SSHD"))


def ensure_sshd() -> str | None:
    """Make sshd and the ssh client available; None when they are, else why they cannot be.

    The README's test command is all the set-up a new user runs, so a root shell with apt
    gets openssh-server installed here (once, about 30 s); ITERA_NO_APT=1 turns that off."""
    if os.path.exists(SSHD) and have_ssh_client():
        return None
    apt = shutil.which("apt-get")
    if os.environ.get("ITERA_NO_APT"):
        return f"{SSHD} or ssh is missing and ITERA_NO_APT is set: apt-get install -y {' '.join(SSH_PACKAGES)}"
    if apt is None or os.geteuid() != 0:
        why = "not root" if apt else "no apt-get"
        return f"{SSHD} or ssh is missing and cannot be installed here ({why}): install openssh-server"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"\ninstalling {' '.join(SSH_PACKAGES)} with apt-get for the device tests ...", file=sys.stderr, flush=True)
    install = [apt, "install", "-y", "-qq", "--no-install-recommends", *SSH_PACKAGES]
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run([apt, "update", "-qq"], env=env, capture_output=True, text=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not os.path.exists(SSHD):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"apt-get install {' '.join(SSH_PACKAGES)} failed: {tail[0]}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "itera-test", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


def base_dependency_site(dest: Path) -> Path:
    """A folder of links to the installed base dependencies of itera-lite, and nothing else."""
    from packaging.requirements import Requirement

    dest.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    todo = [Requirement(r) for r in metadata.requires("itera-lite") or []]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = req.name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(req.name)
        site = Path(dist.locate_file(""))
        for f in dist.files or []:
            top = Path(f).parts[0]
            if top == ".." or top.endswith(".pth") or top == "__pycache__":
                continue
            link = dest / top
            if not link.exists():
                link.symlink_to(site / top)
        todo += [Requirement(r) for r in dist.requires or []]
    return dest


class Sshd:
    """sshd -D on 127.0.0.1:PORT with throwaway keys; `profile()` writes a profile that reaches it."""

    def __init__(self, root: Path, site: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host_pub = keygen(root / "host_ed25519")
        self.client_key = root / "client_ed25519"
        (root / "authorized_keys").write_text(keygen(self.client_key) + "\n")
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.host_pub}\n")
        self.log = root / "sshd.log"
        self.config = root / "sshd_config"
        self.config.write_text(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {root / 'host_ed25519'}
AuthorizedKeysFile {root / 'authorized_keys'}
PidFile {root / 'sshd.pid'}
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
LogLevel VERBOSE
SetEnv PYTHONPATH={site} PIP_NO_INDEX=1 PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if not os.path.exists(SSHD):
            raise RuntimeError(f"{SSHD} not found: install openssh-server (apt-get install -y openssh-server)")
        try:
            os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory (root only)
        except OSError:
            pass  # not root: sshd says what it lacks, and start() fails with its log
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdout=log, stderr=log)
        for _ in range(200):
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {self.log.read_text()[-500:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("sshd did not start listening in 10 s")

    def stop(self) -> None:
        """Kill the listener and every session it forked (an outage, not a clean shutdown)."""
        if self.proc is None:
            return
        import psutil

        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        self.proc.send_signal(signal.SIGKILL)
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=10)
        self.proc = None

    def processes(self) -> list:
        """Everything running under this sshd (sessions and their commands)."""
        import psutil

        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def logins(self) -> int:
        return self.log.read_text(errors="replace").count("Accepted publickey")

    def profile(self, path: Path, name: str, cache: Path, **extra) -> Path:
        """A profile TOML reaching this server; `extra` fields override."""
        fields = {
            "name": name,
            "host": f"{getpass.getuser()}@127.0.0.1",
            "port": self.port,
            "identity_file": str(self.client_key),
            "ssh_options": [f"UserKnownHostsFile={self.known_hosts}", "GlobalKnownHostsFile=/dev/null"],
            "python": os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
            "cache_dir": str(cache),
            "threads": [1],
            "arch": os.uname().machine,
        }
        fields.update(extra)
        lines = []
        for k, v in fields.items():
            if isinstance(v, str):
                lines.append(f"{k} = {_toml_str(v)}")
            elif isinstance(v, list):
                lines.append(f"{k} = [" + ", ".join(_toml_str(x) if isinstance(x, str) else str(x) for x in v) + "]")
            else:
                lines.append(f"{k} = {str(v).lower() if isinstance(v, bool) else v}")
        path.write_text("\n".join(lines) + "\n")
        return path


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def have_ssh_client() -> bool:
    return shutil.which("ssh") is not None and shutil.which("ssh-keygen") is not None
