"""Device profiles and remote runs over ssh, against a real OpenSSH server on loopback.

The "device" is this machine reached through `sshd -D` on a high loopback port with its
own keys (tests/sshd.py). Nothing is mocked: the system ssh client, the push, the remote
venv and pip, the remote itera-bench and the merge are the real ones. A missing sshd is
installed with apt when the suite runs as root, skipped with the reason where it cannot be,
and a failure under CI (conftest.py's `ssh_device`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sshd import Sshd, keygen  # noqa: E402

from itera_bench.record import parse  # noqa: E402
from itera_devices.profiles import (  # noqa: E402
    BUILTIN_DIR,
    EXAMPLE_FLEET,
    ProfileError,
    load_fleet,
    load_profile,
    user_dir,
)

BENCH = [sys.executable, "-m", "itera_bench.cli", "latency"]
QUICK = ["-p", "16", "-n", "8", "-d", "0", "-r", "2", "--no-warmup"]


# --------------------------------------------------------------------------- profiles (fast)


def test_builtin_profiles_and_example_fleet_load():
    for name in ("laptop", "pi4", "pi5"):
        p = load_profile(name)
        assert p.name == name and p.host and p.energy in ("powercap", "pi5-pmic", "none")
    assert load_profile("pi5").arch == "aarch64" and load_profile("pi5").energy == "pi5-pmic"
    fleet = load_fleet(EXAMPLE_FLEET)
    assert [p.name for p in fleet] == ["pi5-a", "pi5-b", "pi4", "desk"]
    assert fleet[0].host == "pi@pi5-a.local" and fleet[0].energy == "pi5-pmic"  # from the pi5 profile
    assert fleet[2].timeout_s == 2400  # the fleet's per-host timeout beats the profile's


def test_user_profile_dir_hides_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    user_dir().mkdir(parents=True)
    (user_dir() / "pi5.toml").write_text('host = "me@my-pi"\narch = "aarch64"\n')
    p = load_profile("pi5")
    assert p.host == "me@my-pi" and p.name == "pi5" and p.source.startswith(str(tmp_path))


@pytest.mark.parametrize("text, field", [
    ('host = "a"\nthreads = 0\n', "threads"),
    ('host = "a"\nenergy = "rapl"\n', "energy"),
    ('host = "a"\nhots = "b"\n', "hots"),
    ('host = "-oProxyCommand=touch x"\n', "host"),
    ('host = "a"\nssh_options = ["StrictHostKeyChecking=no"]\n', "ssh_options"),
    ('host = "a"\nport = "22"\n', "port"),
    ('name = "x"\n', "host"),
    ('host = "a"\nthreads = [1,\n', None),  # not TOML at all
])
def test_bad_profile_is_one_line_naming_file_and_field(tmp_path, text, field):
    path = tmp_path / "dev.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as e:
        load_profile(str(path))
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    assert (f"'{field}'" in msg) if field else ("not valid TOML" in msg)


def test_bad_profile_from_the_cli(tmp_path):
    path = tmp_path / "dev.toml"
    path.write_text('host = "a"\nenergy = "rapl"\n')
    r = subprocess.run([*BENCH, str(tmp_path), "--device-profile", str(path)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "'energy'" in r.stderr


def test_every_subcommand_reaches_the_device_with_the_options_typed_here(tmp_path):
    """The device's argv, built from the typed invocation, parses back to the same values:
    for every subcommand, including those added after this code (none is named here)."""
    import click

    from itera_bench.cli import bench_command, main
    from itera_bench.invocation import Invocation
    from itera_bench.params import IntList, IntPair
    from itera_devices.profiles import adhoc_profile
    from itera_devices.remote import device_invocation

    device = {"threads", "output", "baseline", "hosts", "device_profiles", "fleet"}
    text = tmp_path / "some text.txt"
    text.write_text("x")

    @click.command()
    @bench_command
    @click.option("--text", type=click.Path(dir_okay=False), help="a subcommand with a file option")
    def scored(bundles, threads, repetitions, warmup, text):
        return []

    for name, cmd in {**main.commands, "scored": scored}.items():
        names = {p.name for p in cmd.params}
        if "bundles" not in names or "device_profiles" not in names:
            continue  # not a bench_command
        args = ["b1", "b2", "-r", "3", "--no-warmup", "-t", "2", "--host", "pi@x", "--baseline", "b2"]
        for p in cmd.params:  # give every list option two values and every path option a file
            if isinstance(p, click.Option) and p.name not in device and isinstance(p.type, (IntList, IntPair)):
                args += [max(p.opts, key=len), "1,2"]
            elif isinstance(p, click.Option) and isinstance(p.type, click.Path) and p.name not in device:
                args += [max(p.opts, key=len), str(text)]
        if "data" in names:  # a str option that takes a corpus name or a FILE (quality --data)
            args += ["--data", str(text)]
        typed = Invocation.parse(cmd, args)
        sent = device_invocation(typed, adhoc_profile("pi@x"))
        argv = sent.argv()
        assert argv[:3] == [name, "b1", "b2"] and "--host" not in argv and "--baseline" not in argv
        again = Invocation.parse(cmd, argv[1:])
        assert again.bundles == typed.bundles
        for key in names - device - {"bundles"}:
            assert again.options[key] == typed.options[key], (name, key)
        assert again.options["threads"] == [2] and again.options["output"] == "jsonl"
        assert {k: str(v) for k, v in sent.files().items()} == {
            k: str(text) for k, v in typed.options.items() if v == str(text)}
        assert bool(sent.files()) == ("data" in names or any(
            isinstance(p, click.Option) and isinstance(p.type, click.Path) and p.name not in device
            for p in cmd.params))


def test_a_profiles_threads_and_energy_counter_apply_where_the_command_line_gave_none():
    from itera_bench.cli import main
    from itera_bench.invocation import Invocation
    from itera_devices.profiles import adhoc_profile
    from itera_devices.remote import device_invocation

    import dataclasses

    pi = dataclasses.replace(adhoc_profile("pi@x"), threads=[4], energy="pi5-pmic")
    energy = main.commands["energy"]
    assert device_invocation(Invocation.parse(energy, ["b"]), pi).options["threads"] == [4]
    assert device_invocation(Invocation.parse(energy, ["b"]), pi).options["energy_backend"] == "pi5-pmic"
    typed = Invocation.parse(energy, ["b", "-t", "1,2", "--energy-backend", "perf"])
    assert device_invocation(typed, pi).options["threads"] == [1, 2]
    assert device_invocation(typed, pi).options["energy_backend"] == "perf"
    assert "energy_backend" not in device_invocation(Invocation.parse(main.commands["step"], ["b"]), pi).options


def test_requires_verdict_against_the_device_version(tmp_path, tiny_itera):
    """The device check asks the runtime's own requires check, with the device's version."""
    from itera_devices.cli import bundle_verdict
    from itera_runtime.bundle import MANIFEST_NAME, load_bundle

    m = load_bundle(tiny_itera.bundle).manifest
    assert m.requires is not None  # the exporter recorded it
    text, ok, chosen = bundle_verdict(str(tiny_itera.bundle), "9.0.0")
    assert ok and chosen == m.main_set and "9.0.0" in text
    text, ok, chosen = bundle_verdict(str(tiny_itera.bundle), "1.0.0")  # older than any set needs
    assert not ok and chosen is None and "installed onnxruntime is 1.0.0" in text and "upgrade" in text.lower()
    if m.alt_graph_sets:  # a dual bundle: an onnxruntime with only the portable floor runs the portable set
        floor = m.alt_graph_sets["portable"].requires.onnxruntime
        assert bundle_verdict(str(tiny_itera.bundle), floor)[1:] == (True, "portable")
    text, ok, _ = bundle_verdict(str(tiny_itera.bundle), None)
    assert not ok and "the device has none" in text
    # a manifest from before `requires` was recorded: said plainly, not refused
    b = tmp_path / "old"
    shutil.copytree(tiny_itera.bundle, b)
    d = json.loads((b / MANIFEST_NAME).read_text())
    for key in ("requires", "alt_graph_sets", "graph_set"):
        d.pop(key, None)
    (b / MANIFEST_NAME).write_text(json.dumps(d))
    assert bundle_verdict(str(b), "1.20.1")[1:] == (True, None)


def test_devices_cli_lists_profiles_and_refuses_an_unreachable_host(tmp_path):
    from sshd import free_port

    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    (tmp_path / "itera-lite" / "devices").mkdir(parents=True)
    (tmp_path / "itera-lite" / "devices" / "mine.toml").write_text(f'host = "127.0.0.1"\nport = {free_port()}\n')
    r = subprocess.run([sys.executable, "-m", "itera_devices.cli", "profiles"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and [ln.split()[0] for ln in r.stdout.splitlines()] == ["laptop", "mine", "pi4", "pi5"]
    r = subprocess.run([sys.executable, "-m", "itera_devices.cli", "check", "mine"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: mine: connection refused by 127.0.0.1 port ")


def test_markdown_names_each_host_with_its_own_machine():
    from itera_bench.record import Record, markdown

    def row(host, cpu):
        return Record(kind="latency", test="tg8", metric="tokens_per_s", unit="tok/s", samples=[1.0], host=host,
                      provenance={"cpu": cpu, "cpu_count": 4, "system": "Linux", "command": "c",
                                  "versions": {"python": "3.11.2", "onnxruntime": "1.32.0"}})

    md = markdown([row("local", "Xeon"), row("pi5", "Cortex-A76"), row("pi5", "Cortex-A76")])
    lines = md.splitlines()
    assert [ln.split(" | ")[0] for ln in lines[2:5]] == ["| local", "| pi5", "| pi5"]
    assert [ln for ln in lines if ln.startswith(("local:", "pi5:"))] == [
        "local: commit None, Xeon, 4 CPUs, Linux, Python 3.11.2, onnxruntime 1.32.0, `c`",
        "pi5: commit None, Cortex-A76, 4 CPUs, Linux, Python 3.11.2, onnxruntime 1.32.0, `c`"]


def test_builtin_profile_files_are_shipped():
    assert sorted(p.name for p in BUILTIN_DIR.glob("*.toml")) == ["laptop.toml", "pi4.toml", "pi5.toml"]


# --------------------------------------------------------------------------- a real sshd


def _bench(bundles, *args, env, timeout=600):
    return subprocess.run([*BENCH, *map(str, bundles), *QUICK, *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _pushed(stderr: str, name: str) -> tuple[int, int]:
    line = next(ln for ln in stderr.splitlines() if ln.startswith(f"{name} (") and "pushed" in ln)
    part = line.split("pushed ", 1)[1]
    files = int(part.split(" file", 1)[0])
    nbytes = int(part.split(", ", 1)[1].split(" bytes", 1)[0].replace(",", ""))
    return files, nbytes


def _changed_copy(bundle: Path, dest: Path) -> Path:
    """The bundle with tokenizer.json re-serialised (same tokens, other bytes), manifest re-hashed."""
    from itera_runtime.bundle import load_bundle, write_manifest

    shutil.copytree(bundle, dest)
    tok = dest / "tokenizer.json"
    tok.write_text(json.dumps(json.loads(tok.read_text()), indent=1))
    write_manifest(dest, load_bundle(dest, verify=False).manifest)
    return dest


@pytest.mark.slow
def test_push_install_bench_pull_then_nothing_then_only_the_change(ssh_device, device_env, tiny_itera, tmp_path):
    server, root = ssh_device
    # a device cache of its own: what the first run pushes must not depend on which tests ran before
    prof = server.profile(tmp_path / "dev.toml", "dev", tmp_path / "device-cache")
    logins = server.logins()

    first = _bench([tiny_itera.bundle], "--device-profile", prof, "-o", "jsonl", env=device_env)
    assert first.returncode == 0, first.stderr
    rows = parse(first.stdout, "jsonl")
    assert {r.test for r in rows} == {"pp16", "tg8"} and all(len(r.samples) == 2 for r in rows)
    for r in rows:
        assert r.host == "dev" and r.bundle == str(tiny_itera.bundle)  # the bundle as named here
        h = r.provenance["host"]
        assert h["machine"] == os.uname().machine and h["cores"] == os.cpu_count()
        assert h["python"] and h["os"] and h["cpu"] and h["onnxruntime"]
        assert r.provenance["versions"]["onnxruntime"] == h["onnxruntime"]
        assert r.build_commit  # the wheel's source commit (the device has no git)
    files1, bytes1 = _pushed(first.stderr, "dev")
    bundle_bytes = sum(p.stat().st_size for p in tiny_itera.bundle.iterdir())
    assert files1 >= 2 and bytes1 > bundle_bytes  # every bundle file and the wheel
    assert "installed the wheel" in first.stderr or "venv up to date" in first.stderr
    assert server.logins() == logins + 1  # one connection carried every step
    import zipfile

    wheel = next(Path(device_env["XDG_CACHE_HOME"], "itera-lite", "wheels").glob("*/itera_lite-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    torch_reqs = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist: torch")]
    assert torch_reqs and all("extra ==" in ln for ln in torch_reqs)  # the base install never needs torch

    second = _bench([tiny_itera.bundle], "--device-profile", prof, "-o", "jsonl", env=device_env)
    assert second.returncode == 0, second.stderr
    assert _pushed(second.stderr, "dev") == (0, 0) and "venv up to date" in second.stderr
    assert rows[0].provenance["push"]["bytes"] == bytes1
    assert parse(second.stdout, "jsonl")[0].provenance["push"] == {"files": 0, "bytes": 0, "already_there": files1,
                                                                    "installed": False}
    assert len(parse(second.stdout, "jsonl")) == 2

    changed = _changed_copy(tiny_itera.bundle, tmp_path / "changed")
    third = _bench([changed], "--device-profile", prof, "-o", "jsonl", env=device_env)
    assert third.returncode == 0, third.stderr
    want = (changed / "tokenizer.json").stat().st_size + (changed / "manifest.json").stat().st_size
    assert _pushed(third.stderr, "dev") == (2, want)  # tokenizer + manifest, nothing else
    step = subprocess.run([*BENCH[:-1], "step", str(tiny_itera.bundle), "-n", "8", "-d", "0", "-r", "2",
                           "--device-profile", str(prof), "-o", "jsonl"], capture_output=True, text=True,
                          env=device_env)
    assert step.returncode == 0, step.stderr  # any subcommand, not only latency
    assert [(r.host, r.kind, r.test) for r in parse(step.stdout, "jsonl")] == [("dev", "step", "step@d0")]
    print(f"\nupload: first run {files1} files {bytes1:,} B; second 0 B; changed bundle 2 files {want:,} B")
    print(first.stderr)


def test_host_not_listening_is_one_clear_error(tmp_path, device_env, tiny_baseline):
    from sshd import free_port

    port = free_port()
    prof = tmp_path / "dev.toml"
    prof.write_text(f'host = "127.0.0.1"\nport = {port}\n')
    r = _bench([tiny_baseline.bundle], "--device-profile", prof, env=device_env, timeout=120)
    assert r.returncode == 1 and r.stdout.strip() == "(no records)"
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "connection refused" in err[0] and str(port) in err[0]


def test_wrong_or_unknown_host_key_is_refused(ssh_device, device_env, tiny_baseline, tmp_path):
    server, root = ssh_device
    other = keygen(tmp_path / "other_host")  # what an impostor would present
    kh = tmp_path / "known_hosts"
    prof = server.profile(tmp_path / "dev.toml", "dev", root / "cache",
                          ssh_options=[f"UserKnownHostsFile={kh}", "GlobalKnownHostsFile=/dev/null"])
    logins = server.logins()
    kh.write_text(f"[127.0.0.1]:{server.port} {other}\n")
    r = _bench([tiny_baseline.bundle], "--device-profile", prof, env=device_env, timeout=120)
    assert r.returncode == 1 and "has CHANGED" in r.stderr
    kh.write_text("")
    r = _bench([tiny_baseline.bundle], "--device-profile", prof, env=device_env, timeout=120)
    assert r.returncode == 1 and "not in known_hosts" in r.stderr
    assert kh.read_text() == ""  # nothing was accepted on the user's behalf
    assert server.logins() == logins


@pytest.mark.slow
def test_fleet_keeps_the_good_host_when_the_other_sshd_dies_mid_run(ssh_device, device_env, tiny_baseline, tmp_path):
    server, root = ssh_device
    doomed = Sshd(tmp_path / "sshd-b", root / "site")
    doomed.start()
    try:
        a = server.profile(tmp_path / "a.toml", "a", root / "cache")
        b = doomed.profile(tmp_path / "b.toml", "b", root / "cache")
        fleet = tmp_path / "fleet.toml"
        fleet.write_text(f'[[hosts]]\nprofile = "{a}"\n\n[[hosts]]\nprofile = "{b}"\n')
        proc = subprocess.Popen([*BENCH, str(tiny_baseline.bundle), *QUICK, "--fleet", str(fleet), "-o", "jsonl"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=device_env)
        killed = threading.Event()

        def kill_b_when_its_bench_runs():
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                for p in doomed.processes():
                    try:
                        if any("itera-bench" in part for part in p.cmdline()):
                            doomed.stop()
                            killed.set()
                            return
                    except Exception:  # a process that ended while we looked
                        continue
                time.sleep(0.02)

        watcher = threading.Thread(target=kill_b_when_its_bench_runs)
        watcher.start()
        out, err = proc.communicate(timeout=600)
        watcher.join()
    finally:
        doomed.stop()
    assert killed.is_set(), err
    assert proc.returncode == 1, err
    rows = parse(out, "jsonl")
    assert rows and {r.host for r in rows} == {"a"} and {r.test for r in rows} == {"pp16", "tg8"}
    assert any(ln.startswith("error: b (") for ln in err.splitlines()), err
    assert any(ln.startswith("a (") and "row(s)" in ln for ln in err.splitlines()), err


@pytest.mark.slow
def test_check_reports_what_the_device_has(ssh_device, device_env, tiny_itera, tmp_path):
    server, root = ssh_device
    prof = server.profile(tmp_path / "dev.toml", "dev", root / "cache", energy="none")
    r = subprocess.run([sys.executable, "-m", "itera_devices.cli", "check", str(prof), "--bundle",
                        str(tiny_itera.bundle), "--json"], capture_output=True, text=True, env=device_env,
                       timeout=300)
    assert r.returncode in (0, 1), r.stderr
    report = json.loads(r.stdout)
    f = report["facts"]
    assert f["machine"] == os.uname().machine and f["python_ok"] and f["cores"] == os.cpu_count()
    assert f["free_bytes"] > 0 and set(f["energy"]) == {"powercap", "pi5-pmic", "perf"}
    import onnxruntime

    assert report["onnxruntime"]["installed"] == onnxruntime.__version__
    assert report["bundle"]["verdict"]  # requires: known or said to be unknown
    plan = report["onnxruntime"]["plan"]  # the graph set the device's onnxruntime runs, from its own Python
    assert plan["version"] == onnxruntime.__version__ and plan["source"] == "installed" and plan["blocker"] is None
    text = subprocess.run([sys.executable, "-m", "itera_devices.cli", "check", str(prof), "--no-index"],
                          capture_output=True, text=True, env=device_env, timeout=300)
    assert "architecture  " + os.uname().machine in text.stdout and "free disk" in text.stdout
    assert f"graph set     {plan['graph_set']} on onnxruntime {onnxruntime.__version__} (installed)" in text.stdout


@pytest.mark.slow
def test_slow_host_times_out_and_ctrl_c_keeps_finished_hosts(ssh_device, device_env, tiny_baseline, tmp_path):
    """a: a normal host; b: its Python hangs, 4 s timeout; c: hangs with a long timeout, so the
    run is still going when Ctrl-C comes: a's rows are printed, b timed out, c interrupted."""
    server, root = ssh_device
    real = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    slow = tmp_path / "slow python"  # a space in the path too: it is one word on the device
    slow.write_text(f"#!/bin/sh\nsleep 60\nexec {real} \"$@\"\n")
    slow.chmod(0o755)
    a = server.profile(tmp_path / "a.toml", "a", root / "cache")
    b = server.profile(tmp_path / "b.toml", "b", root / "cache", python=str(slow), timeout_s=4)
    c = server.profile(tmp_path / "c.toml", "c", root / "cache", python=str(slow))
    fleet = tmp_path / "fleet.toml"
    fleet.write_text("".join(f'[[hosts]]\nprofile = "{p}"\n\n' for p in (a, b, c)))
    proc = subprocess.Popen([*BENCH, str(tiny_baseline.bundle), *QUICK, "--fleet", str(fleet), "-o", "jsonl"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=device_env)
    seen: list[str] = []

    def read_stderr():
        for line in proc.stderr:
            seen.append(line)

    reader = threading.Thread(target=read_stderr)
    reader.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # each host is logged as it ends
        text = "".join(seen)
        if "\na (" in "\n" + text and "error: b (" in text:
            break
        time.sleep(0.1)
    proc.send_signal(2)  # SIGINT, as Ctrl-C sends
    out = proc.stdout.read()
    proc.wait(timeout=60)
    reader.join()
    err = "".join(seen)
    assert proc.returncode == 130, err
    rows = parse(out, "jsonl")
    assert rows and {r.host for r in rows} == {"a"}, err
    assert "error: b (" in err and "timed out after 4 s" in err, err
    assert "error: c (" in err and "interrupted" in err, err



@pytest.mark.slow
def test_a_failing_remote_bench_brings_back_its_stderr(ssh_device, device_env, tiny_baseline, tmp_path):
    server, root = ssh_device
    prof = server.profile(tmp_path / "dev.toml", "dev", root / "cache")
    r = subprocess.run([*BENCH, str(tiny_baseline.bundle), "-p", "8", "-n", "4", "-d", "1000000", "-r", "1",
                        "--device-profile", str(prof)], capture_output=True, text=True, env=device_env,
                       timeout=600)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("error: dev ("))
    assert "itera-bench latency exited 1" in lines[i]
    assert any(ln.startswith("  | error: ") and "max_seq_len" in ln for ln in lines[i + 1:]), r.stderr


