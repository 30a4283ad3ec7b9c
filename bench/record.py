"""One benchmark record for every subcommand, and its four output formats (md, csv, json, jsonl).

A `Record` says what was measured (kind, test name, metric, unit), on what (bundle, family,
quantization, bytes on disk, parameters), how (tokens, depth, threads, repetitions,
warm-up), the raw samples, their statistics and the provenance of the run. Field names
follow llama-bench where it has one (n_prompt, n_gen, n_depth, n_threads, avg_ns,
stddev_ns, avg_ts, stddev_ts, samples_ns, model_size, model_n_params, build_commit,
cpu_info). The statistics are computed from the samples, never stored apart from them, so
every format parses back into the same records (`parse`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

SPREAD_WARNING = 0.10  # (max - min) / median above this: the number is flagged as noisy
FORMATS = ("md", "csv", "json", "jsonl")


def _stdev(xs: list) -> float | None:
    """Sample standard deviation; nan when a sample is not finite (statistics.stdev raises on those)."""
    if not xs:
        return None
    if not all(math.isfinite(x) for x in xs):
        return math.nan
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


@dataclass
class Record:
    """One measured row."""

    kind: str  # latency | memory | energy | quality | flops | step | profile
    test: str  # llama-bench style: "pp512", "tg64@d2048"; or what a subcommand measures
    metric: str  # "tokens_per_s", "peak_rss_bytes", "joules_per_token", "bits_per_byte", ...
    unit: str
    samples: list[float] = field(default_factory=list)  # the metric, one per repetition
    higher_is_better: bool = True
    # on what
    bundle: str = ""
    bundle_sha256: str | None = None  # of its manifest.json, which pins every file's sha256
    model_filename: str = ""
    family: str = ""
    quantization: str = ""
    ssm_path: str | None = None
    graph_set: str | None = None  # which graphs of the bundle ran: fused | portable | default
    engine: str = "onnxruntime"
    model_size: int | None = None  # bytes on disk, every file of the bundle
    model_n_params: int | None = None
    model_n_params_active: int | None = None
    # how
    n_prompt: int = 0
    n_gen: int = 0
    n_depth: int = 0
    n_threads: int | None = None
    ort_settings: dict[str, Any] = field(default_factory=dict)  # onnxruntime thread-pool settings that ran
    repetitions: int = 0
    warmup: bool = True
    samples_ns: list[int] = field(default_factory=list)  # wall time of each timed repetition
    estimated: bool = False
    method: str | None = None  # how an estimate (or an unusual measurement) was made
    interrupted: bool = False  # Ctrl-C came before every repetition ran
    extra: dict[str, Any] = field(default_factory=dict)  # the subcommand's other measured values
    thermal: dict[str, Any] = field(default_factory=dict)  # bench/thermal.py: temperatures, clocks, throttling
    baseline: str | None = None  # bundle the ratio is against
    vs_baseline: float | None = None  # this median / the baseline's (>1 = better when higher is better)
    host: str = "local"
    build_commit: str | None = None
    cpu_info: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    # -- statistics, from the samples --------------------------------------------------
    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def avg(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None

    @property
    def stddev(self) -> float | None:
        return _stdev(self.samples)

    @property
    def min(self) -> float | None:
        return min(self.samples) if self.samples else None

    @property
    def max(self) -> float | None:
        return max(self.samples) if self.samples else None

    @property
    def spread(self) -> float | None:
        """(max - min) / median: how far apart the repetitions were."""
        m = self.median
        return (self.max - self.min) / abs(m) if m else None

    @property
    def noisy(self) -> bool:
        s = self.spread
        return s is not None and s > SPREAD_WARNING

    @property
    def throttled(self) -> bool:
        """The firmware or kernel reported throttling or under-voltage during the case."""
        return bool(self.thermal.get("throttled"))

    @property
    def avg_ns(self) -> float | None:
        return statistics.fmean(self.samples_ns) if self.samples_ns else None

    @property
    def stddev_ns(self) -> float | None:
        return _stdev(self.samples_ns)

    @property
    def avg_ts(self) -> float | None:
        """Mean tokens/s over repetitions (llama-bench's avg_ts), for throughput metrics."""
        return self.avg if self.metric == "tokens_per_s" else None

    @property
    def stddev_ts(self) -> float | None:
        return self.stddev if self.metric == "tokens_per_s" else None

    STATS = ("median", "avg", "stddev", "min", "max", "spread", "noisy", "throttled", "avg_ns", "stddev_ns", "avg_ts",
             "stddev_ts")

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update({k: getattr(self, k) for k in self.STATS})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


_FIELDS = [f.name for f in dataclasses.fields(Record)]
_NESTED = {"samples", "samples_ns", "extra", "thermal", "provenance", "ort_settings"}
CSV_COLUMNS = [f for f in _FIELDS if f != "provenance"] + list(Record.STATS) + ["provenance"]


def _csv_value(v: Any) -> Any:
    if isinstance(v, (list, dict)):
        return json.dumps(v, sort_keys=True)
    if v is None:
        return ""
    return v


def _from_csv(row: dict[str, str]) -> Record:
    types = {f.name: f.type for f in dataclasses.fields(Record)}
    out: dict[str, Any] = {}
    for name in _FIELDS:
        raw = row.get(name, "")
        if name in _NESTED:
            out[name] = json.loads(raw) if raw else ([] if name.startswith("samples") else {})
            continue
        t = str(types[name])
        if raw == "":
            out[name] = None if "None" in t else ("" if t.startswith("str") else raw)
        elif t.startswith("bool"):
            out[name] = raw == "True"
        elif t.startswith("int"):
            out[name] = int(raw)
        elif t.startswith("float"):
            out[name] = float(raw)
        else:
            out[name] = raw
    return Record(**out)


def format_records(records: list[Record], output: str) -> str:
    """The records in one of FORMATS (md for people, the others for machines)."""
    if output == "json":
        return json.dumps([r.to_dict() for r in records], indent=2)
    if output == "jsonl":
        return "\n".join(json.dumps(r.to_dict()) for r in records)
    if output == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in records:
            d = r.to_dict()
            w.writerow({k: _csv_value(d[k]) for k in CSV_COLUMNS})
        return buf.getvalue().rstrip("\n")
    if output == "md":
        return markdown(records)
    raise ValueError(f"unknown output format {output!r}; choose from {', '.join(FORMATS)}")


def parse(text: str, output: str) -> list[Record]:
    """Records back from json, jsonl or csv text (what format_records wrote)."""
    if output == "json":
        return [Record.from_dict(d) for d in json.loads(text)]
    if output == "jsonl":
        return [Record.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()]
    if output == "csv":
        return [_from_csv(row) for row in csv.DictReader(io.StringIO(text))]
    raise ValueError(f"cannot parse {output!r} (md is for people)")


# --------------------------------------------------------------------------- markdown


def _num(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _value(r: Record) -> str:
    est = " (est.)" if r.estimated else ""
    if r.median is None:
        return "not measured"
    text = f"{_num(r.median)}{est}"
    if len(r.samples) > 1:
        text += f" ± {_num(r.stddev)}"
    if r.noisy:
        text += " (noisy)"
    if r.throttled:
        text += " (throttled)"
    if r.interrupted:
        text += " (interrupted)"
    return text


def _thermal_cell(r: Record) -> str:
    """`48.1→55.3 °C, 1500–2400 MHz`: what the sensors saw over the case; `-` where none."""
    t = r.thermal
    parts = []
    if "temp_before_c" in t:
        parts.append(f"{t['temp_before_c']:.1f}→{t.get('temp_after_c', float('nan')):.1f} °C")
    if "cpu_mhz_min" in t:
        parts.append(f"{t['cpu_mhz_min']:.0f}–{t['cpu_mhz_max']:.0f} MHz")
    return ", ".join(parts) or "-"


def thermal_notes(records: list[Record]) -> list[str]:
    """One line per host naming the sensors missing there, however many rows lacked them."""
    missing: dict[str, dict[str, None]] = {}
    for r in records:
        for reason in r.thermal.get("missing", []):
            missing.setdefault(r.host, {})[reason] = None
    return [f"thermal ({host}): not recorded: {'; '.join(reasons)}" for host, reasons in missing.items()]


def markdown(records: list[Record]) -> str:
    """Tables for people: one per metric, rows side by side, ratio against the baseline."""
    if not records:
        return "(no records)"
    lines: list[str] = []
    groups: dict[tuple[str, str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r.kind, r.metric, r.unit), []).append(r)
    hosts = {r.host for r in records}
    host_col = len(hosts) > 1 or hosts != {"local"}
    for (kind, metric, unit), rows in groups.items():
        if lines:
            lines.append("")
        thermal_col = any(_thermal_cell(r) != "-" for r in rows)
        head = ["host"] * host_col + ["model", "family", "quant", "size", "test", "threads",
                                      f"{metric} ({unit}, median ± sd)", "vs baseline"] + ["thermal"] * thermal_col
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in rows:
            ratio = "-" if r.vs_baseline is None else f"{r.vs_baseline:.2f}x"
            size = "-" if r.model_size is None else f"{r.model_size / 1e6:.2f} MB"
            cells = [r.host] * host_col + [r.model_filename, r.family, r.quantization, size, r.test,
                                           "-" if r.n_threads is None else str(r.n_threads), _value(r), ratio]
            cells += [_thermal_cell(r)] * thermal_col
            lines.append("| " + " | ".join(cells) + " |")
    noisy = [r for r in records if r.noisy]
    if noisy:
        lines.append(f"\nwarning: {len(noisy)} row(s) spread more than {SPREAD_WARNING:.0%} between repetitions "
                     "(noisy): compare within one run, or add repetitions")
    throttled = [r for r in records if r.throttled]
    if throttled:
        lines.append(f"\nwarning: {len(throttled)} row(s) ran while the CPU was throttled or under-volted "
                     "(throttled): cool the device (--cool-to, --delay) and measure again")
    notes = thermal_notes(records)
    if notes:
        lines.append("\n" + "\n".join(notes))
    firsts = {r.host: r for r in reversed(records) if r.provenance}  # one provenance line per host
    for i, r in enumerate(sorted(firsts.values(), key=records.index)):
        p, versions = r.provenance, r.provenance.get("versions", {})
        where = f"{r.host}: " if host_col else ""
        system = f" {p.get('system')}, Python {versions.get('python')}," if host_col else ""
        b = p.get("board") or {}
        seen = "".join(f" {k} {', '.join(v) if isinstance(v, list) else v}," for k, v in b.items() if k != "os")
        lines.append(("\n" if i == 0 else "") + f"{where}commit {r.build_commit or p.get('git_commit')}, "
                     f"{p.get('cpu')}, {p.get('cpu_count')} CPUs,{system}{seen} onnxruntime {versions.get('onnxruntime')}, "
                     f"`{p.get('command')}`")
    return "\n".join(lines)
