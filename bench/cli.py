"""itera-bench: measured comparisons of bundles (decode latency so far; more subcommands to come)."""

from __future__ import annotations

import csv
import io
import json
import sys

import click


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return values


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Benchmark exported bundles; every row carries its provenance."""


@main.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=False))
@click.option("-c", "--context", default="128,2048", show_default=True, help="context lengths (list)")
@click.option("-n", "--new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("-t", "--threads", default="1", show_default=True, help="onnxruntime threads (list)")
@click.option("-r", "--repeats", default=5, show_default=True, type=click.IntRange(1))
@click.option("-o", "--output", type=click.Choice(["md", "csv", "json", "jsonl"]), default="md", show_default=True)
def latency(bundles, context, new_tokens, threads, repeats, output):
    """Decode tokens/s of each BUNDLE over the product of --context and --threads."""
    from tqdm import tqdm

    from itera_runtime.bundle import BundleError
    from itera_runtime.session import DeviceError

    from .decode import measure_decode
    from .provenance import provenance

    jobs = [(b, c, t) for b in bundles for c in _ints(context) for t in _ints(threads)]
    rows = []
    try:
        for b, c, t in tqdm(jobs, desc="latency", file=sys.stderr):
            rows.append({**measure_decode(b, c, new_tokens, t, repeats), "provenance": provenance(t)})
    except (BundleError, DeviceError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(format_rows(rows, output))


COLUMNS = ["family", "quantization", "ssm_path", "context", "threads", "new_tokens", "repeats",
           "decode_tokens_per_s", "decode_tokens_per_s_min", "decode_tokens_per_s_max", "ms_per_token",
           "prefill_tokens_per_s", "noisy", "estimated", "bundle"]


def format_rows(rows: list[dict], output: str) -> str:
    """One record type, four formats (as llama-bench prints them)."""
    if output == "json":
        return json.dumps(rows, indent=2)
    if output == "jsonl":
        return "\n".join(json.dumps(r) for r in rows)
    if output == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS + ["git_commit", "cpu"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "git_commit": r["provenance"]["git_commit"], "cpu": r["provenance"]["cpu"]})
        return buf.getvalue().rstrip("\n")
    lines = ["| family | quant | ssm path | context | threads | decode tok/s (median, min–max) | ms/token |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = " (noisy)" if r["noisy"] else ""
        lines.append(f"| {r['family']} | {r['quantization']} | {r['ssm_path'] or '-'} | {r['context']} | "
                     f"{r['threads']} | {r['decode_tokens_per_s']:.0f} ({r['decode_tokens_per_s_min']:.0f}–"
                     f"{r['decode_tokens_per_s_max']:.0f}){flag} | {r['ms_per_token']:.3f} |")
    if rows:
        p = rows[0]["provenance"]
        lines.append(f"\ncommit {p['git_commit']}, {p['cpu']}, onnxruntime {p['versions']['onnxruntime']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
