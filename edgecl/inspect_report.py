"""The human side of `edgecl.artifact.inspect`: its report as plain-text tables (per component, per task, masks
against their entropy, optionally every stored tensor). Torch-free; used by `edgecl inspect` and the demo."""
from __future__ import annotations

from typing import Any


def _bpp(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]])


def format_report(info: dict[str, Any], blobs: bool = False) -> str:
    """Human-readable tables of an `edgecl.artifact.inspect` report."""
    lines = [f"{info['path']}: {info['method']} on {info['arch']}, {info['n_tasks']} tasks, format "
             f"v{info['format_version']} (edgecl {info['edgecl_version']}){', fp16 base' if info['fp16'] else ''}",
             f"{info['file_bytes']} bytes = {_bpp(info['ratio_to_dense'])} x one dense fp32 model "
             f"({info['dense_params']} params, {info['dense_fp32_bytes']} bytes); {info['n_tasks']} separate models: "
             f"{info['separate_models_bytes']} bytes"]
    start = info.get("initial_weights")
    if start:
        lines.append(f"trained from starting weights {start['source']} (sha256 {start['sha256'][:16]}…)")
    lines.append("")
    rows = [[c["component"], c["bytes"], c["params"], _bpp(c["bits_per_param"]),
             _bpp(c.get("entropy_bytes")), _bpp(c.get("stored_over_entropy"))] for c in info["components"]]
    lines += [_table(["component", "bytes", "params", "bits/param", "entropy B", "stored/entropy"], rows), ""]
    masks = info.get("masks")
    task_header = ["task", "name", "bytes", "params", "bits/param"] + (["mask bits/weight"] if masks else [])
    rows = [[t["task"], t["name"], t["bytes"], t["params"], _bpp(t["bits_per_param"])]
            + ([_bpp(t.get("mask_bits_per_weight"))] if masks else []) for t in info["tasks"]]
    lines.append(_table(task_header, rows))
    if masks:
        lines += ["", f"mask side (owner maps + sharing masks): {masks['stored_bytes']} bytes stored, order-0 entropy "
                      f"{masks['entropy_bytes']:.0f} bytes (stored/entropy {_bpp(masks['stored_over_entropy'])}); "
                      f"{_bpp(masks['bits_per_weight_per_task'])} bits per weight per task (Piggyback: 1.0)"]
    if blobs:
        rows = [[b["key"], b["dtype"], "x".join(map(str, b["shape"])) or "scalar", "+".join(b["encoding"]) or "raw",
                 b["bytes"]] for b in info["blobs"]]
        lines += ["", _table(["tensor", "dtype", "shape", "encoding", "bytes"], rows)]
    return "\n".join(lines)