@pytest.mark.slow
def test_quality_over_ssh_pushes_its_text_and_maps_its_reference(ssh_device, device_env, tiny_itera, tiny_baseline,
                                                                 tmp_path):
    """Options naming local things reach the device as device paths: the text file is pushed,
    --reference names the device's copy of that bundle."""
    server, root = ssh_device
    prof = server.profile(tmp_path / "dev.toml", "dev", root / "cache")
    text = tmp_path / "my text.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    args = ["quality", str(tiny_itera.bundle), str(tiny_baseline.bundle), "--data", str(text), "--window", "32",
            "--max-tokens", "128", "--reference", str(tiny_baseline.bundle), "-o", "jsonl"]
    local = subprocess.run([*BENCH[:-1], *args], capture_output=True, text=True, env=device_env, timeout=600)
    remote = subprocess.run([*BENCH[:-1], *args, "--device-profile", str(prof)], capture_output=True, text=True,
                            env=device_env, timeout=600)
    assert local.returncode == 0, local.stderr
    assert remote.returncode == 0, remote.stderr
    here = {(r.bundle, r.metric): r.median for r in parse(local.stdout, "jsonl")}
    there = {(r.bundle, r.metric): r.median for r in parse(remote.stdout, "jsonl")}
    assert here.keys() == there.keys() and len(here) >= 2
    for k in here:  # the same text scored by the same bundles: the same numbers
        assert there[k] == pytest.approx(here[k], rel=1e-6), k
    assert _pushed(remote.stderr, "dev")[0] >= 1  # the text (the bundles may already be there)


