"""itera-devices: what a device has and lacks before a benchmark run, and the profiles known.

    itera-devices check pi5                     # a profile name (built-in or ~/.config/itera-lite/devices/)
    itera-devices check pi@10.0.0.7 --bundle runs/tiny/bundle
    itera-devices profiles                      # every profile and the file it comes from

`check` connects as a run would (same ssh options, strict host keys) and installs nothing.
It exits 0 when the device is ready for `itera-bench ... --host`, 1 when something blocks
(the reasons are listed), with one `error:` line when the device cannot be reached.
"""

from __future__ import annotations

import json
import re
import sys
import time

import click

from itera_runtime.errors import OneLineErrorsGroup

from .profiles import Profile, ProfileError, adhoc_profile, load_profile, profile_paths
from .ssh import Connection, SshError


def _fail_with_tail(message: str, tail: list[str]) -> None:
    """The one error line, then the end of the device's stderr under it."""
    click.echo("error: " + " ".join(message.split()), err=True)
    for line in tail:
        click.echo(f"  | {line}", err=True)
    sys.exit(1)


def _ssh_config_alias(name: str) -> bool:
    """~/.ssh/config gives `name` a HostName of its own (`ssh -G` resolves the config, connects nowhere)."""
    import shutil
    import subprocess

    if shutil.which("ssh") is None or name.startswith("-"):
        return False
    try:
        out = subprocess.run(["ssh", "-G", "--", name], capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    hostname = next((ln.split(None, 1)[1] for ln in out.splitlines() if ln.startswith("hostname ")), name)
    return hostname.strip().lower() != name.lower()


def looks_like_host(target: str) -> bool:
    """The rule `check TARGET` goes by when TARGET is no profile: user@host, ssh://..., a dotted
    name or address (pi5.local, 10.0.0.7, ::1), localhost, or a ~/.ssh/config alias with a HostName."""
    return ("@" in target or target.lower().startswith("ssh://") or "." in target or ":" in target
            or target == "localhost" or _ssh_config_alias(target))


def resolve(target: str) -> Profile:
    """A profile name or .toml path, else an ssh destination (see looks_like_host) with default settings."""
    paths = profile_paths()
    if target.endswith(".toml") or target in paths:
        return load_profile(target)
    if not looks_like_host(target):
        raise ProfileError(f"no device profile named {target!r} (known: {', '.join(sorted(paths))}); "
                           f"for a host write user@{target} or ssh://{target}")
    return adhoc_profile(target, where="HOST")


def _version(text: str | None) -> tuple[int, ...] | None:
    m = re.match(r"\s*(?:>=)?\s*(\d+(?:\.\d+)*)", text or "")
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def bundle_verdict(path: str, have: str | None) -> tuple[str, bool, str | None]:
    """(what to say about running this bundle on a device whose onnxruntime is `have`, whether it
    runs, the graph set it would run) -- the runtime's own check, given the device's version."""
    from itera_runtime.bundle import load_bundle
    from itera_runtime.requires import choose_graph_set, refusal

    m = load_bundle(path, verify=False).manifest
    sets = m.set_requires()
    if all(r is None for r in sets.values()):
        return "requires unknown: the bundle's manifest has no `requires` (made before it was recorded)", True, None
    if have is None:
        floor = min((r.onnxruntime for r in sets.values() if r), key=lambda v: tuple(map(int, v.split("."))))
        return f"needs onnxruntime >= {floor}; the device has none", False, None
    chosen, problems = choose_graph_set(sets, ort_version=have)
    if chosen is not None:
        return f"ok: its {chosen} graph set runs on the device's onnxruntime {have}", True, chosen
    main = m.main_set
    return refusal(path, sets[main], problems[main], have, alternatives=[s for s in sets if s != main]), False, None


def check_device(profile: Profile, bundle: str | None = None, index: bool = True,
                 deadline: float | None = None) -> dict:
    """Everything `check` reports, as one dict (the --json output); deadline: time.monotonic() after
    which every ssh step is killed (the CLI gives the profile's timeout_s)."""
    from itera_runtime.requires import device_onnxruntime

    from .remote import agent_call

    with Connection(profile, deadline=deadline) as conn:
        conn.connect()
        facts = agent_call(conn, "probe")
        wheels = agent_call(conn, "wheels") if index else {"onnxruntime_wheel": None, "detail": "not asked (--no-index)"}
    blockers: list[str] = []
    if profile.arch and facts["machine"] != profile.arch:
        blockers.append(f"architecture is {facts['machine']}, the profile expects {profile.arch}")
    if facts.get("python_bits") == 32:
        blockers.append("32-bit Python (PyPI has no 32-bit ARM onnxruntime wheels): install the 64-bit OS")
    if not facts["python_ok"]:
        blockers.append(f"Python {facts['python']} is older than 3.10 (set `python` in the profile)")
    if not facts["venv_module"]:
        blockers.append("no venv module for this Python (Debian/Raspberry Pi OS: sudo apt install python3-venv)")
    ort_installed = facts["venv"]["onnxruntime"] or facts["packages"].get("onnxruntime")
    ort_where = "in the itera venv" if facts["venv"]["onnxruntime"] else "in the device's Python"
    if not ort_installed and not wheels["onnxruntime_wheel"]:
        blockers.append("no onnxruntime installed and pip finds no wheel for this Python and architecture")
    energy = facts["energy"]
    if profile.energy not in (None, "none") and energy.get(profile.energy) != "readable":
        blockers.append(f"energy backend {profile.energy} (the profile's) is not readable: {energy.get(profile.energy)}")
    plan = device_onnxruntime(facts["python"], facts["machine"], ort_installed, wheels["onnxruntime_wheel"],
                              facts.get("python_bits") or 64)
    if plan["blocker"]:
        blockers.append(plan["blocker"])
    out = {"name": profile.name, "host": profile.host, "facts": facts, "onnxruntime": {
        "installed": ort_installed, "where": ort_where if ort_installed else None,
        "installable_wheel": wheels["onnxruntime_wheel"], "detail": wheels["detail"], "plan": plan}}
    if bundle is not None:
        have = ort_installed or wheels["onnxruntime_wheel"]
        verdict, ok, graph_set = bundle_verdict(bundle, have)
        if not ok:
            blockers.append(verdict)
        out["bundle"] = {"path": bundle, "onnxruntime": have, "graph_set": graph_set, "verdict": verdict}
    out["blockers"] = blockers
    return out


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def render(report: dict, profile: Profile) -> str:
    f, ort = report["facts"], report["onnxruntime"]
    arch = f["machine"] + (f" (profile expects {profile.arch})" if profile.arch else "")
    venv = f["venv"]
    lines = [
        f"{report['name']} ({report['host']})" if report["name"] != report["host"] else report["host"],
        f"  architecture  {arch}",
        f"  os            {f['os']} ({f['system']})",
        f"  cpu           {f['cpu']}, {f['cores']} cores",
        f"  python        {f['executable']} {f['python']} ({f.get('python_bits')}-bit)"
        f"{'' if f['python_ok'] else ' (too old: 3.10+ needed)'}; "
        f"venv module {'yes' if f['venv_module'] else 'no'}; pip {'yes' if f['pip'] else 'no'}",
        "  onnxruntime   " + (f"{ort['installed']} {ort['where']}" if ort["installed"] else "not installed")
        + "; wheel pip finds: " + (ort["installable_wheel"] or f"none ({ort['detail']})"),
    ]
    plan = ort.get("plan")
    if plan:
        where = f"onnxruntime {plan['version']} ({plan['source']})" if plan["version"] else "no onnxruntime"
        lines.append(f"  graph set     {plan['graph_set'] or 'none'} on {where}"
                     + "".join(f"; {n}" for n in plan["notes"]))
    if "bundle" in report:
        lines.append(f"  bundle        {report['bundle']['verdict']}")
    energy = "; ".join(f"{k}: {v}" for k, v in f["energy"].items())
    lines.append(f"  energy        {energy} (profile: {profile.energy or 'not set'})")
    lines.append(f"  free disk     {_gb(f['free_bytes'])} at {f['cache']}")
    lines.append(f"  itera venv    {'present' if venv['exists'] else 'not yet (made on the first run)'} ({venv['path']})")
    if report["blockers"]:
        lines.append("not ready: " + "; ".join(report["blockers"]))
    else:
        lines.append("ready")
    return "\n".join(lines)


@click.group(cls=OneLineErrorsGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Devices for itera-bench --host/--device-profile/--fleet."""


@main.command()
@click.argument("host")
@click.option("--bundle", default=None, type=click.Path(path_type=str),
              help="also say whether the device's onnxruntime runs this bundle (its manifest's `requires`)")
@click.option("--no-index", is_flag=True, help="do not ask pip for an installable onnxruntime wheel (offline)")
@click.option("--json", "as_json", is_flag=True, help="the report as JSON")
def check(host, bundle, no_index, as_json):
    """What HOST has and lacks for a benchmark run.

    HOST is a profile name, a .toml file, or an ssh destination: user@host, ssh://user@host:port, a
    dotted name or address, localhost, or a ~/.ssh/config alias; another bare word is refused as an
    unknown profile (write user@NAME for a host of that name).
    """
    profile = resolve(host)
    try:
        report = check_device(profile, bundle, index=not no_index,
                              deadline=time.monotonic() + profile.timeout_s)
    except SshError as e:
        _fail_with_tail(f"{profile.name}: {e}", e.tail)
    click.echo(json.dumps(report, indent=2) if as_json else render(report, profile))
    if report["blockers"]:
        sys.exit(1)


@main.command()
def profiles():
    """Every device profile known here and the file it comes from."""
    for name, path in sorted(profile_paths().items()):
        try:
            p = load_profile(str(path))
            click.echo(f"{name:12s} {p.host:28s} {p.description or ''}  [{path}]")
        except ProfileError as e:
            click.echo(f"{name:12s} error: {e}")


if __name__ == "__main__":
    main()
