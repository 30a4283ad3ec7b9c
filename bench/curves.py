"""Training runs drawn: loss, bits/byte, learning rate, gradient norm, tokens/s, expert load.

A run folder is what `itera-train` wrote: metrics.jsonl (every logged record, the source of
truth), train.csv / eval.csv (the same rows, fixed columns) and summary.json. The curves
live beside the bench report rather than in itera-train: the report is the stage that reads
what every earlier stage wrote, and people compare a run's quality with its bundle's
speed on one page. Reading a run needs no torch.

Bits/byte is drawn for validation only: a training step logs tokens, not bytes, and turning
train loss into bits/byte would need a bytes-per-token ratio the run never measured.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import click

from .plot import PALETTE, figure, pyplot, save
from itera_runtime.errors import UserError

X_AXES = (("step", "step", 1.0), ("tokens", "tokens seen", 1.0), ("elapsed_s", "wall-clock (min)", 1 / 60))


class RunError(UserError, ValueError):
    """A folder that is not a readable training run."""


@dataclass
class Run:
    """One training run's logged rows."""

    path: Path
    label: str
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    summary: dict | None = None
    note: str | None = None  # what was left out on reading it (a cut last line)

    @property
    def expert_load(self) -> list[tuple[int, list[list[float]]]]:
        """(step, per-layer share of tokens per expert) for every train row that logged it."""
        return [(r["step"], r["expert_load"]) for r in self.train if r.get("expert_load")]


def _number(v):
    if v in (None, ""):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def load_run(path: str | Path) -> Run:
    """A run folder's rows: metrics.jsonl when present, else train.csv / eval.csv."""
    path = Path(path)
    metrics, train_csv = path / "metrics.jsonl", path / "train.csv"
    try:
        if metrics.exists():
            rows, note = _metrics_rows(metrics)
            train = [r for r in rows if r.get("kind") == "train"]
            evals = [r for r in rows if r.get("kind") == "eval"]
        elif train_csv.exists():
            note = None
            train = _csv_rows(train_csv)
            evals = _csv_rows(path / "eval.csv") if (path / "eval.csv").exists() else []
        else:
            raise RunError(f"{path}: not a training run (no metrics.jsonl or train.csv)")
        summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: unreadable training run ({e})") from None
    if not train and not evals:
        raise RunError(f"{path}: the training run logged no rows yet")
    label = f"{summary['model']}-{summary['preset']}" if summary and "model" in summary else path.name
    if note:
        click.echo(f"warning: {path}: {note}", err=True)
    return Run(path, label, train, evals, summary, note)


def _metrics_rows(path: Path) -> tuple[list[dict], str | None]:
    """The rows of metrics.jsonl, and a note when its last line was cut (a run killed mid-write
    leaves one): the complete lines are read, a broken line anywhere else is refused."""
    text = path.read_text()
    lines = [line for line in text.split("\n") if line.strip()]
    cut = None
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            cut = lines.pop()
    rows = [json.loads(line) for line in lines]
    note = (f"metrics.jsonl's last line is cut ({len(cut)} characters and no line end: the run was killed while "
            f"writing it); read its {len(rows)} complete line(s)") if cut is not None else None
    return rows, note


def load_runs(paths) -> list[Run]:
    runs = [load_run(p) for p in paths]
    labels = [r.label for r in runs]
    for r in runs:  # two runs of one preset: tell them apart by folder
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.path.name})"
    return runs


def _series(rows: list[dict], x: str, y: str, scale: float = 1.0):
    pts = [(r[x] * scale, r[y]) for r in rows if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))
           and math.isfinite(r[y])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot_vs_x(runs: list[Run], metrics: list[tuple[str, str, str]], ylabel: str, title: str, path: Path):
    """One axes per x (step, tokens, time); one colour per run; one line style per metric."""
    fig, axes = figure(len(X_AXES))
    drawn = False
    for ax, (x, xlabel, scale) in zip(axes, X_AXES):
        for colour, run in zip(PALETTE * 4, runs):
            for source, y, style in metrics:
                xs, ys = _series(run.train if source == "train" else run.eval, x, y, scale)
                if xs:
                    marker = "o" if source == "eval" else None
                    ax.plot(xs, ys, style, color=colour, marker=marker, markersize=3, linewidth=1.2,
                            alpha=0.55 if source == "train" and len(xs) > 50 else 1.0,
                            label=f"{run.label} {source}")
                    drawn = True
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    if not drawn:
        pyplot().close(fig)
        return None
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    return save(fig, path)


