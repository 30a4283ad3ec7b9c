"""itera-bench compare OLD NEW: two result sets side by side, row by row (compare-llama-bench.py).

Rows are matched on what identifies a measurement: kind, test, metric, the bundle (its
manifest's sha256), threads, graph set, onnxruntime settings and host. A key field whose
values do not overlap at all between OLD and NEW is what the user changed (a bundle, a
device, a setting): it is left out of the match and named in the output; a changed bundle is
then matched on family and parameter count (an int8 export has its fp32 source's count).

Speed-up = NEW / OLD for higher-is-better metrics, OLD / NEW otherwise (> 1: NEW is better).
Significance: the two-sided Mann-Whitney U test on the repetition samples (`samples`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache

from itera_runtime.errors import UsageError

from .record import Record, _num

ALPHA = 0.05
FORMATS = ("md", "csv", "json")
# (name shown, how a record gives it); the bundle's entry is replaced when the bundle changed
KEY_FIELDS = {
    "bundle": lambda r: r.bundle_sha256 or r.bundle,
    "threads": lambda r: r.n_threads,
    "graph set": lambda r: r.graph_set,
    "settings": lambda r: json.dumps(r.ort_settings, sort_keys=True),
    "host": lambda r: r.host,
}
SAME_MODEL = lambda r: (r.family, r.model_n_params)  # noqa: E731


# --------------------------------------------------------------------------- Mann-Whitney U


@lru_cache(maxsize=None)
def _u_counts(m: int, n: int) -> tuple[int, ...]:
    """How many orderings of m and n untied values give each U = 0..m*n (the exact null)."""
    if m == 0 or n == 0:
        return (1,)
    a, b = _u_counts(m - 1, n), _u_counts(m, n - 1)  # the largest value is from the first / second sample
    out = [0] * (m * n + 1)
    for u, c in enumerate(a):
        out[u + n] += c
    for u, c in enumerate(b):
        out[u] += c
    return tuple(out)


def mann_whitney_u(x: list[float], y: list[float]) -> tuple[float, float]:
    """(U of x, two-sided p) — exact null when both samples are small and untied, else normal
    with tie and continuity corrections (scipy's `method="auto"` rule; scipy is not a base
    dependency, and a Pi install should stay small, so this is the textbook test by hand)."""
    m, n = len(x), len(y)
    if m == 0 or n == 0:
        raise ValueError("Mann-Whitney U needs samples on both sides")
    pooled = sorted([(v, 0) for v in x] + [(v, 1) for v in y])
    ranks = [0.0] * len(pooled)
    ties, i = [], 0
    while i < len(pooled):  # average ranks over runs of equal values
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        ties.append(j - i + 1)
        i = j + 1
    r1 = sum(r for r, (_, side) in zip(ranks, pooled) if side == 0)
    u = r1 - m * (m + 1) / 2
    if max(ties) == 1 and max(m, n) <= 20:
        counts = _u_counts(m, n)
        total = sum(counts)
        lo = sum(counts[: int(u) + 1]) / total
        hi = sum(counts[int(u):]) / total
        return u, min(1.0, 2 * min(lo, hi))
    mean = m * n / 2
    var = m * n / 12 * ((m + n + 1) - sum(t ** 3 - t for t in ties) / ((m + n) * (m + n - 1)))
    if var <= 0:
        return u, 1.0
    z = (abs(u - mean) - 0.5) / math.sqrt(var)
    return u, min(1.0, math.erfc(max(z, 0) / math.sqrt(2)))


# --------------------------------------------------------------------------- matching


@dataclass
class Row:
    """One matched pair of rows."""

    kind: str
    test: str
    metric: str
    unit: str
    model_old: str
    model_new: str
    n_threads: int | None
    graph_set: str | None
    host: str
    old_median: float | None
    new_median: float | None
    old_n: int
    new_n: int
    speedup: float | None  # > 1: NEW is better
    p_value: float | None  # None: fewer than 2 repetitions on a side (a deterministic metric)
    significant: bool | None
    old_noisy: bool = False
    new_noisy: bool = False
    old_throttled: bool = False
    new_throttled: bool = False


@dataclass
class Comparison:
    rows: list[Row]
    changed: list[str]  # key fields whose values do not overlap between OLD and NEW
    unmatched_old: int
    unmatched_new: int


def _label(r: Record) -> str:
    q = r.quantization
    return r.model_filename + (f" {q}" if q and q not in ("none", "fp32") and q not in r.model_filename else "")


def compare(old: list[Record], new: list[Record]) -> Comparison:
    """Match NEW's rows to OLD's (module docstring) and test each pair."""
    if not old or not new:
        raise UsageError(f"nothing to compare: {'OLD' if not old else 'NEW'} has no records")
    changed = [name for name, get in KEY_FIELDS.items()
               if not {get(r) for r in old} & {get(r) for r in new}]
    fields = {name: get for name, get in KEY_FIELDS.items() if name not in changed}
    if "bundle" in changed:
        fields["model"] = SAME_MODEL

    def key(r: Record):
        return (r.kind, r.test, r.metric, *(get(r) for get in fields.values()))

    olds: dict = {}
    for r in old:
        olds.setdefault(key(r), r)  # the first of duplicates, as the report does
    rows, matched = [], set()
    for r in new:
        o = olds.get(key(r))
        if o is None or key(r) in matched:
            continue
        matched.add(key(r))
        speedup = None
        if o.median and r.median:
            speedup = r.median / o.median if r.higher_is_better else o.median / r.median
        p = mann_whitney_u(o.samples, r.samples)[1] if len(o.samples) > 1 and len(r.samples) > 1 else None
        rows.append(Row(r.kind, r.test, r.metric, r.unit, _label(o), _label(r), r.n_threads, r.graph_set, r.host,
                        o.median, r.median, len(o.samples), len(r.samples), speedup, p,
                        None if p is None else p < ALPHA, o.noisy, r.noisy, o.throttled, r.throttled))
    return Comparison(rows, changed, len(old) - len(matched), len(new) - len(matched))


# --------------------------------------------------------------------------- output


def _flags(noisy: bool, throttled: bool) -> str:
    return " (noisy)" * noisy + " (throttled)" * throttled


def format_comparison(c: Comparison, output: str) -> str:
    if output == "json":
        return json.dumps({"changed": c.changed, "alpha": ALPHA, "unmatched_old": c.unmatched_old,
                           "unmatched_new": c.unmatched_new, "rows": [asdict(r) for r in c.rows]}, indent=2)
    if output == "csv":
        buf = io.StringIO()
        names = list(Row.__dataclass_fields__)
        w = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
        w.writeheader()
        for r in c.rows:
            w.writerow({k: "" if v is None else v for k, v in asdict(r).items()})
        return buf.getvalue().rstrip("\n")
    if output != "md":
        raise ValueError(f"unknown output format {output!r}; choose from {', '.join(FORMATS)}")
    lines = []
    threads = len({r.n_threads for r in c.rows}) > 1
    hosts = len({r.host for r in c.rows}) > 1
    head = ["model (OLD → NEW)", "test"] + ["threads"] * threads + ["host"] * hosts + [
        "metric", "OLD (median)", "NEW (median)", "speed-up", "p (Mann-Whitney)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in c.rows:
        model = r.model_old if r.model_old == r.model_new else f"{r.model_old} → {r.model_new}"
        if r.p_value is None:
            sig = f"- ({min(r.old_n, r.new_n)} repetition)"
        else:
            sig = f"{r.p_value:.3g}" + ("" if r.significant else " not significant")
        cells = [model, r.test] + [str(r.n_threads)] * threads + [r.host] * hosts + [
            f"{r.metric} ({r.unit})", _num(r.old_median) + _flags(r.old_noisy, r.old_throttled),
            _num(r.new_median) + _flags(r.new_noisy, r.new_throttled),
            "-" if r.speedup is None else f"{r.speedup:.2f}x", sig]
        lines.append("| " + " | ".join(cells) + " |")
    if c.changed:
        how = " (bundles matched on family and parameter count)" if "bundle" in c.changed else ""
        lines.append(f"\nOLD and NEW differ in: {', '.join(c.changed)}{how}")
    lines.append(f"\nspeed-up > 1: NEW is better; not significant: two-sided Mann-Whitney U p >= {ALPHA} "
                 "on the repetition samples")
    if c.unmatched_old or c.unmatched_new:
        lines.append(f"unmatched: {c.unmatched_old} row(s) of OLD, {c.unmatched_new} row(s) of NEW")
    return "\n".join(lines)
