"""The PNG charts of `edgecl compare`, drawn from the report dict alone: accuracy heatmaps per method, ACC/BWT and
bytes bars, runtime timings, the accuracy-vs-bytes Pareto plot and task-order robustness. Each figure has its own
canvas (`edgecl.plotting`), so pyplot's global state is never touched."""
from __future__ import annotations

import math
import os
from typing import Any

from edgecl.plotting import new_figure, save_png
from edgecl.train.outputs import plot_matrix

KIB = 1024.0


def _colors(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _label(value: float, fmt: str) -> str:
    text = format(value, fmt)
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0" for a tiny negative


Panel = tuple[str, list, "list | None", bool, str]  # y label, values, errors, log scale, label format


def _bar_panels(path: str, title: str, names: list[str], panels: list[Panel]) -> None:
    """One figure of side-by-side bar charts, one per (y label, values, errors or None, log scale, label format);
    missing values are labelled 'n/a' rather than drawn as a zero bar."""
    colors = _colors(names)
    fig, axes = new_figure((max(4.0, 1.0 + 0.9 * len(names)) * len(panels), 3.8), nrows=1, ncols=len(panels))
    for ax, (label, values, errors, log, fmt) in zip(list(getattr(axes, "flat", [axes])), panels):
        heights = [0.0 if v is None else v for v in values]
        errs = None if errors is None else [0.0 if e is None else e for e in errors]
        bars = ax.bar(names, heights, yerr=errs, capsize=4, color=[colors[n] for n in names])
        ax.bar_label(bars, labels=["n/a" if v is None else _label(v, fmt) for v in values], fontsize=8, padding=2)
        present = [v for v in values if v is not None]
        if log and present and min(present) > 0 and max(present) > 20 * min(present):
            ax.set_yscale("log")
            _plain_ticks(ax.yaxis, present)
        else:
            ax.axhline(0, color="black", linewidth=0.6)
        ax.set_ylabel(label)
        ax.margins(y=0.12)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def _plain_ticks(axis, values: list[float]) -> None:
    """Log-scale tick labels as plain numbers (300, not 3×10²); over more than a decade only 2× and 5× minor ticks
    are labelled so the labels do not collide."""
    from matplotlib.ticker import FuncFormatter

    wide = max(values) > 3 * min(values)
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(
        lambda v, _pos: f"{v:g}" if not wide or round(v / 10 ** math.floor(math.log10(v))) in (2, 3, 5) else ""))


def _pareto_plot(report: dict[str, Any], path: str) -> None:
    save_png(pareto_figure(report), path)


def pareto_figure(report: dict[str, Any]) -> Any:
    """Accuracy against artifact bytes, the front circled (and joined by a step line when it has two points or
    more; the legend shows what is drawn)."""
    methods = report["methods"]
    colors = _colors(list(report["methods"]))
    fig, ax = new_figure((6.4, 4.4))
    placed: list[tuple[float, float]] = []
    for name, e in sorted(methods.items(), key=lambda item: -item[1]["acc_mean"]):
        x, y = e["artifact_bytes"] / KIB, 100 * e["acc_mean"]
        ax.errorbar(x, y, yerr=100 * e["acc_std"], fmt="o", color=colors[name], capsize=4, markersize=7)
        crowded = any(abs(x / px - 1) < 0.15 and abs(y - py) < 3 for px, py in placed)  # a label just above
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, -14) if crowded else (6, 6), fontsize=9)
        placed.append((x, y))
    front = [n for n in report.get("pareto_front", []) if n in methods]
    if front:
        xs = [methods[n]["artifact_bytes"] / KIB for n in front]
        ys = [100 * methods[n]["acc_mean"] for n in front]
        if len(front) > 1:
            ax.step(xs, ys, where="post", color="crimson", linestyle="--", linewidth=1.2)
        ax.scatter(xs, ys, s=180, facecolors="none", edgecolors="crimson", linewidths=1.5,
                   label="Pareto front" if len(front) > 1 else "on the Pareto front")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    _plain_ticks(ax.xaxis, [e["artifact_bytes"] / KIB for e in methods.values()] or [1.0])
    ax.tick_params(axis="x", which="both", labelsize=8)
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("artifact size (KiB, log scale)")
    ax.set_ylabel("ACC % (mean ± std over seeds)")
    ax.set_title(f"Accuracy against bytes on {report['stream']} ({report['n_tasks']} tasks)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def write_plots(report: dict[str, Any], out_dir: str) -> dict[str, str]:
    """All charts of a comparison; returns {chart: file name relative to out_dir}."""
    methods = report["methods"]
    names = list(methods)
    plots: dict[str, str] = {}

    def path(key: str, file: str) -> str:
        plots[key] = file
        return os.path.join(out_dir, file)

    for name, e in methods.items():
        plot_matrix(e["acc_matrix_mean"], f"{name} on {report['stream']} (mean of {len(e['runs'])} seeds)",
                    path(f"acc_matrix_{name}", f"acc_matrix_{name}.png"))
    pct = [([100 * methods[n][f"{key}_mean"] for n in names], [100 * methods[n][f"{key}_std"] for n in names])
           for key in ("acc", "bwt")]
    _bar_panels(path("acc_bwt", "acc_bwt.png"), "Final accuracy and backward transfer (mean ± std over seeds)", names,
                [("ACC %", *pct[0], False, ".1f"), ("BWT (points)", *pct[1], False, ".1f")])
    kib = [[None if methods[n][key] is None else methods[n][key] / KIB for n in names]
           for key in ("artifact_bytes", "bytes_per_added_task")]
    _bar_panels(path("bytes", "bytes.png"), "Artifact size", names,
                [("artifact KiB", kib[0], None, True, ".1f"), ("KiB per added task", kib[1], None, True, ".1f")])
    runtime = [[methods[n].get("runtime", {}).get(key) for n in names] for key in ("switch_ms", "infer_ms")]
    if any(v is not None for v in runtime[0]):
        _bar_panels(path("runtime", "runtime.png"), "TaskRuntime: median switch and batch-1 inference time", names,
                    [("switch ms", runtime[0], None, True, ".3g"),
                     ("inference ms (batch 1)", runtime[1], None, True, ".3g")])
    _pareto_plot(report, path("pareto", "pareto.png"))
    robust = [n for n in names if "order_robustness" in methods[n]]
    if robust:
        _bar_panels(path("order_robustness", "order_robustness.png"),
                    f"Task-order robustness over {report['orders']} orders (lower is better)", robust,
                    [(f"{key.upper()} (points)", [100 * methods[n]["order_robustness"][key] for n in robust], None,
                      False, ".2f") for key in ("mopd", "aopd")])
    return plots
