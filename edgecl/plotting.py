"""Figures for reports (accuracy heatmaps, audit charts, comparisons) without touching pyplot's global state.

A `Figure` with its own Agg canvas renders to PNG anywhere, and leaves a notebook user's backend and open figures
alone (``matplotlib.use("Agg")`` inside a library call would switch them). matplotlib comes with the `train` extra."""
from __future__ import annotations

import os
from typing import Any

from edgecl.errors import UsageError


def new_figure(figsize: tuple[float, float], **subplots: Any) -> tuple[Any, Any]:
    """(figure, axes) like `pyplot.subplots`, on a private Agg canvas; UsageError when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("plots need matplotlib (pip install 'edgecl[train]' or matplotlib)") from None
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(**subplots)


def save_png(fig: Any, path: str | os.PathLike, dpi: int = 110) -> str:
    """Write the figure as PNG (atomically: a crash never leaves half an image) and return the path."""
    from io import BytesIO

    from edgecl.io import write_atomic

    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    write_atomic(path, buffer.getvalue())
    return os.fspath(path)
