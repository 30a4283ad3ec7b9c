"""RAPL energy through `perf stat -e power/energy-pkg/` (the kernel's RAPL PMU).

Where powercap's `energy_uj` is root-only but perf events are allowed (CAP_PERFMON, or
`kernel.perf_event_paranoid` <= 0), perf reads the same counters. The kernel's PMU driver
handles counter overflow with its own timer, so no sampling of ours is needed.

One window is one perf process started with its events disabled (`-D -1`) and driven
through a control FIFO (`--control fifo:CTL,ACK`, perf >= 5.10): "enable" opens the window,
"disable" closes it, both acknowledged, so perf's start-up is not inside the window. SIGINT
then makes perf print its counts (`-x,`: value,unit,event,run time,percent,...).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from itera_runtime.errors import UserError

EVENT_SOURCE = "/sys/bus/event_source/devices/power/events"
# domain → perf event name (power/<name>/), the names the RAPL PMU uses
EVENTS = {"package": "energy-pkg", "dram": "energy-ram", "core": "energy-cores", "uncore": "energy-gpu",
          "psys": "energy-psys"}
DEFAULT_DOMAINS = ("package",)


class PerfError(UserError, OSError):
    """perf missing, not permitted, or the event unknown; the message is one line for the user."""


def parse_perf_stat(text: str) -> dict[str, float]:
    """Joules per event from `perf stat` output, CSV (-x,) or the human table.

    Raises PerfError for an event perf could not count (`<not supported>`, `<not counted>`).
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(",")
        if len(parts) >= 3 and parts[2].startswith("power/"):  # -x,: value,unit,event,run-time,percent,...
            value, unit, event = parts[0], parts[1], parts[2]
            if value.startswith("<"):
                raise PerfError(f"perf: {event} {value.strip('<>')}")
            out[event] = float(value) * _scale(unit)
            continue
        fields = line.split()
        # "8.45 Joules power/energy-pkg/" (thousands separators in some locales)
        if len(fields) >= 3 and fields[2].startswith("power/"):
            if fields[0].startswith("<"):
                raise PerfError(f"perf: {fields[-1]} {' '.join(fields[:2]).strip('<>')}")
            out[fields[2]] = float(fields[0].replace(",", "")) * _scale(fields[1])
        elif len(fields) >= 4 and fields[0].startswith("<") and fields[-1].startswith("power/"):
            raise PerfError(f"perf: {fields[-1]} {' '.join(fields[:2]).strip('<>')}")
    return out


def _scale(unit: str) -> float:
    return {"Joules": 1.0, "mJ": 1e-3, "uJ": 1e-6}.get(unit, 1.0)


def available_events() -> list[str]:
    try:
        return sorted(n for n in os.listdir(EVENT_SOURCE) if "." not in n)
    except OSError:
        return []


def _why_failed(stderr: str, event: str) -> str:
    text = " ".join(stderr.split())
    if "unknown term" in text or "event syntax error" in text:
        have = ", ".join(available_events()) or "none"
        return f"perf: event power/{event}/ is unknown to this kernel (power events here: {have})"
    if "ermission" in text or "perf_event_paranoid" in text or "Access to performance monitoring" in text:
        try:
            with open("/proc/sys/kernel/perf_event_paranoid", encoding="ascii") as f:
                level = f.read().strip()
        except OSError:
            level = "?"
        return (f"perf: system-wide power events need root, CAP_PERFMON or kernel.perf_event_paranoid <= 0 "
                f"(it is {level})")
    return f"perf: `perf stat` failed: {text[:200]}"


