"""The channel map's time on specs built to cut one channel group at many points (a residual add of two
concatenations whose bounds interleave) and on an attention of many heads, each against the same spec at a quarter
of its size in the same process: linear work gives ratios near 4, work that re-resolves the axis per cut near 16.
Result: tools/results/bench_channel_map.json

    PYTHONPATH=. python tools/bench_channel_map.py
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgecl.arch import channel_map, validate  # noqa: E402
from edgecl.arch.channel_groups import MAX_AXIS_SEGMENTS  # noqa: E402

HEAD = [{"name": "g", "op": "gap", "inputs": ["last"]}, {"name": "f", "op": "flatten", "inputs": ["g"]}]


def merge_spec(depth: int) -> dict:
    """add(cat of 2^depth copies of a 2-channel group, cat(1 channel, copies of it, 1 channel)): every bound of one
    side falls inside a group of the other."""
    nodes = [{"name": n, "op": "conv", "inputs": ["input"], "in": 1, "out": w, "k": 1} for n, w in
             (("a", 2), ("b", 1), ("c", 1))]
    parts = ["b"]
    for d in range(depth, -1, -1):  # cat(b, 2^(depth-1) copies, …, 1 copy, c): 2^(depth+1) channels
        last = "a"
        for i in range(d):
            nodes.append({"name": f"o{d}_{i}", "op": "cat", "inputs": [last, last]})
            last = f"o{d}_{i}"
        parts.append(last)
    nodes.append({"name": "other", "op": "cat", "inputs": parts[:1] + parts[2:] + ["c"]})
    nodes.append({"name": "last", "op": "add", "inputs": [parts[1], "other"]})
    return validate({"name": "many", "input_shape": [1, 1, 1], "output": "f", "nodes": [*nodes, *HEAD]})


def heads_spec(heads: int, kv_heads: int) -> dict:
    """One attention of `heads` query heads over `kv_heads` key/value heads, one channel each."""
    nodes = [{"name": n, "op": "conv", "inputs": ["input"], "in": 1, "out": heads if n == "q" else kv_heads, "k": 1}
             for n in "qkv"]
    nodes.append({"name": "last", "op": "attention", "inputs": ["q", "k", "v"], "heads": heads, "kv_heads": kv_heads,
                  "scale": 1.0})
    return validate({"name": "heads", "input_shape": [1, 4, 1], "output": "f", "nodes": [*nodes, *HEAD]})


def seconds(spec: dict, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        channel_map(spec)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    depth = MAX_AXIS_SEGMENTS.bit_length() - 2
    cases = {"merge": (merge_spec(depth - 2), merge_spec(depth)),
             "heads": (heads_spec(4096, 1), heads_spec(16384, 1))}
    out = {"what": __doc__.splitlines()[0], "machine": platform.platform(), "cases": {}}
    for name, (quarter, full) in cases.items():
        small, big = seconds(quarter), seconds(full)
        out["cases"][name] = {"quarter_s": round(small, 4), "full_s": round(big, 4), "ratio": round(big / small, 2)}
        print(name, out["cases"][name], flush=True)
    path = ROOT / "tools" / "results" / "bench_channel_map.json"
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
