"""What made a result: versions, git commit, CPU, threads, command line (STYLE rule 5).

Lives in the runtime (the base install, no torch) so that every stage may import it:
training and export record it in checkpoints and manifests, bench on every row.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

_PACKAGES = ("itera-lite", "numpy", "onnxruntime", "tokenizers", "torch", "onnx", "transformers", "optimum-onnx")


def package_versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (imports nothing, so no torch on a Pi)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """Commit of the source tree this code runs from, with '+dirty' when it has changes."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _first_line(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").replace("\x00", "").strip().splitlines()[0].strip() or None
    except (OSError, IndexError):
        return None


def board(root: str | os.PathLike = "/") -> dict:
    """The board this runs on, as far as it says: model and revision (device tree, /proc/cpuinfo),
    OS, CPU frequency governor, cooling devices and their state. Only what exists is a key.

    root: where /proc, /sys and /etc are (a test tree)."""
    root = Path(root)
    out: dict = {}
    model = _first_line(root / "proc" / "device-tree" / "model") or _first_line(root / "sys" / "firmware" / "devicetree" / "base" / "model")
    if model:
        out["model"] = model
    try:
        for line in (root / "proc" / "cpuinfo").read_text().splitlines():
            if line.startswith("Revision"):
                out["revision"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        release = dict(line.split("=", 1) for line in (root / "etc" / "os-release").read_text().splitlines() if "=" in line)
        if "PRETTY_NAME" in release:
            out["os"] = release["PRETTY_NAME"].strip().strip('"')
    except OSError:
        pass
    governors = sorted({g for p in (root / "sys" / "devices" / "system" / "cpu" / "cpufreq").glob("policy*")
                        if (g := _first_line(p / "scaling_governor"))})
    if governors:
        out["governor"] = ",".join(governors)
    cooling = []
    for dev in sorted((root / "sys" / "class" / "thermal").glob("cooling_device*")):
        kind, cur, top = (_first_line(dev / n) for n in ("type", "cur_state", "max_state"))
        if kind and cur is not None:
            cooling.append(f"{kind} {cur}/{top}" if top else f"{kind} {cur}")
    if cooling:
        out["cooling"] = cooling
    return out


def provenance(threads: int | None = None) -> dict:
    """The record every result file carries."""
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "hostname": platform.node(),
        "board": board(),
    }
