"""itera-export: checkpoint → self-describing, validated ONNX bundle folder."""

from __future__ import annotations

import click

from itera_runtime.errors import OneLineErrors, fail

from .graphfile import GRAPH_SET_CHOICES, LOWER_TO_GRAPH_SET
from .quantize import SCHEMES


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.option("-o", "--out", default=None, help="bundle folder [default: bundles/<run name>]")
@click.option("--quantize", type=click.Choice(list(SCHEMES)), default="none",
              help="; ".join(f"{s.name}: {s.description}" for s in SCHEMES.values()))
@click.option("--quant-option", "quant_options", multiple=True, metavar="KEY=VALUE",
              help="change one quantization setting (repeatable), e.g. block_size=64, weights=dynamic, "
                   "table_bits=8; the defaults were chosen by measurement (export/quantize.py SETTINGS)")
@click.option("--graph-set", type=click.Choice(GRAPH_SET_CHOICES), default="auto",
              help="fused: onnxruntime's fused kernels; portable: standard ops, older onnxruntime; both "
                   "(Itera-Lite): the two over one weights file, the runtime runs fused where it can; auto: "
                   "both (Itera-Lite) or fused (baseline: GroupQueryAttention over a KV buffer) where this "
                   "onnxruntime validates them, else portable")
@click.option("--lower", type=click.Choice(list(LOWER_TO_GRAPH_SET)), default=None, hidden=True,
              help="former name of --graph-set (none = portable, dual = both)")
@click.option("--validate-text", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="text file to validate against torch on [default: the checkpoint's held-out sample]")
@click.option("--format", "fmt", type=click.Choice(["onnx", "gguf", "hf"]), default="onnx",
              help="onnx: a bundle folder; gguf: one file for llama.cpp (f32/q8_0/q4_0); hf: a transformers "
                   "model folder (GraniteMoeHybridForCausalLM / LlamaForCausalLM)")
@click.option("--retrieval", type=click.Path(file_okay=False, path_type=str), default=None,
              help="ship this kNN datastore (from `itera-train retrieval-index`) in the bundle; "
                   "itera-run and itera-bench quality then mix its next-token distribution in")
@click.option("--force", is_flag=True, help="replace an existing bundle (never anything else)")
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
def main(checkpoint, out, quantize, quant_options, graph_set, lower, validate_text, fmt, retrieval, force, as_json):
    """Export CHECKPOINT to a bundle that runs without torch.

    CHECKPOINT: best.pt / last.pt of either family, a Hugging Face transformers folder
    (Mamba2ForCausalLM or GraniteMoeHybridForCausalLM) or hf:ORG/NAME (downloads it; needs the `hf` extra and a network).
    """
    if lower is not None and click.get_current_context().get_parameter_source("graph_set") == \
            click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--lower is the former name of --graph-set: give one of them")
    from .exporter import export_checkpoint
    from .gguf import export_gguf
    from .hf_import import is_hf_source

    if fmt == "hf":
        from .hf_folder import export_hf

        if retrieval or quant_options or quantize != "none":
            fail("--format hf writes float32 weights; --quantize, --quant-option and --retrieval apply to other formats")
        summary = export_hf(checkpoint, out, force=force, log=lambda m: click.echo(f"· {m}", err=True))
        if as_json:
            import json

            click.echo(json.dumps(summary, indent=2))
        else:
            click.echo(f"{summary['path']}: transformers {summary['architecture']} folder, "
                       f"{summary['bytes'] / 1e6:.2f} MB; logits vs torch max |Δ| {summary['parity']['max_abs_diff']:.2e}")
        return
    if fmt == "gguf":
        if is_hf_source(checkpoint):
            fail("--format gguf exports checkpoints of ours; a transformers folder becomes an ONNX bundle")
        if retrieval:
            fail("--retrieval applies to ONNX bundles")
        if quant_options:
            fail("--quant-option applies to ONNX bundles; GGUF types are f32/q8_0/q4_0 from --quantize")
        summary = export_gguf(checkpoint, out, quantize=quantize, force=force,
                              log=lambda m: click.echo(f"· {m}", err=True))
        if as_json:
            import json

            click.echo(json.dumps(summary, indent=2))
        else:
            click.echo(f"{summary['path']}: GGUF {summary['file_type']}, {summary['bytes'] / 1e6:.2f} MB")
        return
    try:
        path, manifest = export_checkpoint(checkpoint, out, quantize=quantize, graph_set=graph_set, lower=lower,
                                           force=force, validate_text=validate_text, quant_options=quant_options,
                                           retrieval=retrieval, log=lambda m: click.echo(f"· {m}", err=True))
    except KeyboardInterrupt:
        fail("interrupted; nothing written", 130)
    if as_json:
        click.echo(manifest.to_json().rstrip("\n"))
        return
    v = manifest.validation
    nodes = ", ".join(f"{f} {c['nodes']} nodes" for f, c in manifest.graph_checks.items())
    click.echo(f"{path}: {manifest.family} bundle, quantization {manifest.quantization.mode}, "
               f"graph sets {', '.join(manifest.graph_sets())}; {manifest.total_bytes / 1e6:.2f} MB in all ({nodes})")
    against = "transformers" if (manifest.source_checkpoint or {}).get("format") == "transformers" else "torch"
    click.echo(f"validation vs {against} on {v.text}: max |Δ| {v.max_abs_diff:.2e}, "
               f"decode top-1 agreement {v.decode_top1_agreement:.1%}, "
               f"bits/byte {v.bits_per_byte:.4f} (torch {v.bits_per_byte_torch:.4f})")
    r = manifest.retrieval
    if r is not None:
        click.echo(f"retrieval datastore: {r.n_entries:,} entries × {r.dim} ({r.key_dtype}), "
                   f"{sum(f.bytes for n, f in manifest.files.items() if n in (r.keys, r.values)) / 1e6:.2f} MB; "
                   f"defaults k={r.k}, lambda={r.lam:g}, temperature={r.temperature:.3g}, {r.metric} (tuned on val)")
    speed = manifest.quantization.decode_vs_fp32
    if speed:
        click.echo(f"decode {speed['tokens_per_s']:.0f} tokens/s vs fp32 {speed['fp32_tokens_per_s']:.0f} "
                   f"({speed['ratio']:.2f}x; {speed['threads']} thread, median of {speed['rounds']} rounds, "
                   "this machine)")


if __name__ == "__main__":
    main()
