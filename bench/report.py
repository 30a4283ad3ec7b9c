"""itera-bench report: record files (and training runs) → one markdown page with PNG plots.

The report is written by kind and metric, not by subcommand, so a record kind added later
(or one this module has never heard of) still gets its table, and a plot against depth when
it was measured at several. Sections appear only when their records exist:

- speed: decode tokens/s against depth (tgN), prompt tokens/s (ppN), the raw step;
- memory: each bytes metric against context, with the carried state beside it;
- energy: J/token, or CPU-seconds/token labelled as CPU time; estimates marked "(est.)";
- quality: bits/byte against bundle size;
- the claims table (bench/claims.py) when records of both families are present;
- training curves (bench/curves.py) for run folders given with `runs`.

A results folder given as input is read whole (its *.json, *.jsonl, *.csv record files) plus
its *.err files: one line each, why a subcommand measured nothing (`itera-bench all` writes
them), shown under "Not measured" and used by the claims table as the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

from .plot import PALETTE, figure, save
from .claims import energy_source
from .record import SPREAD_WARNING, Record, markdown, thermal_notes
from .results import ReportError, load_results  # noqa: F401  (load_results: also importable from here)
from .sweep import compare_to_baseline

REPORT_NAME = "report.md"
CLAIMS_JSON = "claims.json"
SECTIONS = ("latency", "step", "memory", "energy", "quality")  # kinds with a section of their own


# --------------------------------------------------------------------------- labels and plots


def _labeller(records: list[Record]):
    """Series names: the bundle folder, plus threads/host only when they vary."""
    threads = {r.n_threads for r in records if r.n_threads is not None}  # None: not a per-thread row
    hosts = {r.host for r in records}

    def label(r: Record) -> str:
        name = r.model_filename or os.path.basename(os.path.normpath(r.bundle)) or r.family
        if r.quantization and r.quantization not in ("none", "fp32") and r.quantization not in name:
            name += f" {r.quantization}"
        if len(threads) > 1 and r.n_threads is not None:
            name += f" t{r.n_threads}"
        if len(hosts) > 1:
            name += f" @{r.host}"
        return name

    return label


def _est(r: Record) -> str:
    return " (est.)" if r.estimated else ""


def _sorted_by_depth(rows: list[Record]) -> list[Record]:
    return sorted(rows, key=lambda r: r.n_depth)


def _plot_vs_depth(rows: list[Record], label, ylabel: str, title: str, path: Path, series_key=None,
                   log_y: bool = False):
    """The metric's median (± stddev) against depth, one line per series; None if < 2 depths."""
    if len({r.n_depth for r in rows}) < 2:
        return None
    series: dict[str, list[Record]] = defaultdict(list)
    for r in rows:
        series[(series_key or label)(r)].append(r)
    fig, (ax,) = figure(1, width=6.4, height=4.0)
    for colour, (name, pts) in zip(PALETTE * 8, series.items()):
        pts = _sorted_by_depth(pts)
        xs = [r.n_depth for r in pts]
        ax.errorbar(xs, [r.median for r in pts], yerr=[r.stddev or 0 for r in pts], color=colour, marker="o",
                    markersize=4, capsize=3, label=name + (" (est.)" if any(r.estimated for r in pts) else ""))
    ax.set_xlabel("depth (tokens already in the context)")
    ax.set_ylabel(ylabel)
    positive = [r.n_depth for r in rows if r.n_depth > 0]
    if positive and max(positive) > 20 * min(positive):  # 128 and 2048 on one axis
        ax.set_xscale("symlog", linthresh=min(positive))
    values = [r.median for r in rows if r.median]
    if log_y or (values and min(values) > 0 and max(values) > 100 * min(values)):  # constant SSM state vs KV cache
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    return save(fig, path)


def _plot_bars(rows: list[Record], label, ylabel: str, title: str, path: Path, scale: float = 1.0):
    """Grouped bars: one group per test, one bar per series; estimates hatched and named."""
    if not rows:
        return None
    tests = list(dict.fromkeys(r.test for r in rows))
    names = list(dict.fromkeys(label(r) for r in rows))
    fig, (ax,) = figure(1, width=max(5.0, 1.5 + 0.35 * len(tests) * len(names)), height=4.0)
    width = 0.8 / len(names)
    named = set()
    for i, (colour, name) in enumerate(zip(PALETTE * 8, names)):
        for j, test in enumerate(tests):
            r = next((r for r in rows if r.test == test and label(r) == name), None)
            if r is None or r.median is None:
                continue
            legend = name + _est(r)
            ax.bar(j + (i - (len(names) - 1) / 2) * width, r.median / scale, width, yerr=(r.stddev or 0) / scale,
                   color=colour, capsize=3, hatch="//" if r.estimated else None,
                   edgecolor="black" if r.estimated else colour, label=None if legend in named else legend)
            named.add(legend)
    ax.set_xticks(range(len(tests)), tests)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    return save(fig, path)


