"""Run an itera-bench subcommand on devices over ssh and bring the rows home.

Per host: one ssh connection; `agent probe` says what the device is and which of our
content-addressed objects (the base wheel, every bundle file, each manifest) its cache
lacks; only those are sent, as one tar stream; `agent prepare` lays out the bundle folders
and installs the wheel into a venv there (only when the wheel changed); then the same
`itera-bench SUBCOMMAND ... -o jsonl` runs there, and its rows come back with the host,
its CPU, cores, OS, Python and onnxruntime on each. Hosts run in parallel, each within its
profile's timeout; one host failing (unreachable, wrong key, slow, remote error) is
reported with its reason and the end of its stderr, and never touches the others' rows.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable
import time
from dataclasses import dataclass, field
from pathlib import Path

from itera_bench.invocation import Invocation
from itera_bench.record import Record, parse
from itera_runtime.bundle import MANIFEST_NAME, Bundle, sha256_file
from itera_runtime.provenance import git_commit

from . import agent
from .profiles import Profile, ProfileError, adhoc_profile, load_fleet, load_profile, with_host
from .ssh import Connection, SshError, tail_lines
from itera_runtime.errors import UsageError, UserError

LOCAL = "local"  # `--host local`: run here too, in the same table


class DeviceRunError(UserError):
    """A local step of a remote run failed (e.g. the wheel would not build); one line."""


ERRORS = (ProfileError, DeviceRunError)  # what the CLI turns into one `error:` line


# --------------------------------------------------------------------------- what to push


@dataclass
class Wheel:
    path: Path
    sha256: str
    source_commit: str | None

    @property
    def name(self) -> str:
        return self.path.name


def source_root() -> Path | None:
    """The itera-lite source tree this code runs from, or None for an install from a wheel."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "itera-lite"' in pyproject.read_text(encoding="utf-8"):
        return root
    return None


def _source_files(root: Path) -> list[Path]:
    from .profiles import tomllib

    with open(root / "pyproject.toml", "rb") as f:
        package_dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"].values()
    files = [root / "pyproject.toml", root / "README.md"]
    for d in sorted(set(package_dirs)):
        files += sorted(p for p in (root / d).rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    return files


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "itera-lite"


def base_wheel(build: bool = True) -> Wheel | None:
    """The base wheel (no torch) of the source tree, built once per source state; None without one
    (or, with build=False, when it is not built yet)."""
    root = source_root()
    if root is None:
        return None
    files = _source_files(root)
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    out = _cache_home() / "wheels" / h.hexdigest()[:16]
    found = sorted(out.glob("itera_lite-*.whl")) if out.is_dir() else []
    if not found and not build:
        return None
    if not found:
        with tempfile.TemporaryDirectory(prefix="itera-wheel-") as tmp:
            src = Path(tmp) / "src"
            for p in files:  # a copy: setuptools writes build/ and egg-info into the tree it builds
                dest = src / p.relative_to(root)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, dest)
            built = Path(tmp) / "wheel"
            # SOURCE_DATE_EPOCH pins the zip timestamps: the same source gives the same bytes, so
            # the device's content-addressed cache recognises it.
            env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}
            cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(built), str(src)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode:  # no index for the isolated build env (offline): this env's setuptools
                r = subprocess.run([*cmd, "--no-build-isolation"], capture_output=True, text=True, env=env)
            wheels = sorted(built.glob("itera_lite-*.whl"))
            if r.returncode or not wheels:
                raise DeviceRunError("could not build the itera-lite wheel to push: "
                                     + " | ".join(tail_lines(r.stderr + r.stdout, 3)))
            out.mkdir(parents=True, exist_ok=True)
            tmp_dest = out / f"{wheels[0].name}.{os.getpid()}.tmp"  # two runs building at once each write their own
            shutil.copy2(wheels[0], tmp_dest)
            os.replace(tmp_dest, out / wheels[0].name)
        found = sorted(out.glob("itera_lite-*.whl"))
    return Wheel(found[0], sha256_file(found[0]), git_commit())


