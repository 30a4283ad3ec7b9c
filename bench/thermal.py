"""Thermal state around each benchmark case: SoC/CPU temperature, CPU clocks, throttle flags.

Read from sysfs (`class/thermal/thermal_zone*/temp` in millidegrees, `devices/system/cpu/
cpufreq/policy*/scaling_cur_freq` in kHz, x86 `cpu*/thermal_throttle/*_throttle_count`) and,
on a Raspberry Pi, `vcgencmd get_throttled`. A sensor that does not exist gives no field and
one reason in `missing`; nothing is filled in. The sysfs root is a parameter so tests run the
real reader on fixture trees (as the powercap reader's tests do).

A row is marked throttled when, over its case, the firmware reported under-voltage, a capped
or throttled clock or the soft temperature limit (now, or newly "has occurred"), or the
kernel's thermal throttle count rose. Cases are visited round-robin, so each one spans the
sweep: the flags are read before a case's first run and once at the end of the sweep, and a
sweep that throttled anywhere marks its rows (compare them with a cooler run, not each other).
"""

from __future__ import annotations

import glob
import os
import shutil
import threading
import time
from dataclasses import dataclass

from itera_runtime.errors import UsageError

from .sampler import BackgroundSampler

# thermal_zone types that are the CPU or SoC die, in the order they are preferred.
CPU_ZONE_TYPES = ("cpu-thermal", "cpu_thermal", "soc-thermal", "soc_thermal", "x86_pkg_temp", "cpu0-thermal",
                  "cpuss0-thermal")
# get_throttled bits that mean the measurement ran on a slowed or starved CPU.
THROTTLE_NOW = {0, 1, 2, 3}
THROTTLE_OCCURRED = {16, 17, 18, 19}
SAMPLE_INTERVAL_S = 0.05


@dataclass(frozen=True)
class ThermalOptions:
    """Pacing between cases and where the sensors are."""

    delay_s: float = 0.0  # sleep before every case run but the first (llama-bench --delay)
    cool_to_c: float | None = None  # before every case run but the first, wait until below this
    cool_timeout_s: float = 300.0
    sysfs_root: str = "/sys"
    vcgencmd: str = "vcgencmd"


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _zone_type(zone: str) -> str:
    try:
        with open(os.path.join(zone, "type")) as f:
            return f.read().strip()
    except OSError:
        return ""


def find_cpu_zone(sysfs_root: str) -> tuple[str | None, str, list[str]]:
    """(path of the CPU/SoC thermal zone or None, its type, every zone type seen)."""
    zones = sorted(glob.glob(os.path.join(sysfs_root, "class", "thermal", "thermal_zone*")),
                   key=lambda z: int("".join(c for c in os.path.basename(z) if c.isdigit()) or 0))
    typed = [(z, _zone_type(z)) for z in zones if _read_int(os.path.join(z, "temp")) is not None]
    for wanted in CPU_ZONE_TYPES:
        for z, t in typed:
            if t == wanted:
                return z, t, [t for _, t in typed]
    for z, t in typed:  # other SoCs name theirs e.g. "cpu-big0-thermal", "soc_max"
        if "cpu" in t.lower() or "soc" in t.lower():
            return z, t, [t for _, t in typed]
    return None, "", [t for _, t in typed]


