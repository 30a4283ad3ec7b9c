"""itera-bench: measured comparisons of bundles (decode latency so far; more subcommands to come)."""

from __future__ import annotations

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
    from itera_runtime.provenance import provenance
    from .report import format_rows

    from itera_runtime.bundle import load_bundle

    rows = []
    try:
        # Verified once, before any progress is drawn; each measurement reuses the Bundle.
        loaded = [load_bundle(b) for b in bundles]
        jobs = [(b, c, t) for b in loaded for c in _ints(context) for t in _ints(threads)]
        for b, c, t in tqdm(jobs, desc="latency", file=sys.stderr):
            rows.append({**measure_decode(b, c, new_tokens, t, repeats), "provenance": provenance(t)})
    except (BundleError, DeviceError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(format_rows(rows, output))


if __name__ == "__main__":
    main()
