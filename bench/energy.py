"""Energy per token: joules per token (tokens per joule, average watts) for prefill and decode,
gross and net of an idle baseline measured in the same run, and CPU time per token always.

Counters (`--energy-backend`): powercap/RAPL (`powercap.py`), the Raspberry Pi 5 PMIC
(`pi5pmic.py`), `perf stat` (`perf_energy.py`), pyRAPL; `auto` takes the first that reads
and advances here.

What one repetition of a test measures (a "window"): the meter is read, then the generate
loop users run (`generate_tokens`, which calls `ModelSession.prefill` then decodes) is
repeated until the window has lasted `min_time_s`, then the meter is read again.
- `pp{n}`: a loop prefills n prompt tokens (after d tokens of context) and samples one token;
  tokens = n per loop.
- `tg{n}`: a loop generates n tokens from a one-token prompt (the one-token prefill is inside,
  as it is for users); tokens = n per loop.
Gross J/token = window joules / tokens. Net J/token subtracts the idle power (measured with
the same meter before and after the sweep, `idle_s` each) times the window's duration: what
the model costs above a machine that is on but doing nothing. Counters are system-wide, so
anything else running on the machine is in both numbers; run on a quiet machine.

CPU time (user + sys of this process, every onnxruntime thread included) per token is
measured in every window, with or without a counter. Without one, joules appear only with
`estimate=True`: CPU seconds × an assumed power per busy core, stored `estimated: true` with
the method and printed "(est.)".
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .record import Record
from itera_runtime.errors import UsageError, UserError

if TYPE_CHECKING:  # the runtime (numpy, onnxruntime) loads when measuring, not for `itera-bench --help`
    from .latency import Target
    from .sweep import Case, Sample

BACKENDS = ("auto", "powercap", "pi5-pmic", "perf", "pyrapl", "none")
AUTO_ORDER = ("powercap", "pi5-pmic", "perf")
PROBE_S = 0.25
DEFAULT_TDP_PER_CORE_W = 10.0


class EnergyUnavailable(UserError, ValueError):
    """No usable counter; `reasons` says, per backend tried, why not."""

    def __init__(self, reasons: list[str], explicit: str | None = None):
        self.reasons = reasons
        head = f"--energy-backend {explicit} cannot measure here" if explicit else "no energy counter here"
        super().__init__(f"energy: {head}: " + "; ".join(reasons))


@dataclass
class EnergyOptions:
    backend: str = "auto"
    domains: tuple[str, ...] | None = None  # None: the backend's default
    min_time_s: float = 2.0
    idle_s: float = 3.0
    interval_s: float | None = None  # background sampling (powercap, pi5-pmic); None: the backend's
    estimate: bool = False
    tdp_per_core_w: float = DEFAULT_TDP_PER_CORE_W
    powercap_root: str = "/sys/class/powercap"
    vcgencmd: str = "vcgencmd"


# --------------------------------------------------------------------------- meters


@dataclass
class Window:
    """Energy counted between `begin()` and `end()`."""

    joules_by_domain: dict[str, float]
    total_j: float


class Meter:
    """One backend behind `begin()` / `end()`; `info()` is what every record carries."""

    backend = ""
    source = ""
    domains: tuple[str, ...] = ()
    total_of: list[str] = []
    interval_s: float | None = None

    def begin(self) -> None:
        raise NotImplementedError

    def end(self) -> Window:
        raise NotImplementedError

    def details(self) -> dict:
        return {}

    def close(self) -> None:
        pass

    @property
    def label(self) -> str:
        """What the unit column names: the backend and the domains its total sums."""
        return f"{self.backend} {'+'.join(self.total_of)}"

    def info(self) -> dict:
        return {"energy_backend": self.backend, "energy_source": self.source, "energy_domains": list(self.domains),
                "energy_total_of": list(self.total_of), "sampling_interval_s": self.interval_s, **self.details()}

    def _window(self, joules: dict[str, float]) -> Window:
        return Window(joules, sum(joules.get(d, 0.0) for d in self.total_of))


class PowercapBackend(Meter):
    backend = "powercap"

    def __init__(self, opts: EnergyOptions):
        from .powercap import PowercapMeter, total_domains

        self.meter = PowercapMeter(opts.powercap_root, opts.domains, opts.interval_s)
        self.domains = self.meter.domains
        self.total_of = total_domains(self.domains)
        self.interval_s = self.meter.interval_s
        self.source = self.meter.source
        self.meter.start()

    def begin(self) -> None:
        self._start = self.meter.read()

    def end(self) -> Window:
        now = self.meter.read()
        return self._window({d: now[d] - self._start.get(d, 0.0) for d in now})

    def details(self) -> dict:
        return {**self.meter.describe(), "wraps_seen": self.meter.wraps}

    def close(self) -> None:
        self.meter.close()


class PmicBackend(Meter):
    backend = "pi5-pmic"
    label = "PMIC rails"  # not the board's input power: see pi5pmic.py
    domains = ("pmic_rails",)
    total_of = ["pmic_rails"]

    def __init__(self, opts: EnergyOptions):
        from .pi5pmic import DEFAULT_INTERVAL_S, LABEL, PmicMeter

        if opts.domains:
            raise UsageError("pi5-pmic: --energy-domains does not apply (the PMIC sums its rails)")
        self.meter = PmicMeter(opts.vcgencmd, opts.interval_s or DEFAULT_INTERVAL_S)
        self.interval_s = self.meter.interval_s
        self.source = LABEL
        self.throttled_before = self.meter.throttled()
        self.meter.start()

    def begin(self) -> None:
        self.meter.sample()  # a reading just before the window opens, one just after it closes
        self._t0 = time.monotonic()

    def end(self) -> Window:
        t1 = time.monotonic()
        self.meter.sample()
        self.span = (self._t0, t1)
        return self._window({"pmic_rails": self.meter.joules(self._t0, t1)})

    def details(self) -> dict:
        return {**self.meter.describe(), "throttled_before": self.throttled_before,
                "throttled_after": getattr(self, "throttled_after", None)}

    def close(self) -> None:
        self.meter.close()
        try:
            self.throttled_after = self.meter.throttled()
        except Exception:  # noqa: BLE001 - the run is over; a failed read is recorded as missing
            self.throttled_after = None


class PerfBackend(Meter):
    backend = "perf"

    def __init__(self, opts: EnergyOptions):
        from .perf_energy import DEFAULT_DOMAINS, PerfMeter
        from .powercap import total_domains

        self.domains = tuple(opts.domains or DEFAULT_DOMAINS)
        self.meter = PerfMeter(self.domains)
        self.total_of = total_domains(self.domains)
        self.source = PerfMeter.source

    def begin(self) -> None:
        self.meter.begin()

    def end(self) -> Window:
        return self._window(self.meter.end())

    def details(self) -> dict:
        return self.meter.describe()

    def close(self) -> None:
        self.meter.close()


class PyraplBackend(Meter):
    """pyRAPL reads the same powercap files, package and dram only, with no wraparound handling
    of its own: offered because users know it; `powercap` is the backend to trust."""

    backend = "pyrapl"
    source = "pyRAPL (Intel RAPL via powercap; unmaintained since 2019)"

    def __init__(self, opts: EnergyOptions):
        import logging

        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.ERROR)  # pyRAPL warns at import about pandas/pymongo outputs we do not use
        try:
            import pyRAPL
        except ImportError:
            raise UsageError("pyrapl: pyRAPL is not installed (pip install 'itera-lite[energy]')") from None
        finally:
            logger.setLevel(level)
        self.domains = tuple(opts.domains or ("package", "dram"))
        devices = {"package": pyRAPL.Device.PKG, "dram": pyRAPL.Device.DRAM}
        unknown = [d for d in self.domains if d not in devices]
        if unknown:
            raise UsageError(f"pyrapl: pyRAPL has no domain {', '.join(unknown)} (only package, dram)")
        try:
            # devices=None: pyRAPL's default, package and dram where there is one
            pyRAPL.setup(devices=[devices[d] for d in self.domains] if opts.domains else None)
        except Exception as e:  # noqa: BLE001 - pyRAPL raises bare exception types without messages
            why = str(e) or "it found no RAPL counter it can read"
            raise UsageError(f"pyrapl: pyRAPL.setup failed ({type(e).__name__}: {why})") from None
        self._pyrapl = pyRAPL
        self.total_of = list(self.domains)

    def begin(self) -> None:
        self._m = self._pyrapl.Measurement("itera-bench")
        self._m.begin()

    def end(self) -> Window:
        self._m.end()
        r = self._m.result
        joules = {}
        for d, values in (("package", r.pkg), ("dram", r.dram)):
            if d in self.domains and values:
                joules[d] = sum(v for v in values if v >= 0) / 1e6  # µJ per socket, -1 where absent
        return self._window(joules)


_BACKEND_CLASSES = {"powercap": PowercapBackend, "pi5-pmic": PmicBackend, "perf": PerfBackend,
                    "pyrapl": PyraplBackend}


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _try(name: str, opts: EnergyOptions) -> Meter:
    """A meter whose counter could be read and advanced over a short probe window.

    Every backend fails with an OSError (PowercapError, PmicError, PerfError: a device or a
    tool) or a ValueError (an option it cannot take), its message one line.
    """
    try:
        meter = _BACKEND_CLASSES[name](opts)
    except (ValueError, OSError) as e:
        raise EnergyUnavailable([_one_line(e)]) from None
    try:
        meter.begin()
        time.sleep(PROBE_S)
        w = meter.end()
    except (ValueError, OSError) as e:
        meter.close()
        raise EnergyUnavailable([_one_line(e)]) from None
    if w.total_j <= 0:
        meter.close()
        raise EnergyUnavailable([f"{name}: the counter did not advance in {PROBE_S} s ({meter.source} reads "
                                 f"{w.total_j:g} J; a virtual machine can expose a counter without the energy)"])
    return meter


def open_meter(opts: EnergyOptions) -> tuple[Meter | None, list[str]]:
    """The meter to use and, where there is none, why each backend tried failed.

    An explicit backend that fails raises EnergyUnavailable; `auto` returns (None, reasons).
    """
    if opts.backend not in BACKENDS:
        raise ValueError(f"unknown energy backend {opts.backend!r}; choose from {', '.join(BACKENDS)}")
    if opts.backend == "none":
        return None, ["--energy-backend none"]
    if opts.backend != "auto":
        try:
            return _try(opts.backend, opts), []
        except EnergyUnavailable as e:
            raise EnergyUnavailable(e.reasons, explicit=opts.backend) from None
    reasons = []
    for name in AUTO_ORDER:
        try:
            return _try(name, opts), []
        except EnergyUnavailable as e:
            reasons += e.reasons
    return None, reasons


# --------------------------------------------------------------------------- measuring


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (onnxruntime's pool included).

    process_time reads CLOCK_PROCESS_CPUTIME_ID (ns); os.times counts 10 ms clock ticks, which
    made a short window on a busy machine read 0.0 ms/token."""
    return time.process_time()