class PerfMeter:
    """One `perf stat` process per window, its events switched on and off through a FIFO."""

    source = "perf stat (RAPL PMU)"
    interval_s = None  # read at the window's ends; the kernel handles overflow

    def __init__(self, domains=DEFAULT_DOMAINS, perf: str = "perf"):
        unknown = [d for d in domains if d not in EVENTS]
        if unknown:
            raise PerfError(f"perf: unknown domain(s) {', '.join(unknown)}; choose from {', '.join(EVENTS)}")
        if shutil.which(perf) is None:
            raise PerfError(f"perf: {perf} not found on PATH (install linux-perf / linux-tools)")
        self.perf, self.domains = perf, tuple(domains)
        self.events = {f"power/{EVENTS[d]}/": d for d in self.domains}
        self._proc: subprocess.Popen | None = None

    def describe(self) -> dict:
        return {"events": list(self.events), "command": " ".join(self._command("CTL", "ACK")),
                "sampling": "perf reads the counters at each window's ends; the kernel handles overflow"}

    def _command(self, ctl: str, ack: str) -> list[str]:
        cmd = [self.perf, "stat", "-a", "-x,", "-D", "-1", "--control", f"fifo:{ctl},{ack}"]
        for e in self.events:
            cmd += ["-e", e]
        return cmd

    def begin(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="itera-perf-")
        ctl, ack = os.path.join(self._dir, "ctl"), os.path.join(self._dir, "ack")
        os.mkfifo(ctl)
        os.mkfifo(ack)
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(self._command(ctl, ack), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=self._stderr, text=True)
        # Opening a FIFO blocks until perf opens its end; perf that failed never will, so the
        # opens run in a thread and we wait on the process as well.
        opened: dict = {}

        def open_fifos():
            try:
                opened["ctl"] = open(ctl, "w")
                opened["ack"] = open(ack)
            except OSError as e:
                opened["error"] = e

        t = threading.Thread(target=open_fifos, daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.05)
            if self._proc.poll() is not None and t.is_alive():
                self._unblock(ctl, ack)
                t.join()
                raise PerfError(self._failure())
        self._ctl, self._ack = opened["ctl"], opened["ack"]
        self._command_fifo("enable")

    def _unblock(self, ctl: str, ack: str) -> None:
        # perf died before opening its ends: open them ourselves so our blocked open returns.
        for path, flags in ((ctl, os.O_RDONLY | os.O_NONBLOCK), (ack, os.O_WRONLY | os.O_NONBLOCK)):
            try:
                os.close(os.open(path, flags))
            except OSError:
                pass

    def _command_fifo(self, word: str) -> None:
        try:
            self._ctl.write(word + "\n")
            self._ctl.flush()
            reply = self._ack.readline()  # perf writes "ack\n" plus its C string's NUL
        except OSError:  # perf opened its ends and then died (e.g. an unknown event): say why
            raise PerfError(self._failure()) from None
        if reply.strip("\0\n") != "ack":
            raise PerfError(self._failure())

    def _failure(self) -> str:
        """Why perf failed, from its stderr; perf and our FIFOs are cleaned up."""
        try:  # a perf that closed its FIFO is exiting: let it finish writing why
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for f in (getattr(self, "_ctl", None), getattr(self, "_ack", None)):
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:  # perf died holding the other end: nothing left to flush to
                    pass
        shutil.rmtree(self._dir, ignore_errors=True)
        self._stderr.seek(0)
        text = self._stderr.read()
        self._stderr.close()
        return _why_failed(text, next(iter(self.events)).split("/")[1])

    def end(self) -> dict[str, float]:
        """Close the window; joules per domain."""
        self._command_fifo("disable")
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            raise PerfError("perf: perf stat did not stop within 10 s of SIGINT") from None
        finally:
            self._ctl.close()
            self._ack.close()
            shutil.rmtree(self._dir, ignore_errors=True)
        self._stderr.seek(0)
        text = self._stderr.read()
        self._stderr.close()
        counts = parse_perf_stat(text)
        missing = [e for e in self.events if e not in counts]
        if missing:
            raise PerfError(_why_failed(text, missing[0].split("/")[1]))
        return {self.events[e]: j for e, j in counts.items() if e in self.events}

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
