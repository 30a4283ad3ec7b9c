"""itera-train: train Itera-Lite or the Transformer baseline on real text."""

from __future__ import annotations

import math

import click

from itera_runtime.errors import OneLineErrors, fail

from .train import TrainConfig


_D = TrainConfig()


def _finite_positive(ctx, param, value):
    # click's FloatRange lets nan through (every comparison with nan is false).
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a finite number > 0, got {value}", param=param)
    return value


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", type=click.Choice(["itera", "baseline"]), default=_D.model)
@click.option("--preset", type=click.Choice(["tiny", "small", "base"]), default=_D.preset)
@click.option("--data", default=_D.data, help="'shakespeare', a text file/folder/glob, or hf:NAME[:CONFIG]")
@click.option("--vocab-size", type=click.IntRange(256, 65535), default=_D.vocab_size)
@click.option("--out", default=None, help="run folder [default: runs/MODEL-PRESET]")
@click.option("--seq-len", type=click.IntRange(8), default=_D.seq_len)
@click.option("--batch-size", type=click.IntRange(1), default=_D.batch_size, help="global, across processes")
@click.option("--grad-accum", type=click.IntRange(1), default=_D.grad_accum)
@click.option("--lr", type=float, default=_D.lr, callback=_finite_positive)
@click.option("--warmup-steps", type=click.IntRange(0), default=_D.warmup_steps)
@click.option("--weight-decay", type=click.FloatRange(0), default=_D.weight_decay)
@click.option("--grad-clip", type=float, default=_D.grad_clip, callback=_finite_positive)
@click.option("--max-steps", type=click.IntRange(1), default=_D.max_steps)
@click.option("--max-minutes", type=click.FloatRange(0, min_open=True), default=None, callback=_finite_positive,
              help="wall-clock budget, the closing evaluation of best.pt included: training takes 90% of it, "
                   "the evaluation what fits the rest (summary.json final_eval)")
@click.option("--max-tokens", type=click.IntRange(1), default=None, help="training-token budget")
@click.option("--eval-every", type=click.IntRange(1), default=_D.eval_every)
@click.option("--eval-batches", type=click.IntRange(1), default=_D.eval_batches)
@click.option("--final-eval-batches", type=click.IntRange(1), default=None,
              help="batches of the final val/test eval [default: whole splits]")
@click.option("--save-every", type=click.IntRange(1), default=None, help="[default: --eval-every]")
@click.option("--patience", type=click.IntRange(1), default=None, help="early stop after N evals without gain")
@click.option("--seed", type=int, default=_D.seed)
@click.option("--threads", type=click.IntRange(1), default=None, help="torch intra-op threads (at most the CPUs)")
@click.option("--tensorboard", is_flag=True, help="also write TensorBoard event files to OUT/tensorboard")
@click.option("--teacher", default=None, metavar="RUN_OR_CKPT",
              help="distil from this run folder's best.pt or checkpoint (same --data and --vocab-size)")
@click.option("--distill-alpha", type=click.FloatRange(0, 1), default=_D.distill_alpha,
              help="weight of the labels' cross-entropy; the teacher's KL gets 1 - alpha")
@click.option("--distill-temperature", type=float, default=_D.distill_temperature, callback=_finite_positive,
              help="softens teacher and student logits in the KL term (scaled by T²)")
@click.option("--resume", is_flag=True,
              help="continue the run in --out from last.pt with its own settings; budgets given again replace its own")