@dataclass
class Measured:
    """One window."""

    tokens: int
    seconds: float
    cpu_s: float
    window: Window | None = None

    @property
    def cpu_ms_per_token(self) -> float:
        return self.cpu_s * 1e3 / self.tokens


def measure(work: Callable[[], int], meter: Meter | None, min_time_s: float) -> Measured:
    """Run `work` (returns tokens done) until min_time_s has passed, inside one meter window."""
    cpu0 = cpu_seconds()
    if meter:
        meter.begin()
    t0 = time.perf_counter()
    tokens = 0
    while True:
        tokens += work()
        if time.perf_counter() - t0 >= min_time_s:
            break
    seconds = time.perf_counter() - t0
    window = meter.end() if meter else None
    return Measured(tokens, seconds, cpu_seconds() - cpu0, window)


def idle_watts(meter: Meter, seconds: float) -> float:
    """Average power of this machine doing nothing, with the same meter."""
    meter.begin()
    t0 = time.perf_counter()
    time.sleep(seconds)
    elapsed = time.perf_counter() - t0
    return meter.end().total_j / elapsed


@dataclass
class _EnergyCase:
    case: Case
    measured: list[Measured] = field(default_factory=list)


def _case(target: Target, test: str, work: Callable[[], int], meter: Meter | None,
          opts: EnergyOptions, **how) -> _EnergyCase:
    from .sweep import Case, Sample

    ec: _EnergyCase

    def run() -> Sample:
        m = measure(work, meter, opts.min_time_s)
        ec.measured.append(m)
        value = m.window.total_j / m.tokens if meter else m.cpu_ms_per_token
        return Sample(value, int(m.seconds * 1e9))

    if meter:
        template = target.template("energy", test, "joules_per_token", f"J/token, {meter.label}",
                                   higher_is_better=False, **how)
    else:
        template = target.template("energy", test, "cpu_ms_per_token", "CPU time ms/token", higher_is_better=False,
                                   **how)
    ec = _EnergyCase(Case(template, run))
    return ec


