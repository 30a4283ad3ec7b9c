"""Checkpoint → bundle folder: graphs, tokenizer, manifest; checked, optionally quantized, validated.

Everything is written into a temporary sibling folder that is renamed into place only after
validation passed, so a failed export never leaves a bundle (or half of one) behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx

from itera_runtime.bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, write_manifest

from .validate import FP32_TOLERANCE, compare, held_out_tokens

QUANTIZE_MODES = ("none", "int8", "int4")
LOWER_MODES = ("auto", "fused", "none")


class ExportError(Exception):
    """An export that cannot proceed or failed validation; one line for the user."""


def default_output(checkpoint: Path, quantize: str) -> Path:
    """runs/x/best.pt → bundles/x (bundles/x-int8 when quantized)."""
    checkpoint = Path(checkpoint).resolve()
    name = checkpoint.parent.name if checkpoint.stem in ("best", "last") else checkpoint.stem
    return Path("bundles") / (name if quantize == "none" else f"{name}-{quantize}")


def check_graph(path: Path) -> dict:
    """onnx.checker (full) and shape inference on a written graph; its node count and size."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # checker raises ValidationError / InferenceError
        raise ExportError(f"{path.name}: onnx.checker failed: {str(e).strip().splitlines()[0][:200]}") from None
    model = onnx.load(str(path), load_external_data=False)
    return {"nodes": len(model.graph.node), "functions": len(model.functions), "bytes": path.stat().st_size}


def export_checkpoint(checkpoint, out=None, quantize: str = "none", lower: str = "auto", force: bool = False,
                      log=lambda msg: None) -> tuple[Path, dict]:
    """Export a checkpoint of either family to a validated bundle; returns (folder, manifest)."""
    from itera_runtime.provenance import provenance
    from itera_lite.checkpoint import load_model

    # torch.onnx and optimum log advice meant for their developers (missing torchvision,
    # tied-weight notes); users get our own progress lines and errors instead.
    import optimum.utils.logging  # noqa: F401  (configures its logger on import; set ours after)

    for name in ("torch.onnx", "torch._dynamo", "torch.export", "optimum", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if quantize not in QUANTIZE_MODES:
        raise ExportError(f"unknown --quantize {quantize!r}; choose from {', '.join(QUANTIZE_MODES)}")
    checkpoint = Path(checkpoint)
    model, ckpt = load_model(checkpoint)  # CheckpointError carries its own one-line message
    out = Path(out) if out else default_output(checkpoint, quantize)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be copied and shared
    try:
        family = model.config.family
        log(f"exporting {family} graphs")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter-internal advice, not the user's concern
            if family == "itera":
                from .itera import export_itera_graphs

                frag = export_itera_graphs(model, tmp, lower=lower)
            else:
                from .baseline import export_baseline_graphs

                frag = export_baseline_graphs(model, tmp)
        graph_files = sorted({g["file"] for g in frag["graphs"].values()})
        checks = {f: check_graph(tmp / f) for f in graph_files}

        quant = {"mode": "none"}
        if quantize != "none":
            from .quantize import quantize_graph

            log(f"quantizing to {quantize}")
            for f in graph_files:
                src = tmp / f
                dst = tmp / f"{src.stem}.{quantize}.tmp.onnx"
                quant = quantize_graph(src, dst, quantize)
                dst.replace(src)
                checks[f] = {**check_graph(src), "bytes_fp32": quant["bytes_before"]}

        weights = None
        if len(graph_files) > 1:
            from .weights import share_weights

            weights = share_weights(tmp, graph_files)  # one copy of the weights for all graphs
        (tmp / "tokenizer.json").write_text(ckpt["tokenizer_json"])
        prov = provenance()
        manifest = {
            "format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, "family": family,
            "model_config": ckpt["model_config"], "tokenizer": "tokenizer.json",
            "vocab_size": model.config.vocab_size,
            "graphs": frag["graphs"], "io": frag["io"], "state": frag["state"],
            "ssm_path": frag.get("ssm_path"), "opset": frag["opset"],
            "custom_domains": frag.get("custom_domains", {}), "quantization": quant,
            "graph_checks": checks, "versions": prov["versions"], "created": prov["created"],
            "source_checkpoint": {"path": str(checkpoint), "step": ckpt.get("step"),
                                  "metrics": ckpt.get("metrics", {}).get("val")},
            "shared_weights": weights,
            "files": ["tokenizer.json", *graph_files, *([weights["file"]] if weights else [])],
        }
        write_manifest(tmp, manifest)

        log("validating against torch")
        tokens, source = held_out_tokens(ckpt, 96)
        result = compare(model, tmp, tokens)
        result["text"] = source
        result["tolerance"] = FP32_TOLERANCE if quantize == "none" else None
        if quantize == "none" and result["max_abs_diff"] > FP32_TOLERANCE:
            raise ExportError(f"validation failed: ORT differs from torch by {result['max_abs_diff']:.3g} "
                              f"(> {FP32_TOLERANCE:g}); nothing written")
        manifest["validation"] = result
        write_manifest(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, json.loads((out / "manifest.json").read_text())