@click.option("--quiet", is_flag=True, help="no progress bar")
def main(model, preset, out, resume, quiet, **kw):
    """Train a model; writes best.pt, last.pt, metrics.jsonl, train.csv, eval.csv, summary.json.

    `itera-train retrieval-index CHECKPOINT` builds a kNN-LM datastore from a trained model (its own --help).
    """
    from .train import train

    ctx = click.get_current_context()
    # What the user typed, as opposed to defaults: a resumed run keeps its own settings.
    given = {name for name in ("model", "preset", *kw)
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    cfg = TrainConfig(model=model, preset=preset, out=out or f"runs/{model}-{preset}", **kw)
    try:
        summary = train(cfg, resume=resume, progress=not quiet, given=given)
    except OSError as e:
        # An unwritable or full place the run writes to (logs, summary): name it and the cause.
        fail(f"{e.filename or cfg.out}: {e.strerror or e}")
    except KeyboardInterrupt:
        fail("interrupted; continue with --resume")
    if summary is not None:
        best = summary["best"]
        click.echo(f"{summary['model']}-{summary['preset']}: {summary['params']['total']:,} params, "
                   f"{summary['steps']} steps ({summary['stop_reason']}), "
                   f"val bits/byte {best['val_bpb']:.4f}, val ppl {best['val_ppl']:.2f}, "
                   f"test bits/byte {best['test_bpb']:.4f} → {summary['train_config']['out']}/summary.json")
        final = summary.get("final_eval") or {}
        if final.get("bounded_by") == "max_minutes" and not (final["val"]["complete"] and final["test"]["complete"]):
            click.echo(f"note: best.pt was evaluated on the first {final['val']['windows']:,} of "
                       f"{final['val']['windows_in_split']:,} val and {final['test']['windows']:,} of "
                       f"{final['test']['windows_in_split']:,} test windows, what fit the --max-minutes budget "
                       "(summary.json final_eval; itera-bench quality scores a bundle on whole splits)", err=True)
        distill = summary.get("distillation")
        if distill:
            share = distill["teacher_share_of_step"]
            click.echo(f"distilled from {distill['teacher']['path']} (alpha {distill['alpha']:g}, "
                       f"temperature {distill['temperature']:g})"
                       + (f"; the teacher took {share:.0%} of a step" if share is not None else ""))
        experts = summary.get("experts")
        if experts and experts["collapsed"]:
            click.echo(f"warning: collapsed router in layer(s) {experts['collapsed_layers']} "
                       "(see experts in summary.json)", err=True)


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--out", default=None, help="datastore folder [default: datastore/ beside CHECKPOINT]")
@click.option("--max-entries", type=click.IntRange(1), default=100_000,
              help="keys to store (whole training windows, drawn with --seed)")
@click.option("--all", "all_entries", is_flag=True, help="every position of the training split (ignores --max-entries)")
@click.option("--tune-tokens", type=click.IntRange(64), default=8192,
              help="validation tokens the default k, lambda and temperature are tuned on")
@click.option("--seed", type=int, default=0)
@click.option("--force", is_flag=True, help="replace an existing datastore (never anything else)")
@click.option("--quiet", is_flag=True, help="no progress bar")
def retrieval_index(checkpoint, out, max_entries, all_entries, tune_tokens, seed, force, quiet):
    """Build a kNN-LM datastore (hidden state → next token) from CHECKPOINT's training split."""
    from .retrieval import build_datastore

    try:
        path, meta = build_datastore(checkpoint, out, None if all_entries else max_entries, tune_tokens=tune_tokens,
                                     seed=seed, force=force, progress=not quiet,
                                     log=lambda m: click.echo(f"· {m}", err=True))
    except OSError as e:
        fail(f"{e.filename or out}: {e.strerror or e}")
    except KeyboardInterrupt:
        fail("interrupted; nothing written")
    t = meta["source"]["tuning"]
    size = sum((path / f).stat().st_size for f in ("keys.npy", "values.npy"))
    click.echo(f"{path}: {meta['n_entries']:,} entries × {meta['dim']} ({meta['key_dtype']}), {size / 1e6:.2f} MB; "
               f"tuned on {t['tokens']} val tokens: {meta['metric']} k={meta['k']} lambda={meta['lambda']:g} "
               f"temperature={meta['temperature']:.3g}, val nats/token {t['nats_per_token_model']:.4f} → "
               f"{t['nats_per_token']:.4f}")


if __name__ == "__main__":
    main()
