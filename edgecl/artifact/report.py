"""`inspect`: where an artifact's bytes go — bytes, parameters and bits per parameter per component and per task,
and how close the mask side (owner maps, sharing masks) comes to its order-0 entropy.

Reads the file only through the reader's public, read-only accessors (`verify`, `blobs`, `blob_range`,
`header_bytes`, `read_blob`), like any other tool would.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from edgecl.arch.spec import dense_params
from edgecl.artifact import node_masks
from edgecl.artifact.manifest import blob_key
from edgecl.artifact.reader import Artifact, load

COMPONENTS = ("base weights", "owner maps", "sharing masks", "node masks", "low-rank factors", "heads",
              "per-task tensors", "manifest")
MASK_COMPONENTS = ("owner maps", "sharing masks")

INITIAL_WEIGHTS = "initial_weights"  # extra's record of the weights training started from (docs/ARTIFACT.md)


def initial_weights(extra: dict[str, Any]) -> dict[str, str] | None:
    """The record of the weights a model was trained from: None when it was trained from a fresh draw; ValueError
    when the record is there but not ``{"sha256": str, "source": str, …}`` (extra is method metadata, which the
    format does not check)."""
    record = extra.get(INITIAL_WEIGHTS)
    if record is None:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str) or \
            not isinstance(record.get("source"), str):
        raise ValueError(f"extra[{INITIAL_WEIGHTS!r}] is not a record of starting weights")
    return {"sha256": record["sha256"], "source": record["source"]}


def _shown_record(extra: dict[str, Any]) -> dict[str, str] | None:
    try:
        return initial_weights(extra)
    except ValueError:
        return None  # a report shows what it can read


def component_of(scope: str | int, name: str, params: dict[str, dict[str, Any]]) -> str:
    """Which component of `COMPONENTS` a blob counts towards."""
    if scope == "base":
        return "owner maps" if name.endswith(":owner") else "base weights"
    if name.endswith(":share"):
        return "sharing masks"
    if name == node_masks.PACKED or node_masks.is_mask(name):  # one blob per task (format 3) or per group (1-2)
        return "node masks"
    stem, _, factor = name.rpartition(":")
    if factor in ("r", "s", "u", "v") and params.get(stem, {}).get("kind") == "lowrank":
        return "low-rank factors"
    return "heads" if name.startswith("head.") else "per-task tensors"


def _entropy_bits(arr: np.ndarray) -> float:
    """Order-0 (memoryless) entropy of an array's symbols, in bits for the whole array."""
    if arr.size == 0:
        return 0.0
    _, counts = np.unique(arr, return_counts=True)
    p = counts / arr.size
    return float(-(counts * np.log2(p)).sum())


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """Bytes, parameters and bits per parameter per component and per task, plus order-0 entropy of the masks.
    Verifies the whole file first (`Artifact.verify`: every blob's checksum and values, the model's consistency), so
    a damaged artifact is an ArtifactError here as everywhere, never a report."""
    with load(path) as art:
        art.verify()
        rows = _blob_rows(art)
        header_bytes = art.header_bytes
        dense = dense_params(art.arch, art.tasks[0].n_classes if art.tasks else 1)
        lps_weights = sum(math.prod(art.blobs[blob_key("base", n)]["shape"]) for n, s in art.params.items()
                          if s["kind"] == "lps")
        n_tasks, file_bytes, names = art.n_tasks, art.size, [info.name for info in art.tasks]
        meta = {"method": art.method, "arch": art.arch.get("name"), "format_version": art.manifest["format_version"],
                "edgecl_version": art.manifest["edgecl_version"], "fp16": art.fp16,
                "initial_weights": _shown_record(art.extra)}
    comps = _components(rows, header_bytes)
    tasks = _tasks(rows, names, lps_weights)
    mask_rows = [r for r in rows if r["component"] in MASK_COMPONENTS]
    masks = None
    if mask_rows:
        stored = sum(r["bytes"] for r in mask_rows)
        entropy = sum(r["entropy_bits"] for r in mask_rows) / 8
        masks = {"stored_bytes": stored, "entropy_bytes": entropy,
                 "stored_over_entropy": stored / entropy if entropy else None,
                 "bits_per_weight_per_task": 8 * stored / (lps_weights * n_tasks) if lps_weights and n_tasks else None}
    return {"path": os.fspath(path), **meta, "n_tasks": n_tasks, "file_bytes": file_bytes,
            "dense_params": dense, "dense_fp32_bytes": 4 * dense,
            "ratio_to_dense": file_bytes / (4 * dense) if dense else None,
            "separate_models_bytes": 4 * dense * n_tasks, "components": comps, "tasks": tasks, "masks": masks,
            "blobs": rows}


def _blob_rows(art: Artifact) -> list[dict[str, Any]]:
    """One row per blob: its component, task, encoding, stored bytes and parameters (masks: their entropy too)."""
    rows = []
    for key, e in art.blobs.items():
        start, stop = art.blob_range(key)
        comp = component_of(e["scope"], e["name"], art.params)
        row = {"key": key, "component": comp, "task": None if e["scope"] == "base" else e["scope"],
               "dtype": e["dtype"], "shape": e["shape"], "encoding": e["encoding"], "bytes": stop - start,
               "params": math.prod(e["shape"])}
        if comp in MASK_COMPONENTS + ("node masks",):
            row["entropy_bits"] = _entropy_bits(art.read_blob(key))
        rows.append(row)
    return rows


def _components(rows: list[dict[str, Any]], header_bytes: int) -> list[dict[str, Any]]:
    comps = []
    for comp in COMPONENTS:
        sel = [r for r in rows if r["component"] == comp]
        nbytes = header_bytes if comp == "manifest" else sum(r["bytes"] for r in sel)
        params = sum(r["params"] for r in sel)
        if not nbytes:
            continue
        c = {"component": comp, "bytes": nbytes, "params": params,
             "bits_per_param": 8 * nbytes / params if params else None}
        if sel and all("entropy_bits" in r for r in sel):
            c["entropy_bytes"] = sum(r["entropy_bits"] for r in sel) / 8
            c["stored_over_entropy"] = nbytes / c["entropy_bytes"] if c["entropy_bytes"] else None
        comps.append(c)
    return comps


def _tasks(rows: list[dict[str, Any]], names: list[str], lps_weights: int) -> list[dict[str, Any]]:
    owner_bytes = sum(r["bytes"] for r in rows if r["component"] == "owner maps")
    tasks = []
    for t, name in enumerate(names):
        sel = [r for r in rows if r["task"] == t]
        nbytes, params = sum(r["bytes"] for r in sel), sum(r["params"] for r in sel)
        share = sum(r["bytes"] for r in sel if r["component"] == "sharing masks")
        row = {"task": t, "name": name, "bytes": nbytes, "params": params,
               "bits_per_param": 8 * nbytes / params if params else None}
        if lps_weights:
            row["mask_bits_per_weight"] = 8 * (share + owner_bytes / len(names)) / lps_weights
        tasks.append(row)
    return tasks
