"""What a training run leaves for people: results.json, the accuracy-matrix heatmap, and the matrix as text.

Torch-free (numpy, matplotlib on a private canvas), so `edgecl compare` can redraw its charts from a saved report."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from edgecl.checks import refuse_overwrite
from edgecl.io import write_atomic
from edgecl.metrics import acc, bwt
from edgecl.plotting import new_figure, save_png


RUN_FILES = ("model.edgecl", "model.edgecl.state", "spec.json", "acc_matrix.png", "results.json")
"""What `edgecl train` writes into --out (`edgecl.train.pipeline`): the artifact, its training state, then the rest."""


REWRITTEN_FROM = {"--arch": "spec.json"}
"""Run files that rewrite an input with what was read from it (spec.json over the --arch spec.json it came from):
no input is lost, so they are not refused."""


def check_run_outputs(out_dir: str, reads: dict[str, str | None]) -> None:
    """Refuse an --out whose files would replace an input (`reads`: flag → path, e.g. an --arch spec.json, a --stream
    file) before anything is trained, but for `REWRITTEN_FROM`. The --resume artifact is not among the inputs:
    replacing it in its own folder is the designed update (written beside it, verified, then renamed over it;
    `artifact.append_task`)."""
    for flag, path in reads.items():
        refuse_overwrite([(f"--out {out_dir}:", os.path.join(out_dir, name)) for name in RUN_FILES
                          if name != REWRITTEN_FROM.get(flag)], [(flag, path)])


def format_matrix(acc_matrix: list[list[float]]) -> str:
    """The accuracy matrix as a fixed-width text table (percent)."""
    n = len(acc_matrix)
    lines = ["after\\on " + " ".join(f"{j:>5}" for j in range(n))]
    for i, row in enumerate(acc_matrix):
        lines.append(f"{i:>8} " + " ".join(f"{100 * v:5.1f}" for v in row))
    return "\n".join(lines)


def write_results(data: dict[str, Any], acc_matrix: list[list[float]], title: str, out_dir: str) -> None:
    """acc_matrix.png (heatmap), then results.json, each written atomically; results.json last, so its presence
    means every file of the run is complete."""
    os.makedirs(out_dir, exist_ok=True)
    plot_matrix(acc_matrix, title, os.path.join(out_dir, "acc_matrix.png"))
    save_json(data, os.path.join(out_dir, "results.json"))


def save_json(data: dict[str, Any], path: str) -> None:
    """Write JSON atomically (temp file + rename): a crash never leaves a half-written results file."""
    write_atomic(path, json.dumps(data, indent=2).encode())


def plot_matrix(acc_matrix: list[list[float]], title: str, path: str) -> None:
    """Heatmap of A[i][j] in percent (`matrix_figure`), written as PNG."""
    save_png(matrix_figure(acc_matrix, title), path)


def matrix_figure(acc_matrix: list[list[float]], title: str) -> Any:
    """Heatmap of A[i][j] in percent, each seen entry labelled to one decimal, ACC and BWT in the title. The colour
    scale starts a little below the lowest entry, so 97 % and 98 % differ in colour instead of sharing the top of a
    0-100 scale."""
    n = len(acc_matrix)
    a = np.full((n, n), np.nan)
    for i, row in enumerate(acc_matrix):
        a[i, :len(row)] = row
    seen = 100 * a[~np.isnan(a)]
    low = max(0.0, 5 * np.floor(seen.min() / 5) - 5) if seen.size else 0.0
    fig, ax = new_figure((max(4.8, 1.0 + 0.62 * n), max(3.8, 1.0 + 0.5 * n)))  # min: title fits
    im = ax.imshow(100 * a, vmin=low, vmax=100, cmap="viridis")
    for i in range(n):
        for j in range(i + 1):
            ax.text(j, i, f"{100 * a[i, j]:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if 100 * a[i, j] < (low + 100) / 2 else "black")
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after learning task i")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_title(f"{title}\nACC {100 * acc(a):.1f} %   BWT {100 * bwt(a):+.1f} points", fontsize=10)
    fig.colorbar(im, ax=ax, label="accuracy %", shrink=0.8)
    fig.tight_layout()
    return fig
