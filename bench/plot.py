"""matplotlib, set up once for every plot the report draws (bench tables and training curves).

matplotlib lives in the `report` extra: a device running the base install benchmarks and
writes record files, and the plots are drawn wherever the report is made. It is imported
only here, only when a plot is drawn, with the Agg backend (no display, same PNG anywhere).
"""

from __future__ import annotations

import os
from pathlib import Path
from itera_runtime.errors import UserError

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


class PlotError(UserError):
    """Plots were asked for and cannot be drawn (matplotlib missing)."""


def pyplot():
    """matplotlib.pyplot on the Agg backend, or one clear line saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plots need matplotlib: pip install 'itera-lite[report]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure(n_plots: int = 1, width: float = 5.0, height: float = 3.6, rows: int = 1):
    """A figure with n_plots axes side by side (a flat list), sized per axes."""
    plt = pyplot()
    cols = -(-n_plots // rows)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n_plots:]:
        ax.set_visible(False)
    for ax in flat[:n_plots]:
        ax.grid(True, alpha=0.3)
    return fig, flat[:n_plots]


def save(fig, path: str | os.PathLike) -> Path:
    """Write the figure as PNG (temp file, then rename) and free it."""
    plt = pyplot()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if fig.get_layout_engine() is None:
            fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
