"""Raspberry Pi 5 power from its PMIC's ADCs (`vcgencmd pmic_read_adc`), sampled in the background.

The firmware prints one line per channel, currents then voltages, e.g.

      VDD_CORE_A current(7)=1.42880000A
      VDD_CORE_V volt(15)=0.90659250V
         EXT5V_V volt(24)=5.14158000V     (a voltage with no current: not a power rail)

Power = Σ V·I over the rails that have both. It is labelled "PMIC rails" because it is not
the board's input power: it misses the 5 V input rail's own current (EXT5V has no current
channel), the PMIC's conversion losses, USB devices and the fan, so it reads below a USB-C
power meter (see bench/ENERGY.md). Energy over a window is the trapezoid integral of the
power samples; a `vcgencmd` call takes tens of milliseconds on a Pi 5, so the sampling
interval is what the firmware allows, and the window should last seconds.

`vcgencmd get_throttled` is read before and after each run: under-voltage or throttling
during a measurement makes it a measurement of something else, so the flags are recorded.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field

from .sampler import BackgroundSampler
from itera_runtime.errors import UserError

LABEL = "PMIC rails"
DEFAULT_COMMAND = "vcgencmd"
DEFAULT_INTERVAL_S = 0.1
_LINE = re.compile(r"^\s*(?P<rail>\S+)_(?P<kind>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)[AV]\s*$")
# get_throttled bits (Raspberry Pi documentation, "vcgencmd get_throttled").
THROTTLE_BITS = {0: "under-voltage", 1: "arm frequency capped", 2: "throttled", 3: "soft temperature limit",
                 16: "under-voltage has occurred", 17: "arm frequency capping has occurred",
                 18: "throttling has occurred", 19: "soft temperature limit has occurred"}


class PmicError(UserError, OSError):
    """vcgencmd missing, refused or printing no rails; the message is one line for the user."""


def parse_pmic_adc(text: str) -> dict[str, tuple[float, float]]:
    """Rails that report both: {rail: (volts, amps)} from `vcgencmd pmic_read_adc` output."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            (amps if m["kind"] == "A" else volts)[m["rail"]] = float(m["value"])
    return {rail: (volts[rail], amps[rail]) for rail in amps if rail in volts}


def rail_watts(rails: dict[str, tuple[float, float]]) -> float:
    return sum(v * a for v, a in rails.values())


def parse_throttled(text: str) -> dict:
    """`throttled=0x50005` → {"raw": "0x50005", "flags": [...]}."""
    m = re.search(r"throttled=(0x[0-9a-fA-F]+)", text)
    if not m:
        raise PmicError(f"pi5-pmic: cannot parse `vcgencmd get_throttled` output {text.strip()[:80]!r}")
    value = int(m[1], 16)
    return {"raw": m[1], "flags": [name for bit, name in THROTTLE_BITS.items() if value >> bit & 1]}


def _run(command: list[str]) -> str:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise PmicError(f"pi5-pmic: {command[0]} not found (not a Raspberry Pi, or the firmware tools "
                        f"are not installed)") from None
    except subprocess.TimeoutExpired:
        raise PmicError(f"pi5-pmic: `{' '.join(command)}` did not answer in 10 s") from None
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or "error=" in proc.stdout:
        detail = " ".join(out.split())[:160]
        hint = " (the user needs to be in the video group to open /dev/vcio)" if "vcio" in out or \
            "ermission" in out else ""
        raise PmicError(f"pi5-pmic: `{' '.join(command)}` failed (exit {proc.returncode}): {detail}{hint}")
    return proc.stdout


def read_throttled(command: str = DEFAULT_COMMAND) -> dict:
    """`vcgencmd get_throttled` now, parsed (PmicError if it cannot be run or read)."""
    return parse_throttled(_run([command, "get_throttled"]))


@dataclass
class PmicMeter(BackgroundSampler):
    """Samples total rail power every `interval_s` in a background thread; `joules(t0, t1)`
    integrates it between two monotonic times (a caller samples just before t0 and after t1)."""

    command: str = DEFAULT_COMMAND
    interval_s: float = DEFAULT_INTERVAL_S
    samples: list[tuple[float, float]] = field(default_factory=list)  # (monotonic s, watts)

    def __post_init__(self):
        if shutil.which(self.command) is None:
            raise PmicError(f"pi5-pmic: {self.command} not found on PATH (not a Raspberry Pi, or the firmware "
                            f"tools are not installed)")
        self._lock = threading.Lock()
        self._init_sampler()
        self.rails = sorted(self.read_rails())
        if not self.rails:
            raise PmicError(f"pi5-pmic: `{self.command} pmic_read_adc` printed no rail with both a voltage and a "
                            f"current (not a Raspberry Pi 5?)")

    source = LABEL

    def read_rails(self) -> dict[str, tuple[float, float]]:
        return parse_pmic_adc(_run([self.command, "pmic_read_adc"]))

    def throttled(self) -> dict:
        return read_throttled(self.command)

    def describe(self) -> dict:
        return {"rails": self.rails, "command": f"{self.command} pmic_read_adc",
                "misses": "5 V input current, PMIC conversion losses, USB devices, fan"}

    def sample(self) -> tuple[float, float]:
        """One reading now: (time at the middle of the call, watts)."""
        t0 = time.monotonic()
        watts = rail_watts(self.read_rails())
        point = ((t0 + time.monotonic()) / 2, watts)
        with self._lock:
            self.samples.append(point)
            self.samples.sort()
        return point

    def joules(self, t0: float, t1: float) -> float:
        """Integral over [t0, t1] of the power, linear between samples (exact trapezoids, the
        ends interpolated), so a window is charged for its own time only."""
        with self._lock:
            pts = list(self.samples)
        total = 0.0
        for (ta, wa), (tb, wb) in zip(pts, pts[1:]):
            lo, hi = max(ta, t0), min(tb, t1)
            if hi <= lo:
                continue
            at = lambda t: wa + (wb - wa) * (t - ta) / (tb - ta)  # noqa: E731
            total += (hi - lo) * (at(lo) + at(hi)) / 2
        return total

    _error_type = PmicError
    _thread_name = "pmic-sampler"

    def _sample(self) -> None:
        self.sample()