class LazyWheel:
    """The base wheel, built by the first host that gets past its probe (so an unreachable host,
    or one whose Python or architecture is wrong, fails fast, and a fleet builds it once)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._done = False
        self._wheel: Wheel | None = None
        self._error: DeviceRunError | None = None

    def built(self) -> Wheel | None:
        """The wheel if it costs nothing now (built before, here or by an earlier run), else None."""
        with self._lock:
            if self._done:
                return self._wheel
        return base_wheel(build=False)

    def get(self) -> Wheel | None:
        with self._lock:
            if not self._done:
                try:
                    self._wheel = base_wheel()
                except DeviceRunError as e:
                    self._error = e
                self._done = True
        if self._error is not None:
            raise self._error
        return self._wheel


@dataclass
class BundleSpec:
    bundle: Bundle
    key: str  # the manifest's sha256 (first 16 hex): names the folder on the device
    files: dict[str, str]  # name in the bundle → sha256

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.bundle.path))


def bundle_spec(bundle: Bundle) -> BundleSpec:
    """What a verified bundle is made of: its listed files and the manifest, by content."""
    files = {name: entry.sha256 for name, entry in bundle.manifest.files.items()}
    msha = sha256_file(bundle.manifest_path)
    files[MANIFEST_NAME] = msha
    return BundleSpec(bundle, msha[:16], files)


def objects_of(wheel: Wheel | None, specs: list[BundleSpec]) -> dict[str, Path]:
    """sha256 → local file, for everything the device needs."""
    objects = {} if wheel is None else {wheel.sha256: wheel.path}
    for s in specs:
        for name, sha in s.files.items():
            objects.setdefault(sha, Path(s.bundle.path) / name)
    return objects


def _tar_feed(objects: dict[str, Path], shas: list[str]):
    def feed(stream) -> None:
        with tarfile.open(fileobj=stream, mode="w|") as tar:
            for sha in shas:
                path = objects[sha]
                info = tarfile.TarInfo(sha)
                info.size = path.stat().st_size
                info.mode = 0o444
                with open(path, "rb") as f:
                    tar.addfile(info, f)
    return feed


# --------------------------------------------------------------------------- one host


@dataclass
class HostResult:
    profile: Profile
    records: list[Record] = field(default_factory=list)
    error: str | None = None
    tail: list[str] = field(default_factory=list)
    uploaded_files: int = 0
    uploaded_bytes: int = 0
    cached_files: int = 0
    installed: bool = False
    seconds: float = 0.0
    facts: dict = field(default_factory=dict)


def _json(r, what: str) -> dict:
    try:
        return json.loads(r.stdout.decode("utf-8").strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SshError(f"{what}: unexpected output from the device", tail_lines(r.stderr)) from None


def agent_call(conn: Connection, command: str, *args: str, feed=None) -> dict:
    """Run one agent command with the profile's Python on the device; its JSON answer."""
    p = conn.profile
    r = conn.run([p.python, "-c", agent.script(), command, p.cache_dir, *args], feed=feed,
                 what=f"{p.python} (itera-devices agent {command})")
    return _json(r, f"agent {command}")


