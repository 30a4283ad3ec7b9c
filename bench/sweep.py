"""The one sweep every benchmark runs: cases visited round-robin, warm-up, progress, Ctrl-C.

A `Case` is one future row: a function that runs one repetition and returns its sample,
and the record it fills. Cases are visited round-robin across repetitions (rep 1 of every
case, then rep 2 of every case, ...), so drift on a shared machine hits every bundle alike
(pyperf's advice). Each case runs once untimed first unless warm-up is off. Ctrl-C stops the
sweep and keeps every case that has at least one sample, marked `interrupted`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from itera_runtime.bundle import Bundle
from itera_runtime.provenance import provenance

from .record import Record
from .thermal import CaseThermal, ThermalOptions, ThermalProbe


@dataclass
class Sample:
    """One repetition's result: the metric value, its wall time, and other measured values."""

    value: float
    ns: int | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Case:
    """One row to be: `run()` performs one repetition; `record` is the row's template."""

    record: Record
    run: Callable[[], Sample]
    extras: list[dict] = field(default_factory=list)


def bundle_fields(bundle: Bundle, graph_set: str | None = None) -> dict:
    """The record fields that describe a bundle and the graph set of it that ran.

    graph_set: what the session ran; None: the set the runtime picks here (`pick_graph_set`).
    """
    from itera_runtime.graphcheck import pick_graph_set

    graph_set = graph_set or pick_graph_set(bundle)
    params = bundle.manifest.params or {}
    return {
        "bundle": str(bundle.path),
        "bundle_sha256": bundle.sha256,
        "model_filename": os.path.basename(os.path.normpath(bundle.path)),
        "family": bundle.family,
        "quantization": bundle.quantization,
        "ssm_path": bundle.manifest.only_set(graph_set).ssm_path,
        "graph_set": graph_set,
        "model_size": bundle.size_bytes,
        "model_n_params": params.get("total"),
        "model_n_params_active": params.get("active_per_token"),
    }


def _merge_extras(extras: list[dict]) -> dict:
    """Per-repetition extra values → their median (numbers) or the last value (anything else)."""
    import statistics

    out: dict = {}
    for key in dict.fromkeys(k for e in extras for k in e):
        values = [e[key] for e in extras if key in e]
        nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[key] = statistics.median(nums) if len(nums) == len(values) else values[-1]
    return out


def run_cases(cases: list[Case], repetitions: int, warmup: bool = True, progress: bool = True,
              desc: str = "bench", thermal: ThermalOptions | None = None) -> list[Record]:
    """Run every case `repetitions` times round-robin; records with samples, thermal state and provenance.

    thermal: the pacing between case runs and where the sensors are (None: none, /sys).
    """
    from tqdm import tqdm

    prov = provenance()
    probe = ThermalProbe(thermal or ThermalOptions())
    seen = {id(case): CaseThermal() for case in cases}
    order = [(case, None) for case in cases] * warmup + [(case, rep) for rep in range(repetitions) for case in cases]
    interrupted = False
    with tqdm(total=len(order), desc=desc, file=sys.stderr, disable=not progress, leave=False) as bar:
        try:
            for i, (case, rep) in enumerate(order):
                if i:
                    probe.pace(seen[id(case)])
                if rep is None:  # warm-up
                    case.run()
                    bar.update(1)
                    continue
                probe.begin(seen[id(case)])
                try:
                    s = case.run()
                finally:
                    probe.end(seen[id(case)])
                case.record.samples.append(float(s.value))
                if s.ns is not None:
                    case.record.samples_ns.append(int(s.ns))
                case.extras.append(s.extra)
                bar.update(1)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            probe.close()
    records = []
    for case in cases:
        r = case.record
        if not r.samples:
            continue
        r.repetitions = len(r.samples)
        r.warmup = warmup
        r.interrupted = interrupted and len(r.samples) < repetitions
        r.extra = {**r.extra, **_merge_extras(case.extras)}
        r.thermal = probe.finish(seen[id(case)])
        records.append(r)
    stamp(records, prov)
    if interrupted:
        print(f"interrupted: kept {len(records)} row(s) with at least one repetition", file=sys.stderr)
    return records


def stamp(records: list[Record], prov: dict | None = None) -> None:
    """Give every record the provenance of this run (versions, commit, CPU, command)."""
    prov = prov or provenance()
    for r in records:
        r.provenance = {**prov, "threads": r.n_threads}
        r.build_commit, r.cpu_info = prov["git_commit"], prov["cpu"]


def compare_to_baseline(records: list[Record], baseline: str | None) -> None:
    """Fill vs_baseline: each row's median over the baseline bundle's row of the same test.

    baseline: a bundle path; None picks the first baseline-family bundle among the records.
    Rows are matched on (kind, test, metric, n_threads, host).
    """
    if baseline is None:
        baseline = next((r.bundle for r in records if r.family == "baseline"), None)
    if baseline is None:
        return
    key = lambda r: (r.kind, r.test, r.metric, r.n_threads, r.host)  # noqa: E731
    refs = {key(r): r for r in records if os.path.normpath(r.bundle) == os.path.normpath(baseline)}
    for r in records:
        ref = refs.get(key(r))
        if ref is None or not ref.median or r.median is None:
            continue
        r.baseline = ref.bundle
        r.vs_baseline = r.median / ref.median if r.higher_is_better else ref.median / r.median


def with_fields(record: Record, **changes) -> Record:
    """A copy of a template record with fields changed (each case gets its own)."""
    return dataclasses.replace(record, samples=[], samples_ns=[], extra=dict(record.extra), **changes)