def energy_cases(targets: list[Target], n_prompt: list[int], n_gen: list[int], n_depth: list[int],
                 meter: Meter | None, opts: EnergyOptions) -> list[_EnergyCase]:
    """pp and tg tests for every target, in llama-bench's order, as latency has them."""
    from .latency import check_depth

    out = []
    for target in targets:
        for p in (p for p in n_prompt if p):
            for d in n_depth:
                check_depth(target.bundle, d, p)
                out.append(_case(target, f"pp{p}" + (f"@d{d}" if d else ""),
                                 _prompt_work(target, p, d), meter, opts, n_prompt=p, n_depth=d))
        for n in (n for n in n_gen if n):
            for d in n_depth:
                check_depth(target.bundle, d, n + 1)
                out.append(_case(target, f"tg{n}" + (f"@d{d}" if d else ""),
                                 _gen_work(target, n, d), meter, opts, n_gen=n, n_depth=d))
    return out


def _prompt_work(target: Target, n_prompt: int, n_depth: int) -> Callable[[], int]:
    from itera_runtime.generate import generate_tokens
    from itera_runtime.sampling import Sampler

    from .latency import GREEDY

    sampler = Sampler(GREEDY)
    ids = target.context(n_depth + n_prompt)[n_depth:]
    state = target.state_after(n_depth)

    def work() -> int:
        for _ in generate_tokens(target.session, ids, 1, sampler, state=state):
            pass
        return n_prompt

    return work