class HostRun:
    """Everything one host does; `kill()` stops it from another thread."""

    def __init__(self, profile: Profile, wheel: LazyWheel, specs: list[BundleSpec], invocation: Invocation,
                 requirement: str):
        self.profile = profile
        self.lazy_wheel = wheel
        self.wheel: Wheel | None = None
        self.specs = specs
        self.invocation = invocation
        self.option_files = invocation.files()  # option name → local file to push
        self.requirement = requirement
        self.result = HostResult(profile)
        self.conn: Connection | None = None
        self._killed = False

    def kill(self) -> None:
        self._killed = True
        if self.conn is not None:
            self.conn.kill()

    def _agent(self, command: str, *args: str, feed=None) -> dict:
        return agent_call(self.conn, command, *args, feed=feed)

    def run(self) -> HostResult:
        """Connect, push what is missing, prepare, bench, bring the rows back; never raises."""
        res, p = self.result, self.profile
        start = time.monotonic()
        try:
            self.conn = Connection(p, deadline=start + p.timeout_s)
            if self._killed:
                self.conn.kill()
            with self.conn:
                self.conn.connect()
                self.wheel = self.lazy_wheel.built()  # else built once the probe found the host usable
                shas = {k: sha256_file(f) for k, f in self.option_files.items()}
                prep = self._push_and_prepare(shas)
                there = {k: prep["files"][shas[k]] for k in self.option_files}
                remote_paths = [prep["bundles"][f"{s.key}/{s.name}"] for s in self.specs]
                remote_of = {os.path.normpath(str(s.bundle.path)): rp for s, rp in zip(self.specs, remote_paths)}
                for k, v in self.invocation.options.items():  # an option naming a bundle (quality --reference)
                    if k not in there and isinstance(v, str) and os.path.normpath(v) in remote_of and os.path.isdir(v):
                        there[k] = remote_of[os.path.normpath(v)]
                argv = self.invocation.replace(bundles=remote_paths, **there).argv()
                records = self._bench([prep["python"], "-m", "itera_devices.agent", "guard", prep["bench"], *argv])
                local_of = {rp: str(s.bundle.path) for rp, s in zip(remote_paths, self.specs)}
                res.records = [self._stamp(rec, local_of) for rec in records]
        except SshError as e:
            res.error, res.tail = str(e), e.tail
            if self._killed:
                res.error = "interrupted"
        except DeviceRunError as e:
            res.error = str(e)
        except Exception as e:  # noqa: BLE001  one host's surprise must not take the fleet's rows with it
            res.error = f"{type(e).__name__}: {e}"
        finally:
            res.seconds = time.monotonic() - start
        return res

    def _push_and_prepare(self, option_shas: dict[str, str]) -> dict:
        """Probe, send the objects the device lacks, lay out bundles and the venv; prepare's answer."""
        res, p = self.result, self.profile
        objects = objects_of(self.wheel, self.specs)
        objects.update({option_shas[i]: f for i, f in self.option_files.items()})
        facts = res.facts = self._agent("probe", *objects)
        if p.arch and facts["machine"] != p.arch:
            raise SshError(f"{p.host} is {facts['machine']}, but profile {p.name} expects {p.arch} "
                           f"(wrong host in {p.source}?)")
        if not facts["python_ok"]:
            raise SshError(f"{p.python} on {p.host} is Python {facts['python']}; itera-lite needs "
                           f"{'.'.join(map(str, agent.MIN_PYTHON))} or newer (set `python` in the profile)")
        missing = facts["missing"]
        if self.wheel is None:
            self.wheel = self.lazy_wheel.get()
            if self.wheel is not None:
                objects[self.wheel.sha256] = self.wheel.path
                missing += self._agent("missing", self.wheel.sha256)["missing"]
        res.cached_files = len(objects) - len(missing)
        if missing:
            got = self._agent("receive", feed=_tar_feed(objects, missing))
            res.uploaded_files, res.uploaded_bytes = got["received"], got["bytes"]
        spec = {
            "wheel": None if self.wheel is None else {"sha256": self.wheel.sha256, "name": self.wheel.name},
            "requirement": self.requirement,
            "bundles": [{"key": s.key, "name": s.name, "files": s.files} for s in self.specs],
            "files": [{"sha256": option_shas[i], "name": f.name} for i, f in self.option_files.items()],
            "pip_args": p.pip_args,
            "system_site_packages": p.system_site_packages,
        }
        prep = self._agent("prepare", json.dumps(spec))
        res.installed = prep["installed"]
        facts["onnxruntime"] = prep["onnxruntime"]
        return prep

    def _bench(self, argv: list[str]) -> list[Record]:
        """The device's itera-bench; its JSON-lines rows."""
        p = self.profile
        r = self.conn.run(argv, check=False, hold_stdin=True)
        if r.returncode not in (0, 130):  # 130: Ctrl-C there, rows so far are marked interrupted
            raise SshError(f"itera-bench {self.invocation.name} exited {r.returncode} on {p.host}", tail_lines(r.stderr))
        # rows only: a login script that echoes something must not break the parse
        rows = [ln for ln in r.stdout.decode("utf-8", "replace").splitlines() if ln.startswith("{")]
        try:
            return parse("\n".join(rows), "jsonl")
        except (ValueError, TypeError) as e:
            raise SshError(f"itera-bench on {p.host} printed rows that do not parse ({e})",
                           tail_lines(r.stderr)) from None

    def _stamp(self, rec: Record, local_of: dict[str, str]) -> Record:
        """The host and what it is on the row; the bundle as the user named it here."""
        f, p = self.result.facts, self.profile
        remote = rec.bundle
        rec.bundle = local_of.get(remote, remote)
        rec.host = p.name
        rec.cpu_info = rec.cpu_info or f.get("cpu")
        if rec.build_commit is None and self.wheel is not None:
            rec.build_commit = self.wheel.source_commit  # the device has no git: the wheel's source
        rec.provenance = {
            **rec.provenance,
            "host": {"name": p.name, "ssh": p.host, "machine": f.get("machine"), "cpu": f.get("cpu"),
                     "cores": f.get("cores"), "os": f.get("os"), "system": f.get("system"),
                     "python": f.get("python"), "onnxruntime": f.get("onnxruntime"), "remote_bundle": remote},
            "wheel": None if self.wheel is None else {"name": self.wheel.name, "sha256": self.wheel.sha256},
            "push": {"files": self.result.uploaded_files, "bytes": self.result.uploaded_bytes,
                     "already_there": self.result.cached_files, "installed": self.result.installed},
        }
        return rec