class ThermalProbe(BackgroundSampler):
    """The sensors of this machine, found once; samples clocks and temperature while a case runs."""

    _thread_name = "thermal-sampler"

    def __init__(self, opts: ThermalOptions = ThermalOptions(), interval_s: float = SAMPLE_INTERVAL_S):
        self.opts, self.interval_s = opts, interval_s
        root = opts.sysfs_root
        self.zone, self.zone_type, seen = find_cpu_zone(root)
        cpufreq = os.path.join(root, "devices", "system", "cpu", "cpufreq")
        self.policies = sorted(p for p in glob.glob(os.path.join(cpufreq, "policy*"))
                               if _read_int(os.path.join(p, "scaling_cur_freq")) is not None)
        self.throttle_counts = sorted(glob.glob(os.path.join(root, "devices", "system", "cpu", "cpu[0-9]*",
                                                             "thermal_throttle", "*_throttle_count")))
        self.vcgencmd = shutil.which(opts.vcgencmd)
        self.missing: list[str] = []
        where = os.path.join(root, "class", "thermal")
        if self.zone is None:
            self.missing.append(f"no CPU/SoC thermal zone under {where}"
                                + (f" (zones seen: {', '.join(seen)})" if seen else ""))
        if not self.policies:
            self.missing.append(f"no cpufreq policy under {cpufreq}")
        if self.vcgencmd is None:
            self.missing.append(f"{opts.vcgencmd} not found (not a Raspberry Pi): no throttle flags")
        if opts.cool_to_c is not None and self.zone is None:
            raise UsageError(f"--cool-to {opts.cool_to_c:g}: {self.missing[0]}, so there is no temperature to wait for")
        self._lock = threading.Lock()
        self._current: CaseThermal | None = None
        self._final: tuple | None = None
        self._init_sampler()

    def temperature_c(self) -> float | None:
        milli = _read_int(os.path.join(self.zone, "temp")) if self.zone else None
        return None if milli is None else milli / 1000

    def clocks_mhz(self) -> list[float]:
        out = [_read_int(os.path.join(p, "scaling_cur_freq")) for p in self.policies]
        return [khz / 1000 for khz in out if khz is not None]

    def throttle_count(self) -> int | None:
        counts = [_read_int(p) for p in self.throttle_counts]
        return sum(c for c in counts if c is not None) if self.throttle_counts else None

    def throttled(self) -> dict | None:
        if self.vcgencmd is None:
            return None
        from .pi5pmic import PmicError, read_throttled

        try:
            return read_throttled(self.vcgencmd)
        except PmicError as e:
            return {"error": str(e)}

    def _observe(self, acc: CaseThermal) -> None:
        temp, mhz = self.temperature_c(), self.clocks_mhz()
        with self._lock:
            acc.see(temp, mhz)

    def _sample(self) -> None:
        acc = self._current
        if acc is not None:
            self._observe(acc)

    def begin(self, acc: CaseThermal) -> None:
        """Before one run of the case: readings now, then sampling into acc until end()."""
        first = not acc.runs
        if first:
            acc.temp_before_c = self.temperature_c()
            acc.throttled_before = self.throttled()
            acc.count_before = self.throttle_count()
        self._observe(acc)
        self._current = acc
        if self.zone or self.policies:
            self.start()

    def end(self, acc: CaseThermal) -> None:
        self._current = None
        self._observe(acc)
        acc.runs += 1
        acc.temp_after_c = self.temperature_c()  # overwritten by each later run: the last one stays

    def finish(self, acc: CaseThermal) -> dict:
        """After the sweep: the throttle state at its end, and the record's `thermal` fields."""
        if self._final is None:  # read once for every case of the sweep
            self.close()
            self._final = (self.throttled(), self.throttle_count())
        acc.throttled_after, acc.count_after = self._final
        return acc.fields(self)

    def pace(self, acc: CaseThermal | None = None) -> None:
        """Between two case runs: --delay, then --cool-to (the wait recorded on the next case)."""
        if self.opts.delay_s:
            time.sleep(self.opts.delay_s)
        if self.opts.cool_to_c is None:
            return
        start = time.monotonic()
        while (t := self.temperature_c()) is not None and t >= self.opts.cool_to_c:
            if time.monotonic() - start >= self.opts.cool_timeout_s:
                if acc is not None:
                    acc.cool_timeouts += 1
                break
            time.sleep(0.5)
        if acc is not None:
            acc.cool_wait_s += time.monotonic() - start


def _flag_bits(state: dict | None) -> set[int]:
    if not state or "raw" not in state:
        return set()
    value = int(state["raw"], 16)
    return {b for b in THROTTLE_NOW | THROTTLE_OCCURRED if value >> b & 1}


@dataclass
class CaseThermal:
    """What the sensors saw over one case's runs."""

    runs: int = 0
    temp_before_c: float | None = None
    temp_after_c: float | None = None
    temp_max_c: float | None = None
    mhz_min: float | None = None
    mhz_max: float | None = None
    throttled_before: dict | None = None
    throttled_after: dict | None = None
    count_before: int | None = None
    count_after: int | None = None
    cool_wait_s: float = 0.0
    cool_timeouts: int = 0

    def see(self, temp: float | None, mhz: list[float]) -> None:
        if temp is not None:
            self.temp_max_c = temp if self.temp_max_c is None else max(self.temp_max_c, temp)
        if mhz:
            self.mhz_min = min(mhz) if self.mhz_min is None else min(self.mhz_min, *mhz)
            self.mhz_max = max(mhz) if self.mhz_max is None else max(self.mhz_max, *mhz)

    def fields(self, probe: ThermalProbe) -> dict:
        """The record's `thermal`: measured values only, plus the sensors missing here."""
        out: dict = {}
        if probe.zone is not None:
            out["zone"] = probe.zone_type
            for key in ("temp_before_c", "temp_after_c", "temp_max_c"):
                if getattr(self, key) is not None:
                    out[key] = round(getattr(self, key), 3)
        if self.mhz_min is not None:
            out.update(cpu_mhz_min=self.mhz_min, cpu_mhz_max=self.mhz_max)
        if self.throttled_before is not None or self.throttled_after is not None:
            out.update(throttled_before=self.throttled_before, throttled_after=self.throttled_after)
        if self.count_before is not None and self.count_after is not None:
            out["throttle_count_delta"] = self.count_after - self.count_before
        before, after = _flag_bits(self.throttled_before), _flag_bits(self.throttled_after)
        flags = (before | after) & THROTTLE_NOW or (after - before) & THROTTLE_OCCURRED
        known = self.throttled_after is not None and "raw" in self.throttled_after or "throttle_count_delta" in out
        if known:
            out["throttled"] = bool(flags) or out.get("throttle_count_delta", 0) > 0
        if probe.opts.delay_s:
            out["delay_s"] = probe.opts.delay_s
        if probe.opts.cool_to_c is not None:
            out.update(cool_to_c=probe.opts.cool_to_c, cool_wait_s=round(self.cool_wait_s, 3),
                       cool_timeouts=self.cool_timeouts)
        if probe.missing:
            out["missing"] = list(probe.missing)
        return out
