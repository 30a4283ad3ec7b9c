"""The device side of a remote run: a stdlib-only script that ssh hands to the device's Python.

It is sent as `python3 -c SCRIPT COMMAND ARGS...` (see `script()`), after the source of
itera_runtime.provenance, so the device describes itself (CPU, versions) by the same rules
as every local record, before anything of ours is installed there. Commands:

    probe CACHE [SHA256...]     what the device is and has; which objects the cache lacks
    wheels CACHE                the newest onnxruntime wheel pip finds for this Python
    receive CACHE               a tar stream of objects named by their sha256 on stdin
    prepare CACHE SPEC_JSON     bundle folders from objects, the venv, the wheel installed
    guard COMMAND...            run COMMAND until ssh goes away (from the venv: -m itera_devices.agent)

Everything it prints on stdout is one JSON object; pip and errors go to stderr. The cache
(default ~/.cache/itera-lite) holds `objects/<sha256>` (read-only, content-addressed),
`bundles/<manifest sha>/<name>/` (hard links to objects), `wheels/` and one venv per
Python version and architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tarfile

try:  # sent to the device after provenance.py (see script()); imported here, from the package
    cpu_model, package_versions  # noqa: B018
except NameError:
    from itera_runtime.provenance import cpu_model, package_versions

MIN_PYTHON = (3, 10)
_HEX = set("0123456789abcdef")


def _fail(message):
    sys.stderr.write("error: " + message + "\n")
    sys.exit(2)


def _is_sha(name):
    return len(name) == 64 and set(name) <= _HEX


def _cache(path):
    root = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.join(root, "objects"), exist_ok=True)
    return root


def _os_name():
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def venv_dir(root):
    return os.path.join(root, "venv-py%d.%d-%s" % (sys.version_info[0], sys.version_info[1], platform.machine()))


def _venv_python(venv):
    return os.path.join(venv, "bin", "python")


def _venv_state(root):
    venv = venv_dir(root)
    state = {"path": venv, "exists": os.path.isfile(_venv_python(venv)), "wheel": None, "onnxruntime": None}
    if state["exists"]:
        try:
            with open(os.path.join(venv, "itera-wheel.sha256")) as f:
                state["wheel"] = f.read().strip()
        except OSError:
            pass
        out = subprocess.run([_venv_python(venv), "-c", "import importlib.metadata as m; print(m.version('onnxruntime'))"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True)
        state["onnxruntime"] = out.stdout.strip() or None
    return state


def _energy():
    """Which energy counters this login can read (the bench's energy backends)."""
    out = {}
    rapl = "/sys/class/powercap/intel-rapl:0/energy_uj"
    if not os.path.exists(rapl):
        out["powercap"] = "absent"
    else:
        try:
            with open(rapl) as f:
                f.read()
            out["powercap"] = "readable"
        except OSError:
            out["powercap"] = "present, not readable by this user"
    vc = shutil.which("vcgencmd")
    if not vc:
        out["pi5-pmic"] = "absent (no vcgencmd)"
    else:
        r = subprocess.run([vc, "pmic_read_adc"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
        if r.returncode == 0 and "current" in r.stdout.lower():
            out["pi5-pmic"] = "readable"
        else:
            out["pi5-pmic"] = "vcgencmd present, pmic_read_adc failed: " + (r.stderr or r.stdout).strip()[:120]
    perf = shutil.which("perf")
    try:
        with open("/proc/sys/kernel/perf_event_paranoid") as f:
            paranoid = f.read().strip()
    except OSError:
        paranoid = "?"
    if not perf:
        out["perf"] = "absent (no perf)"
    elif os.geteuid() == 0 or (paranoid.lstrip("-").isdigit() and int(paranoid) <= 0):
        out["perf"] = "readable"  # system-wide power/energy-* events need root or paranoid <= 0
    else:
        out["perf"] = "perf present, perf_event_paranoid=%s (energy events need <= 0 or root)" % paranoid
    return out


def probe(root, shas):
    root = _cache(root)
    usage = shutil.disk_usage(root)
    try:
        import ensurepip  # noqa: F401  (Debian splits venv/ensurepip into python3-venv)
        has_venv = True
    except ImportError:
        has_venv = False
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL).returncode == 0
    return {
        "machine": platform.machine(),
        # a 64-bit kernel under a 32-bit userland (older Raspberry Pi OS) says aarch64 above
        "python_bits": struct.calcsize("P") * 8,
        "python": platform.python_version(),
        "python_ok": sys.version_info[:2] >= MIN_PYTHON,
        "executable": sys.executable,
        "os": _os_name(),
        "system": "%s %s" % (platform.system(), platform.release()),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "hostname": platform.node(),
        "cache": root,
        "free_bytes": usage.free,
        "venv_module": has_venv,
        "pip": has_pip,
        "missing": _missing(root, shas),
        "venv": _venv_state(root),
        "energy": _energy(),
        "packages": package_versions(),  # the device Python's own, outside our venv
    }


def _missing(root, shas):
    return [s for s in shas if _is_sha(s) and not os.path.isfile(os.path.join(root, "objects", s))]


def missing(root, shas):
    """Which of these objects the cache lacks (probe's answer without the rest)."""
    return {"missing": _missing(_cache(root), shas)}


def wheels(root):
    """Whether pip finds an onnxruntime wheel for this Python and architecture (`pip index`)."""
    venv = _venv_python(venv_dir(_cache(root)))
    python = venv if os.path.isfile(venv) else sys.executable
    try:
        r = subprocess.run([python, "-m", "pip", "index", "versions", "onnxruntime"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    except subprocess.TimeoutExpired:
        return {"onnxruntime_wheel": None, "detail": "pip index timed out after 120 s (no network?)"}
    first = r.stdout.strip().splitlines()[:1]
    if r.returncode == 0 and first and "(" in first[0]:
        return {"onnxruntime_wheel": first[0].split("(", 1)[1].rstrip(")"), "detail": "pip index, " + python}
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR")] or r.stderr.strip().splitlines()[-1:]
    return {"onnxruntime_wheel": None, "detail": (errors[0] if errors else "pip index failed") + " (" + python + ")"}


def receive(root):
    """Objects from a tar stream, each checked against its name before it enters the cache."""
    root = _cache(root)
    objects = os.path.join(root, "objects")
    count = nbytes = 0
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
        for member in tar:
            if not member.isfile() or not _is_sha(member.name):
                _fail("refusing tar member %r (objects are regular files named by sha256)" % member.name)
            src = tar.extractfile(member)
            tmp = os.path.join(objects, ".incoming-%d-%s" % (os.getpid(), member.name))
            digest = hashlib.sha256()
            with open(tmp, "wb") as f:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if digest.hexdigest() != member.name:
                os.unlink(tmp)
                _fail("object %s arrived corrupted (sha256 %s)" % (member.name, digest.hexdigest()))
            os.chmod(tmp, 0o444)  # read-only: bundle folders hard-link these
            os.replace(tmp, os.path.join(objects, member.name))
            count += 1
            nbytes += member.size
    return {"received": count, "bytes": nbytes}


def _safe_name(name, what):
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in name:
        _fail("unsafe %s %r" % (what, name))
    return parts


def _place(root, sha, dest):
    """dest becomes the object `sha` (a hard link, or a copy where links are refused)."""
    src = os.path.join(root, "objects", sha)
    if not os.path.isfile(src):
        _fail("object %s is not in the cache (upload incomplete?)" % sha)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def _bundle(root, spec):
    _safe_name(spec["name"], "bundle name")
    if "/" in spec["name"] or not spec["key"].isalnum():
        _fail("unsafe bundle name %r" % spec["name"])
    final = os.path.join(root, "bundles", spec["key"], spec["name"])
    if not os.path.isdir(final):  # content-addressed: an existing folder already holds these bytes
        tmp = os.path.join(root, "bundles", spec["key"], ".tmp-%d" % os.getpid())
        shutil.rmtree(tmp, ignore_errors=True)  # our own temp folder, named by our pid
        for rel, sha in spec["files"].items():
            _safe_name(rel, "bundle file")
            _place(root, sha, os.path.join(tmp, rel))
        os.replace(tmp, final)
    return final


def _pip(venv, args):
    cmd = [_venv_python(venv), "-m", "pip", "--disable-pip-version-check", "--no-input"] + args
    sys.stderr.write("+ " + " ".join(cmd) + "\n")
    sys.stderr.flush()
    r = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if r.returncode:
        _fail("pip exited %d: %s" % (r.returncode, " ".join(cmd)))


def prepare(root, spec_json):
    """Bundle folders, a venv, and the wheel installed in it (only when it changed)."""
    if sys.version_info[:2] < MIN_PYTHON:
        _fail("Python %s on the device; itera-lite needs %d.%d or newer (set `python` in the profile)"
              % (platform.python_version(), MIN_PYTHON[0], MIN_PYTHON[1]))
    root = _cache(root)
    spec = json.loads(spec_json)
    import fcntl

    # Two runs on one device (two profiles naming it, a fleet listing it twice) share the
    # cache: one at a time lays out folders and touches the venv.
    lock = open(os.path.join(root, ".lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    bundles = {b["key"] + "/" + b["name"]: _bundle(root, b) for b in spec["bundles"]}
    files = {}
    for f in spec.get("files") or []:  # files named by options (a text to score, ...)
        _safe_name(f["name"], "file name")
        if "/" in f["name"]:
            _fail("unsafe file name %r" % f["name"])
        path = os.path.join(root, "files", f["sha256"][:16], f["name"])
        if not os.path.isfile(path):
            _place(root, f["sha256"], path)
        files[f["sha256"]] = path
    venv = venv_dir(root)
    if not os.path.isfile(_venv_python(venv)):
        cmd = [sys.executable, "-m", "venv"] + (["--system-site-packages"] if spec.get("system_site_packages") else []) + [venv]
        r = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        if r.returncode:
            _fail("could not create a venv with %s (on Debian/Raspberry Pi OS: sudo apt install python3-venv)"
                  % sys.executable)
    marker = os.path.join(venv, "itera-wheel.sha256")
    try:
        with open(marker) as f:
            installed = f.read().strip()
    except OSError:
        installed = None
    wheel = spec.get("wheel")
    want = wheel["sha256"] if wheel else spec["requirement"]
    ran_pip = False
    if installed != want:
        if installed is not None:  # same version number, other code: pip would call it satisfied
            _pip(venv, ["uninstall", "-y", "-q", "itera-lite"])
        if wheel:
            path = os.path.join(root, "wheels", wheel["sha256"][:16], wheel["name"])
            _safe_name(wheel["name"], "wheel name")
            if not os.path.isfile(path):
                _place(root, wheel["sha256"], path)
            target = path
        else:
            target = spec["requirement"]
        _pip(venv, ["install", "-q"] + list(spec.get("pip_args") or []) + [target])
        with open(marker + ".tmp", "w") as f:
            f.write(want + "\n")
        os.replace(marker + ".tmp", marker)
        ran_pip = True
    state = _venv_state(root)
    return {"bundles": bundles, "files": files, "bench": os.path.join(venv, "bin", "itera-bench"),
            "python": _venv_python(venv), "installed": ran_pip,
            "onnxruntime": state["onnxruntime"], "venv": venv}


def guard(argv):
    """Run argv; stop it, and whatever it started, when stdin closes: the ssh client is gone
    (Ctrl-C, a host timeout, a lost link), so no orphaned benchmark keeps loading the device."""
    import signal
    import threading

    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)

    def watch():
        try:
            while sys.stdin.buffer.read(65536):
                pass
        except OSError:
            pass
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except OSError:
            pass

    threading.Thread(target=watch, daemon=True).start()
    code = child.wait()
    # _exit: the watcher thread is still blocked reading stdin, which a normal interpreter
    # shutdown would wait on (and abort over); nothing of ours is left to flush.
    os._exit(code if code >= 0 else 128 - code)


def main(argv):
    if len(argv) < 2:
        _fail("usage: agent probe|missing|wheels|receive|prepare CACHE ... | guard COMMAND...")
    if argv[0] == "guard":
        guard(argv[1:])
    command, root = argv[0], argv[1]
    if command == "probe":
        out = probe(root, argv[2:])
    elif command == "missing":
        out = missing(root, argv[2:])
    elif command == "receive":
        out = receive(root)
    elif command == "wheels":
        out = wheels(root)
    elif command == "prepare":
        out = prepare(root, argv[2])
    else:
        _fail("unknown agent command %r" % command)
    sys.stdout.write(json.dumps(out) + "\n")


def script() -> str:
    """The program sent to the device: provenance.py (cpu_model, versions) then this file."""
    import inspect

    from itera_runtime import provenance

    own = inspect.getsource(sys.modules[__name__]).replace("from __future__ import annotations\n", "", 1)
    return inspect.getsource(provenance) + "\n" + own


if __name__ == "__main__":
    main(sys.argv[1:])
