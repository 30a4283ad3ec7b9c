"""A reader of Linux powercap energy counters (RAPL on Intel and AMD), sampled in the background.

Written by hand because no kept library does the four things a trustworthy number needs:
zones found by name (not by a fixed index), psys never added to package, the MMIO copy of a
package counter counted once, and wraparound caught by sampling faster than a counter can wrap.

The sysfs layout (`/sys/class/powercap`, one entry per zone, symlinks into the device tree):

    intel-rapl:0        name=package-0    energy_uj  max_energy_range_uj  constraint_*_max_power_uw
    intel-rapl:0:0      name=core         (inside package-0: never added to it)
    intel-rapl:0:1      name=uncore       (inside package-0)
    intel-rapl:0:2      name=dram         (beside the package's cores: added to it)
    intel-rapl:1        name=psys         (the whole platform: never added to package or dram)
    intel-rapl-mmio:0   name=package-0    (the same package counter read over MMIO: counted once)

Domains: `package` (every package-N), `dram`, `core`, `uncore`, `psys`. The total of a run is
package + dram by default (dram where the machine has it: many laptops and AMD parts do not); core and uncore are inside package and psys covers everything, so
a total never adds a zone to one that already contains it (`total_domains`).

`energy_uj` counts up to `max_energy_range_uj` and starts again at 0. A reading lower than
the last one is one wrap; two wraps between readings cannot be told from none, so the
sampler reads every zone at least four times per wrap period at the zone's maximum power.
Since Linux 5.10 (CVE-2020-8694, "Platypus") `energy_uj` is readable only by root.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field

from .sampler import BackgroundSampler
from itera_runtime.errors import UserError

DEFAULT_ROOT = "/sys/class/powercap"
DOMAINS = ("package", "dram", "core", "uncore", "psys")
DEFAULT_DOMAINS = ("package", "dram")
# Used only where a zone states no maximum power: above any desktop or laptop package.
ASSUMED_MAX_POWER_W = 500.0
MAX_INTERVAL_S = 1.0
_ZONE_DIR = re.compile(r"^(?P<type>[a-z][a-z0-9_-]*):(?P<index>\d+(?::\d+)*)$")


class PowercapError(UserError, OSError):
    """A zone that cannot be used; the message is one line for the user."""


def permission_message(path: str) -> str:
    return (f"powercap: {path} is readable only by root since Linux 5.10 (CVE-2020-8694); grant read access "
            f"with `sudo chmod o+r {os.path.dirname(os.path.dirname(path))}/*/energy_uj` (until reboot) or "
            f"the udev rule in bench/ENERGY.md, or run as root")


def read_uj(path: str) -> int:
    """One counter reading in µJ; PermissionError is turned into the one-line explanation."""
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except PermissionError:
        raise PowercapError(permission_message(path)) from None
    except (OSError, ValueError) as e:
        raise PowercapError(f"powercap: cannot read {path}: {e}") from None


@dataclass
class Zone:
    """One powercap zone: its sysfs entry, its name and how far its counter goes."""

    entry: str  # directory name, e.g. "intel-rapl:0:2"
    path: str
    name: str  # "package-0", "dram", "psys", ...
    control_type: str  # "intel-rapl" or "intel-rapl-mmio"
    index: tuple[int, ...]
    max_energy_range_uj: int
    max_power_w: float | None

    @property
    def domain(self) -> str:
        # multi-die parts name one zone per die: "package-0-die-1", each its own counter
        return "package" if re.fullmatch(r"package-\d+(?:-die-\d+)?", self.name) else self.name

    @property
    def parent_entry(self) -> str | None:
        return f"{self.control_type}:" + ":".join(map(str, self.index[:-1])) if len(self.index) > 1 else None

    @property
    def energy_path(self) -> str:
        return os.path.join(self.path, "energy_uj")

    def wrap_seconds(self) -> float:
        """Time the counter takes to wrap at the zone's maximum power."""
        watts = self.max_power_w or ASSUMED_MAX_POWER_W
        return self.max_energy_range_uj / 1e6 / watts


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _max_power_w(path: str) -> float | None:
    values = []
    for name in os.listdir(path):
        if re.fullmatch(r"constraint_\d+_max_power_uw", name):
            text = _read_text(os.path.join(path, name))
            if text and text.isdigit() and int(text) > 0:
                values.append(int(text) / 1e6)
    return max(values) if values else None


def discover(root: str = DEFAULT_ROOT) -> list[Zone]:
    """Every zone under root that has a name and an energy counter, in sysfs order."""
    if not os.path.isdir(root):
        raise PowercapError(f"powercap: {root} does not exist (no powercap/RAPL driver loaded, or a virtual "
                            f"machine that exposes none)")
    zones = []
    for entry in sorted(os.listdir(root)):
        m = _ZONE_DIR.match(entry)
        path = os.path.join(root, entry)
        name = _read_text(os.path.join(path, "name"))
        if not m or name is None or not os.path.exists(os.path.join(path, "energy_uj")):
            continue
        rng = _read_text(os.path.join(path, "max_energy_range_uj"))
        if not rng or not rng.isdigit() or int(rng) <= 0:
            raise PowercapError(f"powercap: {path}/max_energy_range_uj is missing or not a positive integer "
                                f"({rng!r}); wraparound could not be handled")
        zones.append(Zone(entry, path, name, m["type"], tuple(int(i) for i in m["index"].split(":")), int(rng),
                          _max_power_w(path)))
    if not zones:
        raise PowercapError(f"powercap: {root} has no zone with an energy counter")
    return zones