def _plot_optimisation(runs: list[Run], path: Path):
    fig, axes = figure(3)
    specs = (("lr", "learning rate", False), ("grad_norm", "gradient norm (before clipping)", True),
             ("tokens_per_s", "training tokens/s", False))
    for ax, (y, ylabel, log) in zip(axes, specs):
        for colour, run in zip(PALETTE * 4, runs):
            xs, ys = _series(run.train, "step", y)
            if xs:
                ax.plot(xs, ys, color=colour, linewidth=1.2, label=run.label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log and ax.has_data():
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("Optimisation")
    return save(fig, path)


def _plot_experts(run: Run, path: Path):
    """Per layer: share of tokens routed to each expert over training (heatmap), and the
    load-balancing loss below. An even router sits at 1/E everywhere; a collapsing one
    shows bright rows and dark rows."""
    import numpy as np

    loads = run.expert_load
    steps = [s for s, _ in loads]
    grid = np.asarray([load for _, load in loads], dtype=float)  # (T, n_layers, E)
    if grid.ndim != 3 or len(steps) < 1:
        return None
    n_layers, n_experts = grid.shape[1], grid.shape[2]
    fig, axes = figure(n_layers + 1, width=4.2, height=2.6, rows=-(-(n_layers + 1) // 3))
    vmax = max(grid.max(), 2.0 / n_experts)
    x0, x1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1
    for layer, ax in enumerate(axes[:n_layers]):
        ax.grid(False)
        im = ax.imshow(grid[:, layer, :].T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=vmax,
                       extent=(x0, x1, -0.5, n_experts - 0.5), interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
    fig.colorbar(im, ax=axes[:n_layers], label=f"share of tokens (even = {1 / n_experts:.3f})", shrink=0.8)
    ax = axes[n_layers]
    xs, ys = _series(run.train, "step", "balance_loss")
    if xs:
        ax.plot(xs, ys, color=PALETTE[0], linewidth=1.2)
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="even routing (1.0)")
        ax.legend(fontsize=7)
    ax.set_title("load-balancing loss", fontsize=9)
    ax.set_xlabel("step")
    fig.suptitle(f"Expert load over training: {run.label}")
    # colorbar beside several axes does not mix with tight_layout; lay out by hand
    fig.set_layout_engine("constrained")
    return save(fig, path)


def _summary_table(runs: list[Run]) -> str:
    rows = ["| run | params (total / active) | steps | tokens | wall-clock | stop | train tok/s | "
            "best val bits/byte | test bits/byte |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        s = run.summary
        if s is None:
            last = run.train[-1] if run.train else run.eval[-1]
            best = min((r["val_bpb"] for r in run.eval if isinstance(r.get("val_bpb"), float)), default=None)
            rows.append(f"| {run.label} | - | {last.get('step')} | {last.get('tokens')} | "
                        f"{(last.get('elapsed_s') or 0) / 60:.1f} min | (running or killed: no summary.json) | - | "
                        f"{'-' if best is None else f'{best:.4f}'} (logged evals) | - |")
            continue
        p, b = s.get("params", {}), s.get("best", {})
        tps = s.get("train_tokens_per_s")
        rows.append(f"| {run.label} | {p.get('total', 0):,} / {p.get('active_per_token', 0):,} | {s.get('steps')} | "
                    f"{s.get('tokens_seen', 0):,} | {s.get('elapsed_s', 0) / 60:.1f} min | {s.get('stop_reason')} | "
                    f"{'-' if tps is None else f'{tps:,.0f}'} | {b.get('val_bpb', float('nan')):.4f} | "
                    f"{b.get('test_bpb', float('nan')):.4f} |")
    return "\n".join(rows)


# itera-train's threshold for an underused expert (a quarter of an even share); its summary
# names them itself (summary["experts"]), and this applies the same rule to the logged load
# of runs whose summary predates that.
UNDERUSED_SHARE = 0.25


def _expert_table(run: Run) -> str | None:
    """Per layer: min/max share of tokens and the underused experts, with a collapsed router flagged."""
    experts = (run.summary or {}).get("experts")
    if experts and experts.get("layers"):
        where = f"best.pt on the {experts.get('split', 'val')} split (itera-train's summary)"
        layers = [(ly["layer"], ly["share"], ly["underused"], ly.get("collapsed", False)) for ly in experts["layers"]]
    elif run.expert_load:
        step, last = run.expert_load[-1]
        where = f"the last logged training step ({step})"
        layers = [(i, shares, [e for e, x in enumerate(shares) if x < UNDERUSED_SHARE / len(shares)], None)
                  for i, shares in enumerate(last)]
    else:
        return None
    rows = [f"Expert load of {run.label}, {where}: share of tokens per expert; underused = under "
            f"{UNDERUSED_SHARE:.0%} of an even share.", "", "| layer | min | max | underused experts | collapsed |",
            "|---|---|---|---|---|"]
    for layer, shares, low, collapsed in layers:
        flag = "-" if collapsed is None else ("**yes**" if collapsed else "no")
        rows.append(f"| {layer} | {min(shares):.3f} | {max(shares):.3f} | {', '.join(map(str, low)) or '-'} | {flag} |")
    return "\n".join(rows)


def runs_section(runs: list[Run], out_dir: Path) -> str:
    """Markdown for the training runs, with the curves drawn into out_dir (PNG)."""
    out_dir = Path(out_dir)
    parts = ["## Training runs", "", _summary_table(runs), ""]
    parts += [f"Note: `{run.path}`: {run.note}." for run in runs if run.note] + [""] * any(run.note for run in runs)
    plots = [
        ("Loss", _plot_vs_x(runs, [("train", "loss", "-"), ("eval", "val_loss", "--")], "loss (nats/token)",
                            "Train (solid) and validation (dashed) loss", out_dir / "runs_loss.png")),
        ("Validation bits/byte", _plot_vs_x(runs, [("eval", "val_bpb", "--")], "bits/byte",
                                            "Validation bits/byte", out_dir / "runs_bits_per_byte.png")),
        ("Learning rate, gradient norm, tokens/s", _plot_optimisation(runs, out_dir / "runs_optimisation.png")),
    ]
    for i, run in enumerate(runs):
        if run.expert_load:
            plots.append((f"Expert load: {run.label}", _plot_experts(run, out_dir / f"runs_experts_{i}.png")))
    for title, png in plots:
        if png is not None:
            parts += [f"### {title}", "", f"![{title}]({png.name})", ""]
    for run in runs:
        table = _expert_table(run)
        if table:
            parts += [table, ""]
    if not any(run.expert_load for run in runs):
        parts += ["(No run logged expert load: no MoE layers.)", ""]
    return "\n".join(parts)
