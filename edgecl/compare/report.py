"""The human side of `edgecl compare`: compare.md (tables) and the PNG charts (`edgecl.compare.plots`), drawn from the
report dict alone so they can be regenerated from a saved compare.json (`write_report(json.load(...), dir)`)."""
from __future__ import annotations

import os
from typing import Any

from edgecl.compare.plots import KIB, write_plots
from edgecl.io import write_atomic


def _pm(mean: float, std: float, scale: float = 100.0, signed: bool = False) -> str:
    return f"{scale * mean:{'+' if signed else ''}.1f} ± {scale * std:.1f}"


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(scale * value, fmt)


def _timing(runtime: dict[str, Any], key: str) -> str:
    if runtime.get(f"{key}_ms") is None:
        return "–"
    return f"{runtime[f'{key}_ms']:.3f} ({runtime.get(f'{key}_first_ms', float('nan')):.3f})"


def format_markdown(report: dict[str, Any]) -> str:
    """compare.md: setup, the main table, order robustness, skipped methods, notes and the plots."""
    methods = report["methods"]
    front = set(report.get("pareto_front", []))
    seeds = report["seeds"]
    lines = [f"# edgecl compare: {report['stream']} ({report['n_tasks']} tasks, {report['arch']})", "",
             f"Seeds {', '.join(map(str, seeds))}; epochs scale {report['epochs_scale']}; "
             f"wall time {report.get('wall_seconds', 0.0) / 60:.1f} min. "
             f"Machine: {report['machine']['cpu']}, {report['machine']['cpus_usable']} CPUs usable.", "",
             "ACC/BWT/forgetting in percent (points), mean ± sample std over seeds. Bytes: the artifact file; per "
             "added task = a later task's own stored bytes (masks, factors, head) + the shared part's growth per "
             "task when it grows (a shared part that compresses better later counts zero). Switch / infer: median ms "
             "through `TaskRuntime` (batch 1; cold = first round, nothing cached), runtime ACC = seed 0's test "
             "accuracy computed in the runtime. ★ = on the accuracy-vs-bytes Pareto front.", "",
             "| method | ACC % | BWT | forgetting | artifact KiB | KiB / added task | switch ms (cold) | "
             "infer ms (cold) | runtime ACC % | train s | Pareto |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in methods.items():
        rt = e.get("runtime", {})
        lines.append(
            f"| {name} | {_pm(e['acc_mean'], e['acc_std'])} | {_pm(e['bwt_mean'], e['bwt_std'], signed=True)} | "
            f"{_pm(e['forgetting_mean'], e['forgetting_std'])} | {_num(e['artifact_bytes'], '.1f', 1 / KIB)} | "
            f"{_num(e['bytes_per_added_task'], '.1f', 1 / KIB)} | {_timing(rt, 'switch')} | {_timing(rt, 'infer')} | "
            f"{_num(rt.get('runtime_acc'), '.1f', 100)} | "
            f"{e['train_seconds_mean']:.1f} | {'★' if name in front else ''} |")
    robust = {n: e["order_robustness"] for n, e in methods.items() if "order_robustness" in e}
    if robust:
        lines += ["", f"## Task-order robustness ({report['orders']} orders, seed {seeds[0]})", "",
                  "OPD_t = max − min over orders of the final accuracy on task t; MOPD = max over tasks, AOPD = mean "
                  "(HALRP paper Eq. 14). Points; lower is more robust.", "",
                  "| method | ACC % over orders | MOPD | AOPD |", "|---|---|---|---|"]
        for name, r in robust.items():
            mean = sum(r["acc_per_order"]) / len(r["acc_per_order"])
            lines.append(f"| {name} | {100 * mean:.1f} | {100 * r['mopd']:.2f} | {100 * r['aopd']:.2f} |")
    extra = [f"- skipped {n}: {why}" for n, why in report.get("skipped", {}).items()]
    extra += [f"- {n}: runtime: {e['runtime']['note']}" for n, e in methods.items() if "note" in e.get("runtime", {})]
    strategies = {n: e["runtime"]["strategy"] for n, e in methods.items() if e.get("runtime", {}).get("strategy")}
    if strategies:
        extra.append("- runtime strategy chosen: " + ", ".join(f"{n} {s}" for n, s in strategies.items()))
    if extra:
        lines += ["", "## Notes", ""] + extra
    plots = report.get("plots", {})
    if plots:
        lines += ["", "## Plots", ""] + [f"![{key}]({path})" for key, path in plots.items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str) -> None:
    """Draw the plots (their file names land in report['plots']) and write compare.md."""
    report["plots"] = write_plots(report, out_dir)
    write_atomic(os.path.join(out_dir, "compare.md"), format_markdown(report).encode())
