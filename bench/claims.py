"""The product's four claims against the Transformer baseline, each measured, never projected.

| claim   | target                                   | measured from                               |
|---------|------------------------------------------|---------------------------------------------|
| size    | 100–300x smaller bundle                  | bytes of every bundle file                  |
| speed   | 2–10x decode tokens/s at depth 128 and   | latency records (tgN@d128, tgN@d2048,       |
|         | 2048, and prompt tokens/s at 512         | pp512), measured here or given              |
|         | (same-engine and same-precision rows     | against the given baseline (its engine and  |
|         | beside it, where such rows exist)        | precision named in the row)                 |
| energy  | 50–200x less J/token                     | energy records with a real counter; else    |
|         |                                          | "not measurable here" + CPU-s/token ratio   |
| quality | under 20% bits/byte loss                 | quality records (bits_per_byte)             |

A ratio at or above the low end of a range meets the claim (beating the high end is no
failure). Speed is met only when all three of its ratios are measured and meet it; any one
below the target makes it not met. Estimates (`estimated: true`) never count as measured.

Part of a cross-engine speed ratio is the engine. So beside the `speed` row against the given
baseline (usually the fp32 ONNX bundle, named as such in the row), two rows appear where the
records hold the Transformer rows for them: `speed, same engine` (e.g. Itera GGUF vs Transformer
GGUF, both in llama.cpp, same precision) and `speed, same precision` (Itera against the fastest
Transformer engine at its precision: fp32 vs fp32/f32, int8 vs int8/q8_0, int4 vs int4/q4_0).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from .record import Record

MET, NOT_MET, NOT_MEASURED = "met", "not met", "not measured"
SIZE_TARGET = (100.0, 300.0)
SPEED_TARGET = (2.0, 10.0)
ENERGY_TARGET = (50.0, 200.0)
QUALITY_MAX_LOSS = 0.20
SPEED_DEPTHS = (128, 2048)
SPEED_PROMPT = 512
# A ratio outside this is a broken or forged record, not a measurement: shown, never judged.
PLAUSIBLE_RATIO = (1e-6, 1e6)


@dataclass
class Claim:
    """One row of the claims table, with the numbers behind its text."""

    claim: str
    target: str
    measured: str
    how: str
    verdict: str
    numbers: dict = field(default_factory=dict)


@dataclass
class ClaimsTable:
    bundle: str
    baseline: str
    claims: list[Claim]


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _of(records: list[Record], bundle: str) -> list[Record]:
    """The records of one bundle: same path, else (records from another folder or machine)
    the same bundle folder name."""
    mine = [r for r in records if r.bundle and _same(r.bundle, bundle)]
    if mine:
        return mine
    name = os.path.basename(os.path.normpath(bundle))
    return [r for r in records if r.model_filename == name or os.path.basename(os.path.normpath(r.bundle)) == name]


def _pairs(mine: list[Record], base: list[Record], accept, fastest: bool = False) -> list[tuple[Record, Record]]:
    """(itera row, baseline row) of the same test, metric, threads and host, where accept(row).

    fastest: of several baseline rows of a key (engines, files), the one with the highest median;
    else the first, as for the Itera side."""
    key = lambda r: (r.kind, r.test, r.metric, r.n_threads, r.host)  # noqa: E731
    refs: dict = {}
    for r in base:
        if accept(r) and r.median is not None:
            if fastest and key(r) in refs and refs[key(r)].median >= r.median:
                continue
            refs[key(r)] = r if fastest else refs.get(key(r), r)
    out = [(r, refs[key(r)]) for r in mine if accept(r) and r.median is not None and key(r) in refs]
    return sorted(out, key=lambda p: (p[0].n_threads or 0))


def _ratio(a: float, b: float) -> float:
    """a / b; nan where b is 0 or either side is not finite (judged implausible, never met)."""
    try:
        r = a / b
    except (ZeroDivisionError, OverflowError):
        return math.nan
    return r if math.isfinite(r) else math.nan


def _plausible(ratio: float) -> bool:
    return math.isfinite(ratio) and PLAUSIBLE_RATIO[0] <= abs(ratio) <= PLAUSIBLE_RATIO[1]


def _x(v: float) -> str:
    if not math.isfinite(v):
        return "not finite"
    if not _plausible(v):
        return f"{v:.3g}x (implausible)"
    return f"{v:.3g}x" if v < 100 else f"{v:,.0f}x"


def _range(lo: float, hi: float, what: str) -> str:
    return f"{lo:g}–{hi:g}x {what}"


def _size(bundle: str, baseline: str, mine, base, sizes: dict) -> Claim:
    target = _range(*SIZE_TARGET, "smaller")
    how = "bytes on disk of every bundle file (manifest, graphs, weights, tokenizer): baseline / Itera"
    a = sizes.get(bundle) or next((r.model_size for r in mine if r.model_size), None)
    b = sizes.get(baseline) or next((r.model_size for r in base if r.model_size), None)
    if not a or not b:
        return Claim("size", target, "not measured: no bundle size known", how, NOT_MEASURED)
    ratio = _ratio(b, a)
    return Claim("size", target, f"{_x(ratio)} ({b / 1e6:.2f} MB / {a / 1e6:.2f} MB)", how,
                 NOT_MEASURED if not _plausible(ratio) else MET if ratio >= SIZE_TARGET[0] else NOT_MET,
                 {"ratio": ratio, "bundle_bytes": a, "baseline_bytes": b})


def _engines(rows: list[Record]) -> str:
    """'fp32 onnxruntime', 'int8 llama.cpp', ... of the rows, for a claim's how."""
    names = {"none": "fp32", "": "?"}
    return ", ".join(sorted({f"{names.get(r.quantization, r.quantization)} {r.engine}" for r in rows})) or "none"


