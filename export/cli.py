"""itera-export: checkpoint → self-describing, validated ONNX bundle folder."""

from __future__ import annotations

import sys

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--out", default=None, help="bundle folder [default: bundles/<run name>]")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4"]), default="none")
@click.option("--lower", type=click.Choice(["auto", "fused", "none"]), default="auto",
              help="Itera-Lite SSM/MoE path: onnxruntime fused kernels, or the portable ai.itera functions")
@click.option("--force", is_flag=True, help="overwrite an existing bundle folder")
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
def main(checkpoint, out, quantize, lower, force, as_json):
    """Export CHECKPOINT (best.pt / last.pt of either family) to a bundle that runs without torch."""
    import json

    from itera_lite.checkpoint import CheckpointError
    from itera_runtime.bundle import BundleError

    from .exporter import ExportError, export_checkpoint

    try:
        path, manifest = export_checkpoint(checkpoint, out, quantize=quantize, lower=lower, force=force,
                                           log=lambda m: click.echo(f"· {m}", err=True))
    except (ExportError, CheckpointError, BundleError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    v = manifest["validation"]
    total = sum(f["bytes"] for f in manifest["files"].values())
    nodes = ", ".join(f"{f} {c['nodes']} nodes" for f, c in manifest["graph_checks"].items())
    sizes = f"{total / 1e6:.2f} MB in all ({nodes})"
    click.echo(f"{path}: {manifest['family']} bundle, quantization {manifest['quantization']['mode']}, "
               f"ssm path {manifest.get('ssm_path')}; {sizes}")
    click.echo(f"validation vs torch on {v['text']}: max |Δ| {v['max_abs_diff']:.2e}, "
               f"decode top-1 agreement {v['decode_top1_agreement']:.1%}")


if __name__ == "__main__":
    main()