def select(zones: list[Zone], domains=DEFAULT_DOMAINS, optional=()) -> tuple[list[Zone], list[str]]:
    """The zones of the asked domains, each physical counter once; and notes on what was dropped.

    optional: domains that may be absent (dram in the default selection).
    A package counter exposed both as an MSR zone (intel-rapl) and an MMIO zone
    (intel-rapl-mmio) is the same energy: the MSR zone is kept.
    """
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown:
        raise PowercapError(f"powercap: unknown domain(s) {', '.join(unknown)}; choose from {', '.join(DOMAINS)}")
    notes = []
    chosen: dict[tuple[str, str | None], Zone] = {}
    by_entry = {z.entry: z for z in zones}
    for z in sorted(zones, key=lambda z: (z.control_type != "intel-rapl", z.entry)):
        if z.domain not in domains:
            continue
        # The same name under the same parent package is the same counter.
        parent = by_entry.get(z.parent_entry or "")
        key = (z.name, parent.name if parent else None)
        if key in chosen:
            notes.append(f"{z.entry} ({z.name}) duplicates {chosen[key].entry}: counted once")
            continue
        chosen[key] = z
    missing = [d for d in domains if d not in optional and not any(z.domain == d for z in chosen.values())]
    if missing:
        have = sorted({z.domain for z in zones})
        raise PowercapError(f"powercap: no {'/'.join(missing)} zone here (zones: {', '.join(have)})")
    return sorted(chosen.values(), key=lambda z: z.entry), notes


def total_domains(domains) -> list[str]:
    """The domains whose sum is the total, none contained in another: psys alone when asked,
    else package + dram, core/uncore only when package is not asked."""
    if "psys" in domains:
        return ["psys"]
    out = [d for d in ("package", "dram") if d in domains]
    if "package" not in domains:
        out += [d for d in ("core", "uncore") if d in domains]
    return out


@dataclass
class _Counter:
    zone: Zone
    last: int
    total_uj: int = 0
    wraps: int = 0


@dataclass
class PowercapMeter(BackgroundSampler):
    """Background sampler of the chosen zones; `read()` gives joules accumulated since start.

    interval_s: None picks a quarter of the shortest wrap time at maximum power (at most 1 s).
    `domains` ends up as the domains actually read.
    """

    root: str = DEFAULT_ROOT
    domains: tuple[str, ...] | None = None  # None: package, and dram where there is one
    interval_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        asked = self.domains or DEFAULT_DOMAINS
        self.zones, self.notes = select(discover(self.root), asked, optional=() if self.domains else ("dram",))
        self.domains = tuple(d for d in asked if any(z.domain == d for z in self.zones))
        fastest_wrap = min(z.wrap_seconds() for z in self.zones)
        if self.interval_s is None:
            self.interval_s = min(MAX_INTERVAL_S, fastest_wrap / 4)
        elif self.interval_s >= fastest_wrap:
            raise PowercapError(f"powercap: sampling every {self.interval_s} s could miss a wrap (a counter "
                                f"wraps in {fastest_wrap:.3g} s at maximum power)")
        self.reads = 0
        self._lock = threading.Lock()
        self._counters = [_Counter(z, read_uj(z.energy_path)) for z in self.zones]
        self._init_sampler()

    @property
    def source(self) -> str:
        types = sorted({z.control_type for z in self.zones})
        return f"Linux powercap ({', '.join(types)}) at {self.root}"

    def describe(self) -> dict:
        return {"zones": {z.entry: z.name for z in self.zones},
                "max_energy_range_uj": {z.entry: z.max_energy_range_uj for z in self.zones},
                "total_of": total_domains(self.domains), "notes": self.notes}

    def poll(self) -> None:
        """Read every zone once and add what it counted since the last read (one wrap allowed)."""
        with self._lock:
            for c in self._counters:
                now = read_uj(c.zone.energy_path)
                if now < c.last:
                    c.total_uj += c.zone.max_energy_range_uj - c.last + now
                    c.wraps += 1
                else:
                    c.total_uj += now - c.last
                c.last = now
            self.reads += 1

    def read(self) -> dict[str, float]:
        """Joules per domain counted since the meter was made (a fresh read first)."""
        self.poll()
        out: dict[str, float] = {}
        for c in self._counters:
            out[c.zone.domain] = out.get(c.zone.domain, 0.0) + c.total_uj / 1e6
        return out

    @property
    def wraps(self) -> int:
        return sum(c.wraps for c in self._counters)

    _error_type = PowercapError
    _thread_name = "powercap-sampler"

    def _sample(self) -> None:
        self.poll()

