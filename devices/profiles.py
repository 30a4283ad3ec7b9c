"""Device profiles (TOML): how to reach a device over ssh and how to benchmark on it.

A profile names an ssh destination, the device's Python, default threads, the energy
backend it can read, and the architecture it should report. Profiles are looked up by name
in the user's config dir (`$XDG_CONFIG_HOME/itera-lite/devices/NAME.toml`, default
`~/.config/...`) and then among the built-in examples (laptop, pi4, pi5); a path to a
.toml file works too. A fleet file lists several profiles (`[[hosts]]`). Anything wrong
in a file is one `ProfileError` line naming the file and the field.

Profile and fleet files are trusted like ~/.ssh/config: their `ssh_options` reach ssh as
`-o` options, and one such as ProxyCommand runs a local command. Use only files you wrote
or read; what is checked is their form, not their intent.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itera_runtime.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # 3.10: the same parser, from PyPI (a base dependency with a version marker)
    import tomli as tomllib

ENERGY_BACKENDS = ("powercap", "pi5-pmic", "perf", "none")
BUILTIN_DIR = Path(__file__).resolve().parent / "profiles"
EXAMPLE_FLEET = Path(__file__).resolve().parent / "fleet.example.toml"
DEFAULT_TIMEOUT_S = 1800.0
# ssh options a profile may not set: strict host-key checking and batch mode stay ours.
_LOCKED_SSH_OPTIONS = {"stricthostkeychecking", "batchmode", "controlpath",
                       "controlmaster", "controlpersist"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ProfileError(UserError):
    """A profile or fleet file a user wrote is wrong; the message is one line."""


@dataclass
class Profile:
    """One device: where it is and how to run there."""

    name: str
    host: str  # ssh destination: user@host, a ~/.ssh/config alias, or ssh://user@host:port
    description: str = ""
    port: int | None = None
    identity_file: str | None = None
    ssh_options: list[str] = field(default_factory=list)  # extra `-o Key=Value`
    python: str = "python3"  # the device's interpreter that creates the venv
    threads: list[int] | None = None  # default -t for this device
    energy: str | None = None  # the energy backend this device reads; None: the subcommand's default (auto)
    arch: str | None = None  # what `uname -m` must say there
    cache_dir: str = ".cache/itera-lite"  # on the device, relative to the login directory
    timeout_s: float = DEFAULT_TIMEOUT_S  # the whole run on this host: connect, push, install, bench
    pip_args: list[str] = field(default_factory=list)  # e.g. ["--no-index", "--find-links", "/srv/wheels"]
    system_site_packages: bool = False  # let the venv see the device's own numpy/onnxruntime (apt)
    source: str = "<command line>"  # the file it came from, for error messages


_FIELDS = {f.name: f for f in dataclasses.fields(Profile) if f.name != "source"}


def _check(where: str, key: str, value: Any) -> Any:
    """The value of one field, checked; a wrong one is a ProfileError naming file and field."""

    def bad(expected: str) -> ProfileError:
        return ProfileError(f"{where}: field {key!r}: expected {expected}, got {value!r}")

    if key in ("name", "host", "description", "python", "cache_dir", "identity_file", "arch"):
        if not isinstance(value, str) or (key != "description" and not value.strip()):
            raise bad("a non-empty string")
        if key in ("host", "python", "cache_dir") and (value.startswith("-") or any(c in value for c in "\n\r\0")):
            # a leading '-' would be read by ssh or the shell as an option
            raise bad("a value that does not start with '-' and has no line breaks")
        if key == "name" and not _NAME.match(value):
            raise bad("letters, digits, '.', '_' or '-'")
        if key == "host" and value.lower().startswith("ssh://"):
            _check_ssh_url(where, value)
        return value
    if key == "port":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise bad("a port number (1-65535)")
        return value
    if key == "threads":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if (not isinstance(value, list) or not value
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in value)):
            raise bad("a thread count or a list of them (integers >= 1)")
        return value
    if key == "energy":
        if value not in ENERGY_BACKENDS:
            raise bad("one of " + ", ".join(ENERGY_BACKENDS))
        return value
    if key == "timeout_s":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise bad("a positive number of seconds")
        return float(value)
    if key in ("ssh_options", "pip_args"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise bad("a list of strings")
        if key == "ssh_options":
            for opt in value:
                if "=" not in opt:
                    raise bad("Key=Value ssh options")
                if opt.split("=", 1)[0].strip().lower() in _LOCKED_SSH_OPTIONS:
                    raise ProfileError(f"{where}: field 'ssh_options': {opt.split('=', 1)[0]} is set by "
                                       "itera-devices (strict host-key checking stays on)")
        return value
    if key == "system_site_packages":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    raise ProfileError(f"{where}: unknown field {key!r} (known: {', '.join(_FIELDS)})")


def _check_ssh_url(where: str, url: str) -> None:
    """An ssh://[user@]host[:port] destination checked as the profile's own `port` is: ssh's
    answer to a bad one is its whole usage text."""
    def bad(why: str) -> ProfileError:
        return ProfileError(f"{where}: field 'host': {url!r} {why} (expected ssh://[user@]host[:port], port 1-65535)")

    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise bad("has a port that is not a number from 1 to 65535") from None
    if port is not None and not 0 < port < 65536:
        raise bad("has a port that is not a number from 1 to 65535")
    if not parts.hostname:
        raise bad("names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise bad("has a path, query or fragment")


def profile_from_dict(d: dict[str, Any], where: str, default_name: str | None = None) -> Profile:
    """A Profile from parsed TOML, every field checked."""
    values = {k: _check(where, k, v) for k, v in d.items()}
    if "name" not in values and default_name is not None:
        values["name"] = _check(where, "name", default_name)
    for required in ("name", "host"):
        if required not in values:
            raise ProfileError(f"{where}: field {required!r} is missing")
    return Profile(**values, source=where)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ProfileError(f"{path}: not found") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8 by definition; tomllib lets the decode error through
        raise ProfileError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                           "save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot read ({e.strerror})") from None


def user_dir() -> Path:
    """Where a user's own profiles live (XDG base directory spec)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "itera-lite" / "devices"