# --------------------------------------------------------------------------- fleets


def select_devices(hosts: tuple[str, ...], profiles: tuple[str, ...], fleet: str | None) -> tuple[list[Profile], bool]:
    """The devices a command line names, and whether `--host local` asks for a local run too."""
    out: list[Profile] = []
    local = LOCAL in hosts
    hosts = tuple(h for h in hosts if h != LOCAL)
    named = [load_profile(n) for n in profiles]
    if named and hosts:
        if len(named) != 1 or len(hosts) != 1:
            raise ProfileError("--host with --device-profile points one profile at one host; "
                               "for several devices use a --fleet file")
        named = [with_host(named[0], hosts[0])]
        hosts = ()
    out += named + [adhoc_profile(h) for h in hosts]
    if fleet:
        out += load_fleet(fleet)
    names = [p.name for p in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ProfileError(f"device {dup!r} is named twice")
    return out, local


def run_hosts(profiles: list[Profile], bundles: list[Bundle], invocation_for: Callable[[Profile], Invocation],
              log=None) -> tuple[list[HostResult], bool]:
    """Every host in parallel, each running its invocation; (results in profile order, interrupted by Ctrl-C)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    wheel = LazyWheel()
    from importlib import metadata

    requirement = f"itera-lite=={metadata.version('itera-lite')}"
    specs = [bundle_spec(b) for b in bundles]
    runs = [HostRun(p, wheel, specs, invocation_for(p), requirement) for p in profiles]
    interrupted = False

    def report(res: HostResult) -> None:  # as each host finishes, so a long fleet shows progress
        p = res.profile
        name = f"{p.name} ({p.host})" if p.name != p.host else p.host
        if res.error:
            log(f"error: {name}: {res.error}")
            for line in res.tail:
                log(f"  | {line}")
        else:
            log(f"{name}: {len(res.records)} row(s) in {res.seconds:.1f} s; pushed {res.uploaded_files} file(s), "
                f"{res.uploaded_bytes:,} bytes ({res.cached_files} already there); "
                f"{'installed the wheel' if res.installed else 'venv up to date'}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(runs))) as pool:
        futures = {pool.submit(r.run): r for r in runs}
        pending = set(futures)
        try:
            while pending:  # short waits: the main thread must stay able to take Ctrl-C
                done, pending = concurrent.futures.wait(pending, timeout=0.2)
                for f in done:
                    report(f.result())
        except KeyboardInterrupt:
            interrupted = True
            for r in runs:
                r.kill()
    for f in pending:
        report(f.result())
    results = [r.result for r in runs]
    return results, interrupted


def merged_records(results: list[HostResult]) -> list[Record]:
    return [r for res in results for r in res.records]


def device_invocation(invocation: Invocation, profile: Profile) -> Invocation:
    """What runs on the device: the invocation typed here as JSON lines, without the device
    options and the baseline (ratios are made here), with the profile's `threads` and `energy`
    where the command line gave none."""
    mine: dict = {"hosts": (), "device_profiles": (), "fleet": None, "baseline": None, "output": "jsonl"}
    if profile.threads and "threads" not in invocation.given:
        mine["threads"] = list(profile.threads)
    if profile.energy and "energy_backend" in invocation.options and "energy_backend" not in invocation.given:
        mine["energy_backend"] = profile.energy  # the profile says which counter the device has
    return invocation.replace(**mine)


def bench_on_devices(invocation: Invocation, bundles: list[Bundle], devices: list[Profile]) -> tuple[list[Record], int]:
    """Run `invocation` on each device; (their rows, exit code: 0, 1 = a host failed, 130)."""
    others = [b for b in bundles if not isinstance(b, Bundle)]
    if others:  # a .gguf model (llama.cpp) needs llama-cpp-python built on the device: not pushed
        raise UsageError(f"{getattr(others[0], 'path', others[0])}: only itera bundles run on devices "
                         "(--host/--device-profile/--fleet); measure .gguf files locally")
    results, interrupted = run_hosts(devices, bundles, lambda p: device_invocation(invocation, p))
    code = 130 if interrupted else (1 if any(r.error for r in results) else 0)
    return merged_records(results), code
