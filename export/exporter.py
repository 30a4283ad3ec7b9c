"""Checkpoint → bundle folder: graphs, tokenizer, manifest; checked, optionally quantized, validated.

Everything is written into a hidden temp folder beside the destination that is published
(`publish.py`) only after validation passed, so a failed export never leaves a bundle (or
half of one) behind, and `--force` only ever replaces a bundle of ours. A quantized export
keeps the fp32 graphs in a second temp folder just long enough to time a short decode of both
(`decode_speed_check`): a quantized bundle slower than its source is said, never silent.
With `retrieval=DIR` (a datastore from `itera-train retrieval-index`, checked to come from this
checkpoint's weights and tokenizer) the graphs also output the hidden state and the datastore
is copied into the bundle under `retrieval/`, hashed like every other file.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import warnings
from pathlib import Path

from itera_runtime.bundle import write_manifest
from itera_runtime.manifest import (FUSED, PORTABLE, GraphSet, GraphSpec, Manifest, Quantization, Requires,
                                    Retrieval)
from itera_runtime.requires import installed_version, requires_for

from .graphfile import GRAPH_SET_CHOICES, LOWER_TO_GRAPH_SET, check_graph, graph_functions, graph_ops, graph_spec
from .publish import PublishError, check_destination, make_temp_dir, manifest_digest, publish
from .quantize import SCHEMES, parse_options
from .validate import FP32_TOLERANCE, ValidationTextError, compare, held_out_tokens
from itera_runtime.errors import UserError

PORTABLE_SUFFIX = ".portable"  # prefill.portable.onnx, decode.portable.onnx in a bundle with both sets
VALIDATION_TOKENS = 96
# The decode check of a quantized bundle against its fp32 source: interleaved rounds of
# greedy decoding, medians compared (a few hundred ms at the base preset).
SPEED_CHECK_TOKENS = 32
SPEED_CHECK_ROUNDS = 7


class ExportError(UserError):
    """An export that cannot proceed or failed validation; one line for the user."""


def default_output(checkpoint: Path, quantize: str) -> Path:
    """runs/x/best.pt → bundles/x (bundles/x-int8 when quantized); a model folder or hf:ORG/NAME → bundles/NAME."""
    if str(checkpoint).startswith("hf:"):
        return Path("bundles") / (str(checkpoint).rsplit("/", 1)[-1] + SCHEMES[quantize].suffix)
    checkpoint = Path(checkpoint).resolve()
    name = checkpoint.parent.name if checkpoint.stem in ("best", "last") else checkpoint.stem
    if checkpoint.is_dir():
        name = checkpoint.name
    return Path("bundles") / (name + SCHEMES[quantize].suffix)


def _combine(records: list[Quantization]) -> Quantization:
    """One record for a bundle whose graph files were quantized one by one."""
    if not records:
        return Quantization()
    first = records[0]
    settings = dict(first.settings)
    kept: dict[str, dict] = {}
    for r in records:  # what each graph kept in float (the graphs name their tensors differently)
        for kind, entry in r.settings.get("kept_float", {}).items():
            seen = kept.setdefault(kind, {"why": entry["why"], "tensors": []})
            seen["tensors"] = sorted(set(seen["tensors"]) | set(entry["tensors"]))
    if kept:
        settings["kept_float"] = kept
    return Quantization(mode=first.mode, method=first.method, settings=settings,
                        bytes_before=sum(r.bytes_before or 0 for r in records),
                        bytes_after=sum(r.bytes_after or 0 for r in records),
                        nodes_quantized=sum(r.nodes_quantized or 0 for r in records))


def _tokenizer_json(ckpt: dict, checkpoint: Path) -> str:
    from tokenizers import Tokenizer

    text = ckpt["tokenizer_json"]
    try:
        Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{checkpoint}: the checkpoint's tokenizer is not readable ({reason[:160]})") from None
    return text


def export_checkpoint(checkpoint, out=None, quantize: str = "none", graph_set: str = "auto", force: bool = False,
                      validate_text=None, log=lambda msg: None, quant_options=(),
                      retrieval=None, lower: str | None = None) -> tuple[Path, Manifest]:
    """Export a checkpoint of either family to a validated bundle; returns (folder, manifest).

    graph_set: one of GRAPH_SET_CHOICES; `lower` is its former name and values (LOWER_TO_GRAPH_SET).
    quant_options: `KEY=VALUE` changes to the scheme's settings (`quantize.parse_options`).
    retrieval: a datastore folder to ship in the bundle (Itera-Lite only).
    """
    from itera_lite.checkpoint import load_model

    # torch.onnx and optimum log advice meant for their developers (missing torchvision,
    # tied-weight notes); users get our own progress lines and errors instead.
    import optimum.utils.logging  # noqa: F401  (configures its logger on import; set ours after)

    for name in ("torch.onnx", "torch._dynamo", "torch.export", "optimum", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if quantize not in SCHEMES:
        raise ExportError(f"unknown --quantize {quantize!r}; choose from {', '.join(SCHEMES)}")
    if lower is not None:
        if lower not in LOWER_TO_GRAPH_SET:
            raise ExportError(f"unknown --lower {lower!r}; choose from {', '.join(LOWER_TO_GRAPH_SET)}")
        graph_set = LOWER_TO_GRAPH_SET[lower]
    if graph_set not in GRAPH_SET_CHOICES:
        raise ExportError(f"unknown --graph-set {graph_set!r}; choose from {', '.join(GRAPH_SET_CHOICES)}")
    try:
        overrides = parse_options(quantize, quant_options) if quant_options else {}
    except ValueError as e:
        raise ExportError(str(e)) from None
    reference = None  # what validation compares against: the model itself, or transformers' own
    origin = checkpoint
    from .hf_import import is_hf_source

    if is_hf_source(checkpoint):
        from .hf_import import load_source

        source = load_source(checkpoint, log)
        model, ckpt, reference = source.model, source.ckpt, source.reference
        ckpt["manifest_extra"] = source.manifest_extra
        checkpoint = source.folder
    else:
        checkpoint = Path(checkpoint)
        model, ckpt = load_model(checkpoint)  # CheckpointError carries its own one-line message
    tokenizer_json = _tokenizer_json(ckpt, checkpoint)
    datastore = _datastore(retrieval, model, tokenizer_json) if retrieval is not None else None
    try:
        tokens, text_source = held_out_tokens(ckpt, VALIDATION_TOKENS, validate_text)
    except ValidationTextError as e:
        raise ExportError(str(e)) from None
    out = Path(out) if out else default_output(origin, quantize)
    tmp = ref = None
    try:
        check_destination(out, force)
        seen = manifest_digest(out)
        tmp = make_temp_dir(out)
        # The fp32 graphs, kept beside a quantized bundle only to time the two against each other.
        ref = make_temp_dir(out) if quantize != "none" else None
    except PublishError as e:
        _remove(tmp)
        raise ExportError(str(e)) from None
    except OSError as e:
        _remove(tmp)
        raise ExportError(_os_error(e, out)) from None
    try:
        manifest = _build(model, ckpt, checkpoint, tokenizer_json, tmp, quantize, graph_set, log, ref, overrides,
                          datastore)
        for set_name in manifest.graph_sets():
            against = "transformers" if reference is not None else "torch"
            log(f"validating against {against} ({set_name} graphs)" if manifest.alt_graph_sets
                else f"validating against {against}")
            result = compare(reference or model, tmp, tokens, text=text_source, graph_set=set_name)
            tolerance = FP32_TOLERANCE * result.reference_scale if quantize == "none" else None
            if tolerance is not None and result.max_abs_diff > tolerance:
                raise ExportError(f"validation failed: ORT differs from {against} by {result.max_abs_diff:.3g} "
                                  f"(> {tolerance:.3g}: {FP32_TOLERANCE:g} x the largest |{against} value| "
                                  f"{result.reference_scale:.3g}) on the {set_name} graphs; nothing written")
            result = dataclasses.replace(result, tolerance=tolerance)
            if set_name == manifest.main_set:
                manifest.validation = result
            else:
                manifest.alt_graph_sets[set_name] = dataclasses.replace(manifest.alt_graph_sets[set_name],
                                                                        validation=result)
        if ref is not None:
            log(f"timing {quantize} decode against fp32")
            speed = decode_speed_check(ref, tmp, tokens[:16].tolist())
            manifest.quantization = dataclasses.replace(manifest.quantization, decode_vs_fp32=speed)
            if speed["slower"]:
                log(f"warning: this {quantize} bundle decodes slower than its fp32 source on this machine "
                    f"({speed['tokens_per_s']:.0f} vs {speed['fp32_tokens_per_s']:.0f} tokens/s, "
                    f"{speed['threads']} thread, median of {speed['rounds']} rounds); recorded in the manifest")
        write_manifest(tmp, manifest)
        publish(tmp, out, seen, log)
    except PublishError as e:
        _remove(tmp)
        raise ExportError(str(e)) from None
    except OSError as e:
        _remove(tmp)
        raise ExportError(_os_error(e, out)) from None
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _remove(ref)
    return out, manifest


def _remove(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def decode_speed_check(fp32: Path, quantized: Path, prompt: list[int], threads: int = 1) -> dict:
    """Greedy decode tokens/s of two bundles, interleaved rounds, medians: is `quantized` slower?

    One thread: onnxruntime decode of these models does not gain from a second one on small
    CPUs (see the README's speed table), and one thread disturbs the other less.
    """
    import statistics

    from itera_runtime.bundle import load_bundle
    from itera_runtime.generate import LoopTiming, generate_tokens
    from itera_runtime.sampling import Sampler
    from itera_runtime.session import ModelSession

    sessions = {k: ModelSession(load_bundle(p), threads=threads) for k, p in (("fp32", fp32), ("q", quantized))}
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(SPEED_CHECK_ROUNDS + 1):  # round 0 warms up
        for k, session in sessions.items():
            timing = LoopTiming()
            for _ in generate_tokens(session, prompt, SPEED_CHECK_TOKENS + 1, Sampler(), timing):
                pass
            if r:
                samples[k].append(timing.decode_tokens_per_s)
    q, f = statistics.median(samples["q"]), statistics.median(samples["fp32"])
    return {"tokens_per_s": round(q, 1), "fp32_tokens_per_s": round(f, 1), "ratio": round(q / f, 3),
            "slower": q < f, "threads": threads, "tokens": SPEED_CHECK_TOKENS, "rounds": SPEED_CHECK_ROUNDS}


def _os_error(e: OSError, out: Path) -> str:
    """One line naming the path and the cause (read-only place, disk full, ...)."""
    where = e.filename or out
    cause = e.strerror or str(e)
    if e.errno == 28:  # ENOSPC
        cause += " (disk full)"
    return f"{where}: {cause}; nothing written to {out}"


def _datastore(folder, model, tokenizer_json: str) -> tuple[Retrieval, Path, Path]:
    """A datastore folder checked to fit this model, arrays as the runtime checks them: (spec, keys, values)."""
    from itera_lite.retrieval import DatastoreError, check_fits, read_datastore

    if model.config.family != "itera":
        raise ExportError(f"--retrieval is for Itera-Lite bundles, not {model.config.family}")
    try:
        spec, keys, values = read_datastore(folder, model.config.vocab_size)
        check_fits(spec, model, tokenizer_json, str(folder))
    except DatastoreError as e:
        raise ExportError(str(e)) from None
    return spec, keys, values


def _build(model, ckpt: dict, checkpoint: Path, tokenizer_json: str, tmp: Path, quantize: str, graph_set: str,
           log, ref: Path | None = None, overrides: dict | None = None, datastore=None) -> Manifest:
    """Graphs, tokenizer and manifest into `tmp`; with a quantization, the fp32 bundle into `ref` too."""
    family = model.config.family
    log(f"exporting {family} graphs")
    alt = None  # the portable set of a bundle with both
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter-internal advice, not the user's concern
        if family in ("itera", "hybrid"):  # a hybrid's graphs are traced the same way (export/itera.py)
            from .itera import export_itera_graphs
            from .lower import fused_ops_available

            if graph_set == "auto":
                # Both sets when this onnxruntime can validate the fused one: fused decode ran
                # ~4x faster than portable on tiny, and the portable set costs only its graph
                # files (tiny: +5% fp32, +19% int8; a fixed ~150 KB, less for bigger models),
                # so the bundle is fast where it can be and runs on any onnxruntime >= the
                # portable floor.
                graph_set = "both" if fused_ops_available() else PORTABLE
            hidden = datastore is not None  # the kNN query is an extra output only where it is used
            parts = export_itera_graphs(model, tmp, graph_set=FUSED if graph_set == "both" else graph_set,
                                        hidden=hidden)
            if graph_set == "both":
                alt = export_itera_graphs(model, tmp, graph_set=PORTABLE, suffix=PORTABLE_SUFFIX,
                                          fused_weights=True, hidden=hidden)
        else:
            from .baseline import export_baseline_graphs, group_query_attention_runs_here

            if graph_set == "both":
                raise ExportError("--graph-set both is for Itera-Lite bundles; a baseline bundle carries one "
                                  "graph set: fused (GroupQueryAttention) or portable (standard ops)")
            if graph_set == "auto":
                # The KV buffer graph decodes in nearly flat time in depth (tiny: see README's
                # speed table); standard ops only where this onnxruntime cannot validate it.
                graph_set = FUSED if group_query_attention_runs_here() else PORTABLE
            parts = export_baseline_graphs(model, tmp, kv="buffer" if graph_set == FUSED else "concat")
    sets = {parts.graph_set: parts.graphs}
    if alt is not None:
        sets[alt.graph_set] = alt.graphs
    graph_files = sorted({g.file for graphs in sets.values() for g in graphs.values()})
    try:
        checks = {f: check_graph(tmp / f) for f in graph_files}
    except ValueError as e:
        raise ExportError(str(e)) from None

    scheme = SCHEMES[quantize]
    records = []
    if scheme.apply is not None and ref is not None:
        for f in tmp.iterdir():  # the graphs and any external data of theirs
            shutil.copy2(f, ref / f.name)
        _finish(model, ckpt, checkpoint, tokenizer_json, ref, parts, sets, graph_files, dict(checks), [])
    if scheme.apply is not None:
        log(f"quantizing to {quantize}")
        for f in graph_files:
            src = tmp / f
            dst = tmp / f"{src.stem}.{quantize}.tmp.onnx"
            records.append(scheme.apply(src, dst, overrides))
            dst.replace(src)
            checks[f] = {**check_graph(src), "bytes_fp32": records[-1].bytes_before}
        if alt is not None:
            _share_quantized_experts(tmp, sets[next(iter(sets))], sets[PORTABLE])
            checks.update({g.file: {**checks[g.file], **check_graph(tmp / g.file)} for g in sets[PORTABLE].values()})
    if FUSED in sets and "prefill" in sets[FUSED]:  # after quantization: it routes what QMoE quantized
        prompt = sets[FUSED]["prefill"].file
        if _route_prompt_experts(tmp / prompt):
            checks[prompt] = {**checks[prompt], **check_graph(tmp / prompt)}
    return _finish(model, ckpt, checkpoint, tokenizer_json, tmp, parts, sets, graph_files, checks, records, datastore)


def _finish(model, ckpt: dict, checkpoint: Path, tokenizer_json: str, tmp: Path, parts, sets: dict,
            graph_files: list[str], checks: dict, records: list[Quantization], datastore=None) -> Manifest:
    """Share the graphs' weights, write the tokenizer and the manifest of the bundle in `tmp`."""
    from itera_lite.checkpoint import weights_sha256
    from itera_lite.models import count_params
    from itera_runtime.provenance import provenance
    from itera_runtime.retrieval import DATASTORE_DIR, KEYS_FILE, VALUES_FILE

    family = model.config.family
    weights = None
    if len(graph_files) > 1:
        from .weights import share_weights

        weights = share_weights(tmp, graph_files)  # one copy of the weights for all graphs
    (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    prov = provenance()
    retrieval = None
    if datastore is not None:
        spec, keys, values = datastore
        (tmp / DATASTORE_DIR).mkdir(exist_ok=True)
        shutil.copyfile(keys, tmp / KEYS_FILE)
        shutil.copyfile(values, tmp / VALUES_FILE)
        retrieval = dataclasses.replace(spec, keys=KEYS_FILE, values=VALUES_FILE)
    # Re-read from the files: quantization and weight sharing rewrote them.
    specs = {s: {name: graph_spec(tmp / g.file) for name, g in graphs.items()} for s, graphs in sets.items()}
    main, *alts = specs
    manifest = Manifest(
        family=family,
        model_config=dict(ckpt["model_config"]),
        vocab_size=model.config.vocab_size,
        params=count_params(model),
        graphs=specs[main],
        graph_set=main,
        requires=graphs_requires(tmp, specs[main]),
        alt_graph_sets={s: GraphSet(specs[s], graphs_requires(tmp, specs[s])) for s in alts},
        io=parts.io,
        state=parts.state,
        opset=parts.opset,
        custom_domains=parts.custom_domains,
        quantization=_combine(records),
        graph_checks=checks,
        shared_weights=weights,
        retrieval=retrieval,
        versions=prov["versions"],
        created=prov["created"],
        source_checkpoint={"path": str(checkpoint), "step": ckpt.get("step"),
                           "metrics": (ckpt.get("metrics") or {}).get("val"),
                           "model_sha256": weights_sha256(model), **(ckpt.get("source") or {})},
        extra=dict(ckpt.get("manifest_extra") or {}),  # an imported checkpoint's chat_template, special_tokens
    )
    write_manifest(tmp, manifest)
    return manifest


def graphs_requires(folder: Path, graphs: dict[str, GraphSpec]) -> Requires:
    """What a set of written graphs needs from onnxruntime, read from the graph files themselves."""
    import onnx

    ops, functions, ir, opset = {}, set(), 0, 0
    for name, spec in graphs.items():
        model = onnx.load(str(Path(folder) / spec.file), load_external_data=False)
        ops[name] = graph_ops(model)
        functions |= set(graph_functions(model))
        ir = max(ir, model.ir_version)
        opset = max([opset, *(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))])
    return requires_for(ops, ir_version=ir, opset=opset, made_with=installed_version(), functions=functions)


def _route_prompt_experts(path: Path) -> int:
    """A fused prompt graph's experts as per-expert matmuls over their routed rows (export/route_experts.py)."""
    import onnx

    from .graphfile import save_model
    from .route_experts import route_prompt_experts

    model = onnx.load(str(path))
    done = route_prompt_experts(model)
    if done:
        save_model(model, path)
    return done


def _share_quantized_experts(folder: Path, fused: dict[str, GraphSpec], portable: dict[str, GraphSpec]) -> None:
    """Portable graphs of a quantized dual bundle read the fused graphs' QMoE expert bytes."""
    import onnx

    from .graphfile import save_model
    from .quantize import read_quantized_experts

    for name, spec in portable.items():
        model = onnx.load(str(folder / spec.file))
        if read_quantized_experts(model, onnx.load(str(folder / fused[name].file))):
            from .graph_passes import prune

            prune(model)
            save_model(model, folder / spec.file)