def _speed(mine, base, reasons: dict, claim: str = "speed", against: str = "", fastest: bool = False) -> Claim:
    target = _range(*SPEED_TARGET, f"decode tokens/s at depth {' and '.join(map(str, SPEED_DEPTHS))}; "
                    f"prompt tokens/s at {SPEED_PROMPT}")
    def decode_at(d: int) -> Callable[[Record], bool]:
        return lambda r: r.test.startswith("tg") and r.n_depth == d

    wanted = [(f"decode@d{d}", decode_at(d)) for d in SPEED_DEPTHS]
    wanted.append((f"pp{SPEED_PROMPT}", lambda r: r.test == f"pp{SPEED_PROMPT}"))
    parts, numbers, verdicts, threads = [], {}, [], set()
    for name, match in wanted:
        pairs = _pairs(mine, base, lambda r: r.kind == "latency" and r.metric == "tokens_per_s" and not r.estimated
                       and match(r), fastest)
        if not pairs:
            parts.append(f"{name} not measured")
            verdicts.append(NOT_MEASURED)
            continue
        r, ref = pairs[0]  # fewest threads: the edge-device case
        ratio = _ratio(r.median, ref.median)
        threads.add(r.n_threads)
        numbers[name] = {"test": r.test, "ratio": ratio, "tokens_per_s": r.median, "baseline_tokens_per_s": ref.median,
                         "n_threads": r.n_threads, "noisy": r.noisy or ref.noisy, "baseline": ref.model_filename,
                         "baseline_engine": ref.engine, "baseline_quantization": ref.quantization}
        by = f" {ref.model_filename}," if fastest else ""
        parts.append(f"{r.test} {_x(ratio)} ({r.median:,.0f} vs{by} {ref.median:,.0f} tok/s"
                     f"{', noisy' if r.noisy or ref.noisy else ''})")
        verdicts.append(NOT_MEASURED if not _plausible(ratio) else MET if ratio >= SPEED_TARGET[0] else NOT_MET)
    verdict = NOT_MET if NOT_MET in verdicts else MET if set(verdicts) == {MET} else NOT_MEASURED
    why = reasons.get("speed") or reasons.get("latency")
    how = (f"itera-bench latency: median tokens/s, Itera ({_engines([r for r in mine if r.kind == 'latency'][:1])}) / baseline "
           f"({against or _engines(base)}), {'/'.join(map(str, sorted(threads)))} thread(s); decode timed as the "
           "generate loop runs it" if threads else f"itera-bench latency, against {against or _engines(base)}")
    measured = "; ".join(parts) + (f" ({why})" if why and verdict == NOT_MEASURED else "")
    return Claim(claim, target, measured, how, verdict, numbers)


