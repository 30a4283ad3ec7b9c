"""itera-pipeline: the main job end to end on the built-in data, in minutes on 2 cores.

data → train Itera-Lite and the baseline (same wall-clock budget) → compare quality →
export both to fp32 and int8 bundles → generate from both without torch → every
`itera-bench` subcommand on the four bundles (results/, one jsonl each) → the report.
Writes report.md (tables, claims, plots of speed and of both training runs), its PNGs,
claims.json and report.json in --out; every number in them was measured by this run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from itera_bench.params import COUNTS
from itera_runtime.errors import OneLineErrors, UserError

QUANTIZE = ("none", "int8")  # the bundles the report compares: fp32 and int8 of each family


def _train(family: str, preset: str, data: str, out: Path, minutes: float, max_steps: int, threads: int | None):
    from .train import TrainConfig, train

    summary_path = out / "summary.json"
    if summary_path.exists():
        click.echo(f"· reusing {out} (delete it to retrain)", err=True)
        return json.loads(summary_path.read_text())
    cfg = TrainConfig(model=family, preset=preset, data=data, out=str(out), max_minutes=minutes,
                      max_steps=max_steps, warmup_steps=min(100, max_steps // 10), eval_every=max(25, max_steps // 8),
                      threads=threads)
    return train(cfg)


def _quality_table(summaries: dict) -> str:
    rows = ["| model | params (total / active) | steps | train tok/s | val bits/byte | val ppl | test bits/byte |",
            "|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        p, b = s["params"], s["best"]
        rows.append(f"| {name} | {p['total']:,} / {p['active_per_token']:,} | {s['steps']} | "
                    f"{s['train_tokens_per_s']:.0f} | {b['val_bpb']:.4f} | {b['val_ppl']:.2f} | {b['test_bpb']:.4f} |")
    return "\n".join(rows)


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", default="shakespeare", help="'shakespeare', local text, or hf:NAME")
@click.option("--preset", type=click.Choice(["tiny", "small", "base"]), default="tiny")
@click.option("--minutes", type=float, default=3.0, help="training wall-clock budget per model")
@click.option("--max-steps", type=int, default=400, help="schedule length (cosine ends here)")
@click.option("--contexts", type=COUNTS, default="128,2048", help="decode-speed context lengths (list)")
@click.option("--bench-threads", type=int, default=1, help="onnxruntime threads for the speed comparison")
@click.option("--threads", type=int, default=None, help="torch threads for training")
@click.option("--out", default="runs/pipeline", type=click.Path(file_okay=False))
def main(data, preset, minutes, max_steps, contexts, bench_threads, threads, out):
    """Run the whole job: train both families, compare, export, generate, measure decode speed."""
    from itera_bench.plot import pyplot
    from itera_bench.record import format_records
    from itera_bench.report import CLAIMS_JSON, check_report_folder, render
    from itera_bench.cli import suite
    from itera_bench.suite import collect, run_all
    from itera_export.exporter import export_checkpoint
    from itera_runtime import Generator, SamplingConfig
    from itera_runtime.provenance import provenance

    pyplot()  # the report's plots need matplotlib: say so now, not after minutes of training
    out = Path(out)
    check_report_folder(out)  # a user's report.md there is refused now, not after minutes of training
    out.mkdir(parents=True, exist_ok=True)
    ctx = contexts
    families = {"itera": "Itera-Lite", "baseline": "Transformer baseline"}
    summaries = {}
    for family in families:
        click.echo(f"== train {family}-{preset} for up to {minutes:g} min", err=True)
        summaries[family] = _train(family, preset, data, out / family, minutes, max_steps, threads)
    click.echo("\n## Quality on held-out plays (same wall-clock budget)\n")
    click.echo(_quality_table(summaries))

    bundles = {}
    for family in families:
        for quantize in QUANTIZE:
            name = family if quantize == "none" else f"{family}-{quantize}"
            click.echo(f"== export {name}", err=True)
            bundles[name], _ = export_checkpoint(out / family / "best.pt", out / "bundles" / name,
                                                 quantize=quantize, force=True,
                                                 log=lambda m: click.echo(f"· {m}", err=True))

    prompt = "ROMEO:\n"
    click.echo(f"\n## Greedy continuations of {prompt!r} (onnxruntime, no torch)\n")
    samples = {}
    for family in families:
        gen = Generator(bundles[family], threads=bench_threads)
        samples[family] = "".join(gen.generate(prompt, max_new_tokens=48, sampling=SamplingConfig(temperature=0)))
        click.echo(f"{family}: {samples[family]!r}")

    # Every measuring subcommand of itera-bench, as `itera-bench all` runs them; profile
    # is a diagnosis, not a comparison, and would only lengthen the job.
    click.echo(f"\n## Benchmarks, {bench_threads} thread(s)\n", err=True)
    results = out / "results"
    paths = [str(p) for p in bundles.values()]
    baseline = str(bundles["baseline"])
    latency = {"n_prompt": [512], "n_gen": [64], "n_depth": list(dict.fromkeys([0, *ctx]))}
    invocations = suite(paths, [bench_threads], 3, ctx, baseline, skip=("profile",),
                        options={"latency": latency}, shared={"data": data})
    status = run_all(invocations, results, log=lambda m: click.echo(f"· {m}", err=True))
    records, reasons = collect(results, status)
    decode = [r for r in records if r.kind == "latency" and r.test.startswith("tg") and r.n_depth in ctx]
    if not decode:
        raise UserError(f"the decode benchmark measured nothing: {status.get('latency')}")
    click.echo(format_records(decode, "md"))
    for r in decode:
        if r.family == "itera" and r.vs_baseline is not None:
            click.echo(f"\n{r.model_filename} {r.test}: Itera-Lite decodes {r.vs_baseline:.2f}x the baseline's "
                       "tokens/s")
    preamble = ("## Quality on held-out text (same wall-clock budget, torch evaluation)\n\n"
                + _quality_table(summaries) + f"\n\n## Greedy continuations of {prompt!r}\n\n```text\n"
                + "\n".join(f"{f}: {samples[f]!r}" for f in families) + "\n```")
    report_md = render(records, out, runs=[out / f for f in families], reasons=reasons, baseline=baseline,
                       title="Itera-Lite vs Transformer baseline", sources=[str(results)], preamble=preamble)

    claims = json.loads((out / CLAIMS_JSON).read_text())["claims"] if (out / CLAIMS_JSON).exists() else []
    for table in claims:
        click.echo(f"\n## Claims: {Path(table['bundle']).name} vs {Path(table['baseline']).name}")
        for c in table["claims"]:
            click.echo(f"- {c['claim']} ({c['target']}): {c['measured']} → {c['verdict']}")
    prov = provenance(bench_threads)
    report = {"quality": summaries, "samples": samples, "decode": [r.to_dict() for r in decode],
              "bench_status": status, "claims": claims, "provenance": prov}
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "report.json")
    click.echo(f"\nreport: {report_md}, {out / 'report.json'}")


if __name__ == "__main__":
    main()
