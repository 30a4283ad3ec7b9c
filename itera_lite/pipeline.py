"""itera-pipeline: the main job end to end on the built-in data, in minutes on 2 cores.

data → train Itera-Lite and the baseline (same wall-clock budget) → compare quality →
export both to bundles → generate from both without torch → decode tokens/s side by side.
Writes report.json and report.md in --out; every number in them was measured by this run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click


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


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", default="shakespeare", help="'shakespeare', local text, or hf:NAME")
@click.option("--preset", type=click.Choice(["tiny", "small", "base"]), default="tiny")
@click.option("--minutes", type=float, default=3.0, help="training wall-clock budget per model")
@click.option("--max-steps", type=int, default=400, help="schedule length (cosine ends here)")
@click.option("--contexts", default="128,2048", help="decode-speed context lengths")
@click.option("--bench-threads", type=int, default=1, help="onnxruntime threads for the speed comparison")
@click.option("--threads", type=int, default=None, help="torch threads for training")
@click.option("--out", default="runs/pipeline", type=click.Path(file_okay=False))
def main(data, preset, minutes, max_steps, contexts, bench_threads, threads, out):
    """Run the whole job: train both families, compare, export, generate, measure decode speed."""
    from itera_bench.latency import Target, gen_case
    from itera_bench.record import format_records
    from itera_bench.sweep import compare_to_baseline, run_cases
    from itera_export.exporter import ExportError, export_checkpoint
    from itera_runtime import Generator, SamplingConfig, load_bundle
    from itera_runtime.provenance import provenance

    from .checkpoint import CheckpointError
    from .data import DataError
    from .train import TrainError

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = [int(c) for c in contexts.split(",") if c]
    families = {"itera": "Itera-Lite", "baseline": "Transformer baseline"}
    try:
        summaries = {}
        for family in families:
            click.echo(f"== train {family}-{preset} for up to {minutes:g} min", err=True)
            summaries[family] = _train(family, preset, data, out / family, minutes, max_steps, threads)
        click.echo("\n## Quality on held-out plays (same wall-clock budget)\n")
        click.echo(_quality_table(summaries))

        bundles = {}
        for family in families:
            click.echo(f"== export {family}", err=True)
            bundles[family], _ = export_checkpoint(out / family / "best.pt", out / "bundles" / family, force=True,
                                                   log=lambda m: click.echo(f"· {m}", err=True))

        prompt = "ROMEO:\n"
        click.echo(f"\n## Greedy continuations of {prompt!r} (onnxruntime, no torch)\n")
        samples = {}
        for family, path in bundles.items():
            gen = Generator(path, threads=bench_threads)
            samples[family] = "".join(gen.generate(prompt, max_new_tokens=48, sampling=SamplingConfig(temperature=0)))
            click.echo(f"{family}: {samples[family]!r}")

        click.echo(f"\n## Decode speed, {bench_threads} thread(s)\n", err=False)
        targets = [Target(load_bundle(p), bench_threads) for p in bundles.values()]  # verify once
        records = run_cases([gen_case(t, 64, c) for c in ctx for t in targets], repetitions=5, desc="decode bench")
        compare_to_baseline(records, None)
        click.echo(format_records(records, "md"))
        for r in records:
            if r.family == "itera" and r.vs_baseline is not None:
                click.echo(f"\n{r.test}: Itera-Lite decodes {r.vs_baseline:.2f}x the baseline's tokens/s")
    except (TrainError, CheckpointError, DataError, ExportError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)

    prov = provenance(bench_threads)
    report = {"quality": summaries, "samples": samples, "decode": [r.to_dict() for r in records], "provenance": prov}
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "report.json")
    (out / "report.md").write_text(
        "# Itera-Lite vs Transformer baseline\n\n" + _quality_table(summaries) + "\n\n"
        + format_records(records, "md") + f"\n\nCommand: `{prov['command']}`; "
        f"commit {prov['git_commit']}; CPU {prov['cpu']}.\n")
    click.echo(f"\nreport: {out / 'report.md'}, {out / 'report.json'}")


if __name__ == "__main__":
    main()