def _like_for_like(mine: list[Record], base: list[Record], records: list[Record], reasons: dict) -> list[Claim]:
    """Speed against Transformer rows other than the given baseline's: the same engine and precision
    (e.g. Itera GGUF vs Transformer GGUF in llama.cpp), and the fastest engine at the same precision
    (fp32 vs fp32/f32, int8 vs int8/q8_0, int4 vs int4/q4_0). Only rows that differ from `base`."""
    speed = [r for r in mine if r.kind == "latency"]
    if not speed:
        return []
    engine, quant = speed[0].engine, speed[0].quantization
    others = [r for r in records if r.family == "baseline" and r.kind == "latency" and r.quantization == quant]
    out, given = [], {id(r) for r in base if r.kind == "latency"}
    same_engine = [r for r in others if r.engine == engine]
    names = {"none": "fp32"}
    q = names.get(quant, quant)
    if same_engine and {id(r) for r in same_engine} != given:
        out.append(_speed(mine, same_engine, reasons, f"speed, same engine ({engine}, {q})",
                          f"Transformer in {engine} at {q}", fastest=True))
    if others and {id(r) for r in others} not in (given, {id(r) for r in same_engine}):
        out.append(_speed(mine, others, reasons, f"speed, same precision ({q})",
                          f"the fastest Transformer engine at {q}: {_engines(others)}", fastest=True))
    return out


def _is_joules(r: Record) -> bool:
    """J/token rows: gross, or net of the idle baseline (`joules_per_token_net`)."""
    return r.metric in ("joules_per_token", "joules_per_token_net")


def energy_source(r: Record) -> str | None:
    """The counter a row's joules came from, as the energy subcommand recorded it."""
    found = r.extra.get("energy_source") or r.extra.get("energy_backend") or r.extra.get("source")
    return None if found is None else str(found)


def _energy(mine, base, energy_rows, reasons: dict) -> Claim:
    target = _range(*ENERGY_TARGET, "less J/token")
    pairs = _pairs(mine, base, lambda r: r.kind == "energy" and _is_joules(r) and not r.estimated)
    cpu = _pairs(mine, base, lambda r: r.kind == "energy" and r.metric.startswith("cpu_"))
    cpu_numbers = {r.test: _ratio(ref.median, r.median) for r, ref in cpu if r.median}
    cpu_text = "; ".join(f"{t} {_x(v)}" for t, v in cpu_numbers.items())
    if pairs:
        ratios = {r.test + (" net" if r.metric.endswith("_net") else ""): _ratio(ref.median, r.median)
                  for r, ref in pairs if r.median}
        sources = sorted({energy_source(r) or "source not recorded" for r, _ in pairs})
        verdict = (NOT_MEASURED if not all(map(_plausible, ratios.values()))
                   else MET if ratios and min(ratios.values()) >= ENERGY_TARGET[0] else NOT_MET)
        measured = "; ".join(f"{t} {_x(v)}" for t, v in ratios.items())
        if cpu_text:
            measured += f" (CPU-seconds/token ratio, CPU time not energy: {cpu_text})"
        return Claim("energy", target, measured, f"itera-bench energy: J/token, baseline / Itera ({', '.join(sources)})",
                     verdict, {"ratio": ratios, "cpu_s_ratio": cpu_numbers})
    reason = reasons.get("energy") or next(
        (str(r.extra[k]) for r in energy_rows for k in ("energy", "reason") if isinstance(r.extra.get(k), str)),
        None) or "no energy records among the results (itera-bench energy writes them)"
    if any(_is_joules(r) and r.estimated for r in energy_rows):
        reason += "; estimated J/token rows exist and are not used"
    measured = f"not measurable here: {reason.removeprefix('error: ').removeprefix('not measurable here: ')}"
    if cpu_text:
        measured += f". CPU-seconds/token ratio (CPU time, not energy): {cpu_text}"
    return Claim("energy", target, measured, "itera-bench energy (a readable energy counter)", NOT_MEASURED,
                 {"cpu_s_ratio": cpu_numbers, "reason": reason})


def _quality(mine, base, reasons: dict) -> Claim:
    target = f"under {QUALITY_MAX_LOSS:.0%} bits/byte loss"
    pairs = _pairs(mine, base, lambda r: r.kind == "quality" and r.metric == "bits_per_byte" and not r.estimated)
    if not pairs:
        why = reasons.get("quality") or "no quality records among the results (itera-bench quality writes them)"
        return Claim("quality", target, f"not measured: {why.removeprefix('error: ')}", "itera-bench quality",
                     NOT_MEASURED)
    r, ref = pairs[0]
    change = _ratio(r.median - ref.median, ref.median)
    plausible = math.isfinite(change) and r.median > 0 and ref.median > 0  # bits/byte of any model is > 0
    shown = f"{change:+.1%}" if plausible else "implausible" if math.isfinite(change) else "not finite"
    return Claim("quality", target, f"{shown} ({r.median:.4f} vs {ref.median:.4f} bits/byte, {r.test})",
                 "itera-bench quality: bits/byte through onnxruntime, (Itera − baseline) / baseline",
                 NOT_MEASURED if not plausible else MET if change < QUALITY_MAX_LOSS else NOT_MET,
                 {"relative_change": change, "bits_per_byte": r.median, "baseline_bits_per_byte": ref.median,
                  "test": r.test})