@pytest.mark.slow
def test_energy_over_ssh_takes_the_profiles_backend(ssh_device, device_env, tiny_baseline, tmp_path):
    """The profile says which counter the device has; the command line still wins."""
    server, root = ssh_device
    prof = server.profile(tmp_path / "dev.toml", "dev", root / "cache", energy="none")
    base = [*BENCH[:-1], "energy", str(tiny_baseline.bundle), "-p", "8", "-n", "4", "-r", "1", "--min-time", "0.1",
            "--idle", "0.1", "--device-profile", str(prof), "-o", "jsonl"]
    r = subprocess.run(base, capture_output=True, text=True, env=device_env, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = parse(r.stdout, "jsonl")
    assert rows and all(row.host == "dev" for row in rows)
    assert "--energy-backend none" in rows[0].provenance["command"]  # from the profile
    r = subprocess.run([*base, "--energy-backend", "auto"], capture_output=True, text=True, env=device_env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "--energy-backend auto" in parse(r.stdout, "jsonl")[0].provenance["command"]


@pytest.mark.slow
def test_guard_stops_the_device_command_when_ssh_goes_away(ssh_device, tmp_path):
    """Without the guard, a command outlives its ssh client (sshd signals nothing when a session
    without a tty closes); under `agent guard` it is stopped as soon as the client is gone."""
    import psutil

    from itera_devices.profiles import load_profile_file
    from itera_devices.ssh import Connection, SshError

    server, root = ssh_device
    profile = load_profile_file(server.profile(tmp_path / "dev.toml", "dev", root / "cache"))

    def sleeping(seconds: str) -> list:
        return [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or []) == ["sleep", seconds]]

    for guarded, seconds in ((False, "3987"), (True, "3988")):
        with Connection(profile) as conn:
            conn.connect()
            argv = ([sys.executable, "-m", "itera_devices.agent", "guard"] if guarded else []) + ["sleep", seconds]

            def run():
                try:
                    conn.run(argv, check=False, hold_stdin=True)
                except SshError:
                    pass  # "interrupted": we killed it

            t = threading.Thread(target=run)
            t.start()
            deadline = time.monotonic() + 30
            while not sleeping(seconds) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sleeping(seconds)
            conn.kill()  # what a host timeout or Ctrl-C does
            t.join()
        time.sleep(3)
        left = sleeping(seconds)
        for p in left:  # ours
            p.kill()
        assert bool(left) is not guarded, (guarded, left)
