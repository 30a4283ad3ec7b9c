"""itera-train: train Itera-Lite or the Transformer baseline on real text."""

from __future__ import annotations

import sys

import click

from .train import TrainConfig


def fail(message: str) -> None:
    """One clear line on stderr and a non-zero exit: how every user-facing error ends."""
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


_D = TrainConfig()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", type=click.Choice(["itera", "baseline"]), default=_D.model)
@click.option("--preset", type=click.Choice(["tiny", "small", "base"]), default=_D.preset)
@click.option("--data", default=_D.data, help="'shakespeare', a text file/folder/glob, or hf:NAME[:CONFIG]")
@click.option("--vocab-size", type=click.IntRange(256, 65535), default=_D.vocab_size)
@click.option("--out", default=None, help="run folder [default: runs/MODEL-PRESET]")
@click.option("--seq-len", type=click.IntRange(8), default=_D.seq_len)
@click.option("--batch-size", type=click.IntRange(1), default=_D.batch_size, help="global, across processes")
@click.option("--grad-accum", type=click.IntRange(1), default=_D.grad_accum)
@click.option("--lr", type=float, default=_D.lr)
@click.option("--warmup-steps", type=click.IntRange(0), default=_D.warmup_steps)
@click.option("--weight-decay", type=float, default=_D.weight_decay)
@click.option("--grad-clip", type=float, default=_D.grad_clip)
@click.option("--max-steps", type=click.IntRange(1), default=_D.max_steps)
@click.option("--max-minutes", type=float, default=None, help="wall-clock budget")
@click.option("--max-tokens", type=click.IntRange(1), default=None, help="training-token budget")
@click.option("--eval-every", type=click.IntRange(1), default=_D.eval_every)
@click.option("--eval-batches", type=click.IntRange(1), default=_D.eval_batches)
@click.option("--final-eval-batches", type=click.IntRange(1), default=None,
              help="batches of the final val/test eval [default: whole splits]")
@click.option("--save-every", type=click.IntRange(1), default=None, help="[default: --eval-every]")
@click.option("--patience", type=click.IntRange(1), default=None, help="early stop after N evals without gain")
@click.option("--seed", type=int, default=_D.seed)
@click.option("--threads", type=click.IntRange(1), default=None, help="torch intra-op threads")
@click.option("--resume", is_flag=True, help="continue the run in --out from last.pt")
@click.option("--quiet", is_flag=True, help="no progress bar")
def main(model, preset, out, resume, quiet, **kw):
    """Train a model; writes best.pt, last.pt, metrics.jsonl, train.csv, eval.csv, summary.json."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .train import TrainError, train

    cfg = TrainConfig(model=model, preset=preset, out=out or f"runs/{model}-{preset}", **kw)
    try:
        summary = train(cfg, resume=resume, progress=not quiet)
    except (TrainError, CheckpointError, DataError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; continue with --resume")
    if summary is not None:
        best = summary["best"]
        click.echo(f"{summary['model']}-{summary['preset']}: {summary['params']['total']:,} params, "
                   f"{summary['steps']} steps ({summary['stop_reason']}), "
                   f"val bits/byte {best['val_bpb']:.4f}, val ppl {best['val_ppl']:.2f}, "
                   f"test bits/byte {best['test_bpb']:.4f} → {cfg.out}/summary.json")


if __name__ == "__main__":
    main()