def profile_paths() -> dict[str, Path]:
    """Every profile name → its file; a user's profile hides a built-in of the same name."""
    found = {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.toml"))}
    udir = user_dir()
    if udir.is_dir():
        found.update({p.stem: p for p in sorted(udir.glob("*.toml"))})
    return found


def load_profile_file(path: str | os.PathLike) -> Profile:
    path = Path(path)
    return profile_from_dict(_read_toml(path), str(path), default_name=path.stem)


def load_profile(name_or_path: str) -> Profile:
    """A profile by name (user dir, then built-in) or by path to a .toml file."""
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        return load_profile_file(name_or_path)
    paths = profile_paths()
    if name_or_path not in paths:
        raise ProfileError(f"no device profile named {name_or_path!r} (known: {', '.join(sorted(paths))}; "
                           f"add your own as {user_dir() / (name_or_path + '.toml')})")
    return load_profile_file(paths[name_or_path])


def adhoc_profile(host: str, where: str = "--host") -> Profile:
    """A profile for `--host TARGET` alone: defaults for everything but the destination."""
    return Profile(name=host, host=_check(where, "host", host), source=where)


def with_host(profile: Profile, host: str) -> Profile:
    """The profile pointed at another destination (`--device-profile pi5 --host pi@10.0.0.7`)."""
    return dataclasses.replace(profile, host=_check("--host", "host", host), name=profile.name)


def load_fleet(path: str | os.PathLike) -> list[Profile]:
    """The hosts of a fleet file; each [[hosts]] entry is a profile or `profile = NAME` + overrides."""
    path = Path(path)
    d = _read_toml(path)
    where = str(path)
    unknown = set(d) - {"hosts", "timeout_s"}
    if unknown:
        raise ProfileError(f"{where}: unknown field {sorted(unknown)[0]!r} (known: hosts, timeout_s)")
    timeout = _check(where, "timeout_s", d["timeout_s"]) if "timeout_s" in d else None
    hosts = d.get("hosts")
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, dict) for h in hosts):
        raise ProfileError(f"{where}: field 'hosts': expected one or more [[hosts]] tables")
    out: list[Profile] = []
    for i, entry in enumerate(hosts):
        here = f"{where}: hosts[{i}]"
        entry = dict(entry)
        base: dict[str, Any] = {}
        if "profile" in entry:
            name = entry.pop("profile")
            if not isinstance(name, str):
                raise ProfileError(f"{here}: field 'profile': expected a profile name, got {name!r}")
            try:
                p = load_profile(name)
            except ProfileError as e:
                raise ProfileError(f"{here}: {e}") from None
            base = {k: getattr(p, k) for k in _FIELDS if getattr(p, k) is not None}
        if timeout is not None:  # the fleet's per-host timeout beats a profile's; an entry's own beats both
            base["timeout_s"] = timeout
        for k, v in entry.items():
            base[k] = _check(here, k, v)
        out.append(profile_from_dict(base, here))
    names = [p.name for p in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ProfileError(f"{where}: two hosts are named {dup!r}; give each a distinct `name`")
    return out