def _gen_work(target: Target, n_gen: int, n_depth: int) -> Callable[[], int]:
    from itera_runtime.generate import generate_tokens
    from itera_runtime.sampling import Sampler

    from .latency import GREEDY

    sampler = Sampler(GREEDY)
    start = max(n_depth, 1)
    prompt = target.context(start)[start - 1:]
    state = target.state_after(start - 1)

    def work() -> int:
        for _ in generate_tokens(target.session, prompt, n_gen, sampler, state=state):
            pass
        return n_gen

    return work


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def estimate_method(tdp_per_core_w: float) -> str:
    return (f"CPU time (user+sys) x {tdp_per_core_w:g} W per busy core (an assumed TDP per core, not measured; "
            f"set --tdp-per-core-w)")


def records_from(ec: _EnergyCase, meter: Meter | None, idle: dict, reasons: list[str], opts: EnergyOptions,
                 r: Record) -> list[Record]:
    """The rows of one case: gross and net J/token with a counter, CPU time always, an estimate if asked."""
    from .sweep import with_fields

    ms = ec.measured[-len(r.samples):]  # the timed repetitions (a warm-up ran first)
    ns = list(r.samples_ns)
    common = {"tokens_per_window": _median([m.tokens for m in ms]),
              "window_s": _median([m.seconds for m in ms]), "min_time_s": opts.min_time_s}
    cpu = with_fields(r, metric="cpu_ms_per_token", unit="CPU time ms/token", higher_is_better=False)
    cpu.samples, cpu.samples_ns = [m.cpu_ms_per_token for m in ms], ns
    cpu.extra.update(common, cpu_time="user+sys CPU time of the process per token (not energy)")
    if meter is None:
        cpu.extra["energy"] = "not measurable here: " + "; ".join(reasons)
        out = [cpu]
        if opts.estimate:
            est = with_fields(cpu, metric="joules_per_token", unit="J/token (est.)", estimated=True,
                              method=estimate_method(opts.tdp_per_core_w))
            est.samples, est.samples_ns = [m.cpu_s * opts.tdp_per_core_w / m.tokens for m in ms], ns
            est.extra["tdp_per_core_w"] = opts.tdp_per_core_w
            out.append(est)
        return out
    info = {**meter.info(), **idle, **common}
    watts = [m.window.total_j / m.seconds for m in ms]
    gross = [m.window.total_j / m.tokens for m in ms]
    r.extra.update(info, avg_watts=_median(watts),
                   tokens_per_joule=_median([m.tokens / m.window.total_j for m in ms if m.window.total_j > 0]),
                   joules_by_domain={d: _median([m.window.joules_by_domain.get(d, 0.0) / m.tokens for m in ms])
                                     for d in ms[0].window.joules_by_domain})
    r.samples = gross
    net_j = [m.window.total_j - idle["idle_watts"] * m.seconds for m in ms]
    net = with_fields(r, metric="joules_per_token_net", unit=f"J/token above idle, {meter.label}")
    net.samples, net.samples_ns = [j / m.tokens for j, m in zip(net_j, ms)], ns
    net.extra.update(avg_watts_above_idle=_median([j / m.seconds for j, m in zip(net_j, ms)]),
                     tokens_per_joule=_median([m.tokens / j for j, m in zip(net_j, ms) if j > 0]))
    cpu.extra.update(energy_backend=meter.backend)
    return [r, net, cpu]