def _plot_quality_vs_size(rows: list[Record], label, path: Path):
    pts = [r for r in rows if r.model_size and r.median is not None]
    if not pts:
        return None
    fig, (ax,) = figure(1, width=6.4, height=4.2)
    families = list(dict.fromkeys(r.family for r in pts))
    for colour, fam in zip(PALETTE, families):
        mine = [r for r in pts if r.family == fam]
        ax.errorbar([r.model_size / 1e6 for r in mine], [r.median for r in mine],
                    yerr=[r.stddev or 0 for r in mine], fmt="o", color=colour, capsize=3, label=fam or "?")
        for r in mine:
            ax.annotate(f"{label(r)}{_est(r)}", (r.model_size / 1e6, r.median), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("bundle size on disk (MB, log)")
    ax.set_ylabel(f"{pts[0].metric} ({pts[0].unit}; lower is better)")
    ax.set_title("Quality against bundle size", fontsize=10)
    ax.legend(fontsize=7)
    return save(fig, path)


# --------------------------------------------------------------------------- sections


def _table(rows: list[Record]) -> str:
    # provenance and the sensors missing are said once for the report, not under every table
    return markdown([dataclasses.replace(r, provenance={}, thermal={k: v for k, v in r.thermal.items() if k != "missing"})
                     for r in rows])


def _image(title: str, png) -> list[str]:
    return [f"![{title}]({png.name})", ""] if png is not None else []


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _speed(records, label, out: Path) -> list[str]:
    lat = [r for r in records if r.kind == "latency"]
    if not lat:
        return []
    parts = ["## Speed", ""]
    tg = [r for r in lat if r.test.startswith("tg")]
    requests = [r for r in lat if "+tg" in r.test]
    pp = [r for r in lat if r.test.startswith("pp") and r not in requests]
    if tg:
        png = _plot_vs_depth(tg, label, "decode tokens/s", "Decode tokens/s against depth (median ± sd)",
                             out / "decode_tokens_per_s.png",
                             series_key=(lambda r: label(r) + (f" tg{r.n_gen}" if len({x.n_gen for x in tg}) > 1 else "")))
        parts += ["### Decode tokens/s", "", *_image("decode tokens/s vs depth", png), _table(tg), ""]
    if pp:
        png = _plot_bars(pp, label, "prompt tokens/s", "Prompt processing tokens/s (median ± sd)",
                         out / "prompt_tokens_per_s.png")
        parts += ["### Prompt processing tokens/s", "", *_image("prompt tokens/s", png), _table(pp), ""]
    if requests:
        parts += ["### Requests: prompt then generation, and time to first token", "", _table(requests), ""]
    other = [r for r in lat if r not in tg and r not in pp and r not in requests]
    if other:
        parts += [_table(other), ""]
    return parts


def _step(records, label, out: Path) -> list[str]:
    rows = [r for r in records if r.kind == "step"]
    if not rows:
        return []
    png = _plot_vs_depth(rows, label, f"{rows[0].metric} ({rows[0].unit})", "Raw decode step against depth",
                         out / "step_vs_depth.png")
    return ["## Decode step (no sampling)", "", *_image("step vs depth", png), _table(rows), ""]


def _memory(records, label, out: Path) -> list[str]:
    rows = [r for r in records if r.kind == "memory"]
    if not rows:
        return []
    parts = ["## Memory", ""]
    for metric in dict.fromkeys(r.metric for r in rows):
        mine = [r for r in rows if r.metric == metric]
        in_bytes = mine[0].unit.lower() in ("b", "bytes", "byte")
        if in_bytes:
            scaled = [dataclasses.replace(r, samples=[s / 1e6 for s in r.samples]) for r in mine]
            png = _plot_vs_depth(scaled, label, f"{metric} (MB)", f"{metric} against context (MB)", out / f"memory_{_slug(metric)}.png")
        else:
            png = _plot_vs_depth(mine, label, f"{metric} ({mine[0].unit})", f"{metric} against context",
                                 out / f"memory_{_slug(metric)}.png")
        if png is None and len(mine) > 1:
            png = _plot_bars(mine, label, f"{metric} ({'MB' if in_bytes else mine[0].unit})", metric,
                             out / f"memory_{_slug(metric)}.png", scale=1e6 if in_bytes else 1.0)
        parts += [f"### {metric}", "", *_image(metric, png), _table(mine), ""]
        keys = sorted({k for r in mine for k in r.extra if k.endswith("_bytes")})
        if keys:
            head = ["model", "test", "depth", *keys]
            parts += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for r in _sorted_by_depth(mine):
                cells = [label(r), r.test, str(r.n_depth)] + [
                    f"{round(r.extra[k]):,}" if isinstance(r.extra.get(k), (int, float)) else "-" for k in keys]
                parts.append("| " + " | ".join(cells) + " |")
            parts.append("")
    return parts


def _energy(records, label, out: Path) -> list[str]:
    rows = [r for r in records if r.kind == "energy"]
    if not rows:
        return []
    parts = ["## Energy", ""]
    for metric in dict.fromkeys(r.metric for r in rows):
        mine = [r for r in rows if r.metric == metric]
        cpu = metric.startswith("cpu")
        what = "CPU time (user+sys) per token: CPU time, not energy" if cpu else metric
        png = _plot_bars(mine, label, f"{metric} ({mine[0].unit})", what + (" (hatched: est.)" if any(
            r.estimated for r in mine) else ""), out / f"energy_{_slug(metric)}.png")
        parts += [f"### {what}", "", *_image(what, png), _table(mine), ""]
        sources = sorted({energy_source(r) for r in mine if not r.estimated and energy_source(r)}
                         | {f"(est.) {r.method}" for r in mine if r.estimated and r.method})
        if sources:
            parts += ["Source: " + "; ".join(sources) + ("" if not any(r.estimated for r in mine) else
                                                         ". Rows marked (est.) are estimates, not measurements."), ""]
    return parts


def _quality(records, label, out: Path) -> list[str]:
    rows = [r for r in records if r.kind == "quality"]
    if not rows:
        return []
    parts = ["## Quality", ""]
    bpb = [r for r in rows if r.metric == "bits_per_byte"]
    if bpb:
        png = _plot_quality_vs_size(bpb, label, out / "quality_vs_size.png")
        parts += [*_image("bits/byte vs bundle size", png)]
    parts += [_table(rows), ""]
    return parts


def _generic(kind: str, rows: list[Record], label, out: Path) -> list[str]:
    """Any other kind (flops, profile, one merged later): its table, and its metric against
    depth where it was measured at several, one line per bundle and test name."""
    parts = [f"## {kind}", ""]
    for metric in dict.fromkeys(r.metric for r in rows):
        mine = [r for r in rows if r.metric == metric]
        base = lambda r: re.sub(r"@d\d+$", "", r.test)  # noqa: E731  ("flops@d128" → "flops")
        several = len({base(r) for r in mine}) > 1
        series = {label(r) + (f" {base(r)}" if several else "") for r in mine}
        if len(series) <= len(PALETTE):  # more lines than colours is a table's job
            png = _plot_vs_depth(mine, label, f"{metric} ({mine[0].unit})", f"{kind}: {metric} against depth",
                                 out / f"{_slug(kind)}_{_slug(metric)}.png",
                                 series_key=lambda r: label(r) + (f" {base(r)}" if several else ""))
            parts += _image(f"{kind} {metric}", png)
    table = _table(rows)
    if len(rows) > 12:  # long breakdowns (profile) stay out of the way
        parts += [f"<details><summary>{len(rows)} rows</summary>", "", table, "", "</details>", ""]
    else:
        parts += [table, ""]
    return parts


def _provenance(records: list[Record]) -> list[str]:
    seen = dict.fromkeys(
        (r.provenance.get("git_commit"), r.provenance.get("cpu"), r.provenance.get("cpu_count"),
         (r.provenance.get("versions") or {}).get("onnxruntime"), r.provenance.get("command"), r.host)
        for r in records if r.provenance)
    if not seen:
        return []
    lines = ["## How these numbers were made", ""]
    for commit, cpu, n, ort, command, host in seen:
        lines.append(f"- `{command}` on {host}: commit {commit}, {cpu}, {n} CPUs, onnxruntime {ort}")
    return lines + [""]


def _report_files(folder: Path) -> list[str]:
    """The names in `folder` a report writes (report.md, claims.json, its PNGs): what it may be in the way of."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name in (REPORT_NAME, CLAIMS_JSON) or p.suffix == ".png")


def check_report_folder(out_dir: str | os.PathLike) -> None:
    """Refuse, before any work, a report folder holding report files (report.md, claims.json, PNGs) we did not write."""
    from itera_runtime.owned import NotOursError, check_in_the_way

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out}: a file, not a folder for the report")
    try:
        check_in_the_way(out, _report_files(out), "report")
    except NotOursError as e:
        raise ReportError(str(e)) from None


def render(records: list[Record], out_dir: str | os.PathLike, runs=(), reasons: dict[str, str] | None = None,
           baseline: str | None = None, title: str = "Itera-Lite benchmark report", sources=(),
           preamble: str = "") -> Path:
    """Write out_dir/report.md, its PNG plots and claims.json; returns the report's path.

    preamble: markdown placed before the claims (the pipeline's training table and samples).

    Everything is drawn into a temporary folder inside out_dir and moved in at the end, so
    a failure leaves no half-written report. Only files of an earlier report of ours are ever
    replaced (`check_report_folder`); the ones it wrote that this one does not are removed.
    """
    from itera_runtime.owned import NotOursError, check_in_the_way, listed, record
    from .claims import claims_markdown, claims_from_records, claims_to_json
    from .curves import load_runs, runs_section

    reasons = dict(reasons or {})
    run_list = load_runs(runs)  # refuse a bad run folder before drawing anything
    if not records and not run_list:
        raise ReportError("nothing to report: give record files (or a results folder) or --runs")
    out_dir = Path(out_dir)
    check_report_folder(out_dir)
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # removed again if the report fails
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    done = False
    try:
        label = _labeller(records)
        compare_to_baseline(records, baseline)  # rows from different files get their ratio too
        parts = [f"# {title}", ""]
        if sources:
            parts += [f"From {', '.join(f'`{s}`' for s in sources)}: {len(records)} record(s)"
                      + (f", {len(run_list)} training run(s)." if run_list else "."), ""]
        if preamble:
            parts += [preamble.rstrip(), ""]
        claims = claims_from_records(records, baseline=baseline, reasons=reasons)
        if claims:
            parts += ["## Claims", "", claims_markdown(claims), ""]
            (tmp / CLAIMS_JSON).write_text(json.dumps(claims_to_json(claims), indent=2) + "\n")
        parts += _speed(records, label, tmp)
        parts += _step(records, label, tmp)
        parts += _memory(records, label, tmp)
        parts += _energy(records, label, tmp)
        parts += _quality(records, label, tmp)
        for kind in dict.fromkeys(r.kind for r in records):
            if kind not in SECTIONS:
                parts += _generic(kind, [r for r in records if r.kind == kind], label, tmp)
        noisy = [r for r in records if r.noisy]
        if noisy:
            parts += [f"Noisy rows (spread over {SPREAD_WARNING:.0%} between repetitions; compare within one run): "
                      f"{len(noisy)} of {len(records)}.", ""]
        throttled = [r for r in records if r.throttled]
        if throttled:
            parts += [f"Throttled rows (the firmware or kernel reported throttling or under-voltage during the "
                      f"case): {len(throttled)} of {len(records)}.", ""]
        parts += [line + "." for line in thermal_notes(records)] + [""] * bool(thermal_notes(records))
        if reasons:
            parts += ["## Not measured", ""] + [f"- {name}: {why}" for name, why in sorted(reasons.items())] + [""]
        if run_list:
            parts += [runs_section(run_list, tmp), ""]
        parts += _provenance(records)
        (tmp / REPORT_NAME).write_text("\n".join(parts).rstrip() + "\n")
        names = sorted(os.listdir(tmp), key=lambda n: n == REPORT_NAME)  # the report last
        try:  # again, now that the names are known: a user's file may have arrived meanwhile
            check_in_the_way(out_dir, [*names, *_report_files(out_dir)], "report")
        except NotOursError as e:
            raise ReportError(str(e)) from None
        # Files of the earlier report this one does not write (a claims.json would pass for this one's).
        stale = [n for n in _report_files(out_dir) if n not in names and n in listed(out_dir)]
        for name in stale:
            (out_dir / name).unlink()
        for name in names:
            os.replace(tmp / name, out_dir / name)
        record(out_dir, names, removed=stale)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder, nothing else
        if not done:
            for d in made:  # the folders this call made, innermost first; rmdir keeps any that is not empty
                with contextlib.suppress(OSError):
                    d.rmdir()
    return out_dir / REPORT_NAME
