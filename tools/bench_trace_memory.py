"""Peak memory and time of `from_torch` on models whose Python control flow reads shapes, by what the shape-flow
tracer keeps of its example values between decisions (`edgecl/arch/fx_shape_values.py`):

  * ``needed`` — edgecl's rule: a tensor is kept while a proxy of the model's code or a node not yet run can read it;
  * ``all`` — every value kept until the trace ends (edgecl before the rule);
  * ``none`` — the floor the ratios are against: every tensor released once the nodes traced so far that read it
    have run, even one the model's code still holds (a value read again later is recomputed from its inputs).

Each (model, policy, repeat) runs in a fresh process (a peak RSS is per process): the model is built, the process's
RSS high-water mark is reset (``/proc/self/clear_refs``; where that is refused the peak since start is reported, so the
figures are upper bounds) and the increase of the peak over the RSS before `from_torch` is the figure; the medians of
`--repeats` runs are reported, with the ratio of each policy's peak increase to ``none``'s, the real tensor bytes
the values held at most (counted once per policy), the nodes run per trace (``needed`` reruns a node only where a value
was released and read again) and a hash of the spec (the same for every policy, or the script fails). Time is
compared in one process: `--rounds` rounds of every policy after a warm-up, their order rotated, the fastest round's
and the median's ratio to ``all`` (each fresh process's own time is kept in the JSON as context only: on a shared
machine it spreads by ×4). Result: tools/results/bench_trace_memory.json

    PYTHONPATH=. python tools/bench_trace_memory.py [--models swin_tiny_224,...] [--repeats 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name → (library, model, build arguments, input side)
MODELS = {"swin_tiny_224": ("timm", "swin_tiny_patch4_window7_224", {}, 224),
          "vit_b_16_224": ("torchvision", "vit_b_16", {}, 224),
          "ghostnetv2_100_256": ("timm", "ghostnetv2_100", {}, 256),
          "shufflenet_v2_x0_5_224": ("torchvision", "shufflenet_v2_x0_5", {}, 224)}
POLICIES = ("none", "needed", "all")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _module(name: str):
    from edgecl.arch.factories import ensure_torchvision_imports
    ensure_torchvision_imports()
    import torch
    library, model, kwargs, side = MODELS[name]
    torch.manual_seed(0)
    if library == "timm":
        import timm
        return timm.create_model(model, pretrained=False, **kwargs).eval(), side
    import torchvision
    return getattr(torchvision.models, model)(**kwargs).eval(), side


def _tracer(policy: str, runs: list[int], held: list[int], retained: bool = False) -> type:
    """edgecl's tracer with `policy`'s release, counting the nodes run (and with `retained` the bytes held)."""
    import torch
    from edgecl.arch import fx_import
    from edgecl.arch.fx_shape_values import ExampleValues

    class Tracer(fx_import._Tracer):
        def _release(self, values: ExampleValues, nodes=None) -> None:
            if policy != "all":
                values.release(nodes, keep_reachable=policy == "needed")

        def _run(self, runner, node, batch):
            runs[0] += 1
            return super()._run(runner, node, batch)

        def _evaluate(self, node, batch, where):
            value = super()._evaluate(node, batch, where)
            if retained:
                storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                            for values in self._values.values() for v in values.env.values()
                            for t in (v if type(v) in (tuple, list) else (v,))
                            if isinstance(t, torch.Tensor) and not t.is_meta}
                held[0] = max(held[0], sum(storages.values()))
            return value

    return Tracer


def timed(name: str, rounds: int, policies: list[str]) -> dict:
    """Seconds of `from_torch` per policy in this one process, the policies alternated (their order rotated) for
    `rounds` rounds after one warm-up round."""
    from edgecl.arch import fx_import
    module, side = _module(name)
    seconds: dict[str, list[float]] = {p: [] for p in policies}
    for i in range(rounds + 1):
        for policy in policies[i % len(policies):] + policies[:i % len(policies)]:
            fx_import._Tracer = _tracer(policy, [0], [0])
            start = time.perf_counter()
            fx_import.from_torch(module, (3, side, side))
            if i:
                seconds[policy].append(time.perf_counter() - start)
    return seconds


def child(name: str, policy: str, retained: bool = False) -> dict:
    """One trace of `name` under `policy` in this (fresh) process; with `retained`, instead of the peak RSS and
    time, the largest number of bytes of real tensor storage the example values held after any decision (a
    deterministic figure: no allocator or other process in it, but counted in Python after every evaluation)."""
    from edgecl.arch import fx_import
    module, side = _module(name)
    runs, held = [0], [0]
    Tracer = _tracer(policy, runs, held, retained)
    fx_import._Tracer = Tracer
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    spec = fx_import.from_torch(module, (3, side, side))
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=repr).encode()).hexdigest()
    if retained:
        return {"retained_peak_mb": held[0] / 2 ** 20, "nodes_run": runs[0], "spec_sha256": digest}
    return {"peak_increase_mb": (peak - before) / 1024, "rss_before_mb": before / 1024, "hwm_reset": reset,
            "seconds": seconds, "nodes_run": runs[0], "spec_sha256": digest}


def _run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of the in-process time comparison")
    parser.add_argument("--out", default=str(ROOT / "tools/results/bench_trace_memory.json"))
    parser.add_argument("--child", nargs="+", metavar="MODEL POLICY [retained]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "time":
            print(json.dumps(timed(args.child[1], int(args.child[2]), args.child[3].split(","))))
        else:
            print(json.dumps(child(args.child[0], args.child[1], args.child[2:] == ["retained"])))
        return
    import torch
    results: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                 "processor": platform.processor() or platform.machine()}, "models": {}}
    for name in args.models.split(","):
        runs: dict[str, list[dict]] = {}
        counted = {policy: _run_child(name, policy, "retained") for policy in args.policies.split(",")}
        for _ in range(args.repeats):  # interleaved, so that a noisy stretch hits every policy alike
            for policy in args.policies.split(","):
                runs.setdefault(policy, []).append(_run_child(name, policy))
        policies = args.policies.split(",")
        seconds = _run_child("time", name, str(args.rounds), ",".join(policies))
        digests = {r["spec_sha256"] for rs in [*runs.values(), list(counted.values())] for r in rs}
        if len(digests) != 1:
            raise SystemExit(f"{name}: the policies import different specs: {digests}")
        table = {p: {"peak_increase_mb": statistics.median(r["peak_increase_mb"] for r in rs),
                     "seconds": statistics.median(r["seconds"] for r in rs), "nodes_run": rs[0]["nodes_run"],
                     "retained_peak_mb": counted[p]["retained_peak_mb"], "in_process_seconds": seconds[p],
                     "hwm_reset": all(r["hwm_reset"] for r in rs), "runs": rs} for p, rs in runs.items()}
        floor, before = table.get("none"), table.get("all")
        for row in table.values():
            if before:  # time against edgecl before, in the same process: the fastest round, and the median
                row["min_seconds_vs_all"] = min(row["in_process_seconds"]) / min(before["in_process_seconds"])
                row["median_seconds_vs_all"] = statistics.median(row["in_process_seconds"]) / statistics.median(
                    before["in_process_seconds"])
            if floor:
                row["peak_vs_none"] = row["peak_increase_mb"] / max(floor["peak_increase_mb"], 1e-9)
        results["models"][name] = {"spec_sha256": digests.pop(), "policies": table}
        print(f"{name}:")
        for policy, row in table.items():
            print(f"  {policy:7s} peak +{row['peak_increase_mb']:8.1f} MB  retained {row['retained_peak_mb']:7.1f} MB  "
                  f"{row['nodes_run']:5d} nodes run  " +
                  (f"peak ×{row['peak_vs_none']:.2f} vs none  " if floor else "") +
                  (f"in one process: min {min(row['in_process_seconds']):.2f} s, ×{row['min_seconds_vs_all']:.2f} "
                   f"(median ×{row['median_seconds_vs_all']:.2f}) vs all" if before else ""),
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