def run_energy(targets: list[Target], n_prompt: list[int], n_gen: list[int], n_depth: list[int],
               repetitions: int, warmup: bool, opts: EnergyOptions, progress: bool = True,
               thermal=None) -> list[Record]:
    """Measure every case round-robin between two idle baselines; the rows of every case."""
    from .sweep import run_cases

    meter, reasons = open_meter(opts)
    try:
        cases = energy_cases(targets, n_prompt, n_gen, n_depth, meter, opts)
        idle: dict = {}
        if meter:
            idle["idle_watts_before"] = idle_watts(meter, opts.idle_s)
        records = run_cases([c.case for c in cases], repetitions, warmup, progress=progress, desc="energy",
                            thermal=thermal)
        if meter:
            if not any(r.interrupted for r in records):
                idle["idle_watts_after"] = idle_watts(meter, opts.idle_s)
            values = [v for k, v in idle.items() if k.startswith("idle_watts_")]
            idle.update(idle_watts=statistics.fmean(values), idle_s=opts.idle_s)
    finally:
        if meter:
            meter.close()
    by_record = {id(c.case.record): c for c in cases}
    out = []
    for r in records:
        out += records_from(by_record[id(r)], meter, idle, reasons, opts, r)
    if meter and meter.backend == "pi5-pmic":  # read after close(): the flags covering the whole run
        for r in out:
            r.extra["throttled_after"] = getattr(meter, "throttled_after", None)
    return out