def claims_from_records(records: list[Record], itera: list[str] | None = None, baseline: str | None = None,
                        reasons: dict[str, str] | None = None, sizes: dict[str, int] | None = None) -> list[ClaimsTable]:
    """One claims table per Itera bundle against the baseline bundle; [] when either is missing.

    itera: bundle paths (default: every itera-family bundle in the records); baseline: a
    bundle path (default: the first baseline-family bundle); sizes: bytes per bundle path,
    else the records' model_size.
    """
    reasons, sizes = reasons or {}, sizes or {}
    if baseline is None:
        baseline = next((r.bundle for r in records if r.family == "baseline"), None)
    if itera is None:
        itera = list(dict.fromkeys(r.bundle for r in records if r.family == "itera"))
    if baseline is None or not itera:
        return []
    base = _of(records, baseline)
    energy_rows = [r for r in records if r.kind == "energy"]
    tables = []
    for bundle in itera:
        mine = _of(records, bundle)
        tables.append(ClaimsTable(bundle, baseline, [
            _size(bundle, baseline, mine, base, sizes), _speed(mine, base, reasons),
            *_like_for_like(mine, base, records, reasons),
            _energy(mine, base, energy_rows, reasons), _quality(mine, base, reasons)]))
    return tables


def claims_to_json(tables: list[ClaimsTable]) -> dict:
    return {"claims": [dataclasses.asdict(t) for t in tables]}


def claims_markdown(tables: list[ClaimsTable]) -> str:
    name = lambda p: os.path.basename(os.path.normpath(p))  # noqa: E731
    out = []
    for t in tables:
        out += [f"**{name(t.bundle)}** against **{name(t.baseline)}**", "",
                "| claim | target | measured | how | verdict |", "|---|---|---|---|---|"]
        out += [f"| {c.claim} | {c.target} | {c.measured} | {c.how} | {c.verdict} |" for c in t.claims]
        out.append("")
    return "\n".join(out).rstrip()


def measure_claims(itera: list[str], baseline: str, results=(), threads=(1,), repetitions: int = 3,
                   n_gen: int = 32, measure_speed: bool = True, warmup: bool = True,
                   others: list[str] | tuple = ()) -> list[ClaimsTable]:
    """Load and verify the bundles (or .gguf files), measure size and speed here (at each thread
    count), read the rest from results files.

    others: more Transformer models (bundles at other precisions, .gguf files) measured for the
    same-engine and same-precision speed rows."""
    from itera_runtime.bundle import ContextError, load_bundle

    from . import llamacpp
    from .latency import Target, check_depth, gen_case, prompt_case
    from .results import load_results
    from .sweep import run_cases

    records, reasons = load_results(results)
    models = {p: llamacpp.GgufModel(p) if llamacpp.is_gguf(p) else load_bundle(p)
              for p in dict.fromkeys([*itera, baseline, *others])}
    sizes = {p: m.size_bytes for p, m in models.items()}
    if measure_speed:
        cases, skipped = [], []
        wanted = [(SPEED_PROMPT, 0, prompt_case), *((n_gen, d, gen_case) for d in SPEED_DEPTHS)]
        for path, bundle in models.items():
            if isinstance(bundle, llamacpp.GgufModel):
                cases += [make(target, n, depth) for target in (llamacpp.make_target(bundle, t) for t in threads)
                          for n, depth, make in ((SPEED_PROMPT, 0, llamacpp.prompt_case),
                                                 *((n_gen, d, llamacpp.gen_case) for d in SPEED_DEPTHS))]
                continue
            for n, depth, make in wanted:
                try:
                    check_depth(bundle, depth, n + 1)
                except ContextError as e:
                    skipped.append(str(e))
            targets = [Target(bundle, t) for t in threads]
            cases += [make(target, n, depth) for target in targets for n, depth, make in wanted
                      if bundle.fits(depth + n + 1)]
        # speed measured here replaces any latency rows of the given files (one source per row)
        records = [r for r in records if r.kind != "latency"] + run_cases(cases, repetitions, warmup,
                                                                           desc="claims: speed")
        if skipped:
            reasons.setdefault("speed", "; ".join(skipped))
    return claims_from_records(records, itera=list(itera), baseline=baseline, reasons=reasons, sizes=sizes)
