"""Task switching on CPU, as ratios measured in one run (these machines are noisy; absolute times are not the claim).

    python tools/bench_switch.py [--width 8] [--tasks 5] [--threads 1] [--repeats 48] [--out bench_switch.json]
    python tools/bench_switch.py --artifact runs/cmp/artifacts/halrp-seed0.edgecl --out halrp_switch.json
    python tools/bench_switch.py --arch torchvision.models:resnet18 --input-shape 3,32,32 --tasks 3 --repeats 16 \
        --shapes lps,node,lowrank,permute --out tools/results/bench_switch_resnet18.json

For an MLP of ≥ 4 M parameters (`preset('mlp', width=8)`), or any `--arch` (`edgecl.arch.factories.resolve_arch`:
torchvision's resnet18 at 3×32×32 has 11.2 M parameters, 20 convolutions, residual adds and BatchNorm), shaped
like an LPS model (element-wise masks), a finetune model (shared trunk, per-task heads), an AGS-CL model (node
masks), a HALRP model (r, s, low-rank U, V per layer) and an RGO model (feature permutations), built in numpy with
random weights so no training is needed:
- switch (cache miss: materialise into the bound buffers) against the physical floor, one copy of every dense
  weight of a task by `--threads` threads, as many as the switch may use (goal ≤ 2.0×), and against creating a new
  ONNX Runtime session for that task (goal ≥ 20× faster);
- the same miss from the saved artifact, as deployed (`TaskRuntime(path)`: where a miss writes weights, the task's
  heads are read from the file into the slot too, `task_tensors="auto"`);
- switch on a cache hit (the task is still in an LRU slot: no copy);
- for node / low-rank / permutation models, both ways of serving them (`TaskRuntime(factor=...)`): the delta applied
  to activations around a constant, pre-packed base weight (default), and folded into switched weights ("fold");
- inference right after a switch against plain dense ONNX Runtime sessions with folded initializers (one per task,
  the status quo of N separate models) called in the same task order, batch 1 and 64 (goal ≤ 1.05×), for the
  in-place strategy and for per-task sessions; and the warm, same-task latency against one dense session (where the
  gap is ONNX Runtime pre-packing constant weights, which graph inputs cannot get).
Medians (or minima, `--stat min`) of `--repeats` runs, the variants timed in turns of 8 calls (see `interleaved`);
prints a table and writes JSON with the machine and versions.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

from edgecl.arch import preset
from edgecl import artifact
from edgecl.deltas import materialize
from edgecl.graph.builder import build_onnx
from edgecl.machine import machine_info
from edgecl.runtime import TaskRuntime
from edgecl.runtime import maskfill
from edgecl.runtime import plan
from edgecl.runtime.plan import factor_forms
from edgecl.synthetic import random_packed


ARGS = argparse.Namespace(stat="median")


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


STAT = {"median": statistics.median, "min": min}


def interleaved(variants: dict, n_tasks: int, repeats: int, warm: bool, block: int = 8) -> dict[str, float]:
    """Latency per variant (median, or min with `--stat min`), the variants taking turns in blocks of `block` calls.

    Turns make load changes on a shared machine hit every variant alike; blocks keep each variant's cache state its
    own (a device runs one of them, not all five: interleaving single calls would make each one pay for evicting
    the others' weights from the last-level cache). The first call of each block is not counted.
    warm=False: each timed call is task t right after switching to it, cycling through the tasks (the weights it
    reads are not the ones its previous call read, as on a device serving mixed requests). warm=True: the same task
    again, right after one untimed call."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    calls = 0
    while calls < repeats:
        for name, (switch, run) in variants.items():
            for j in range(block + 1):
                t = 1 if warm else (calls + j) % n_tasks
                switch(t)
                if warm:
                    run(t)
                start = time.perf_counter()
                run(t)
                if j:
                    times[name].append(time.perf_counter() - start)
        calls += block
    return {name: 1e3 * STAT[ARGS.stat](v) for name, v in times.items()}


def copy_all(src: dict, dst: dict, pool, workers: int) -> None:
    """The floor: one copy of every dense weight, by as many threads as the runtime's switch may use."""
    for k, v in src.items():
        a, b = v.reshape(-1), dst[k].reshape(-1)
        if pool is None or a.size < 1 << 19:
            np.copyto(b, a)
            continue
        step = -(-a.size // workers)
        list(pool.map(lambda lo: np.copyto(b[lo:lo + step], a[lo:lo + step]), range(0, a.size, step)))


def lines_changed(packed, max_tasks: int = 5) -> float:
    """Mean fraction of the 64-byte lines of the trunk's dense weights that differ between two tasks (pairs among the
    first `max_tasks`): the least a switch that keeps weights dense must write. For trained LPS masks it is near 1,
    which is why an LPS miss rewrites everything rather than only what changed."""
    weights = [materialize(packed, t) for t in range(min(packed.n_tasks, max_tasks))]
    fractions = []
    for a, b in itertools.combinations(weights, 2):
        trunk = [k for k in a if packed.params[k]["kind"] != "task" and a[k].ndim > 1]  # heads are per task anyway
        diff = np.concatenate([(a[k].view(np.uint32) != b[k].view(np.uint32)).reshape(-1) for k in trunk])
        diff = np.concatenate([diff, np.zeros(-diff.size % 16, bool)])
        fractions.append(float(diff.reshape(-1, 16).any(axis=1).mean()))
    return float(np.mean(fractions)) if fractions else 0.0


def bench_arch(args: argparse.Namespace) -> dict:
    """The benchmarked spec: the wide MLP preset, or `--arch` resolved like the CLI's (imports torch for a module)."""
    if args.arch == "mlp":
        return preset("mlp", width=args.width)
    from edgecl.arch.factories import resolve_arch

    shape = tuple(int(d) for d in args.input_shape.split(",")) if args.input_shape else (1, 8, 8)
    return resolve_arch(args.arch, shape)


def bench_shape(shape: str, arch: dict, args: argparse.Namespace) -> dict:
    return bench_packed(shape, random_packed(arch, n_tasks=args.tasks, shape=shape, classes=(10, 7), bn=args.bn), args)


def bench_packed(shape: str, packed, args: argparse.Namespace) -> dict:
    """Every measurement for one model (`shape` labels it)."""
    arch = packed.arch
    n_params = sum(a.size for a in materialize(packed, 0).values())
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    cpu = ["CPUExecutionProvider"]
    dense_weights = materialize(packed, 1)
    floor_bufs = {k: np.empty_like(v) for k, v in dense_weights.items()}
    pool = ThreadPoolExecutor(args.threads) if args.threads > 1 else None
    task_bytes = [build_onnx(arch, materialize(packed, t)).SerializeToString() for t in range(packed.n_tasks)]
    onnx_file = os.path.join(args.tmp, f"task1_{shape}.onnx")
    with open(onnx_file, "wb") as f:
        f.write(task_bytes[1])
    miss_rt = TaskRuntime(packed, strategy="inplace", cache_tasks=1, threads=args.threads)
    model_file = os.path.join(args.tmp, f"bench_{shape}.edgecl")
    artifact.save(packed, model_file)  # as deployed: from a file, heads read on a miss where a miss writes weights
    file_rt = TaskRuntime(model_file, strategy="inplace", cache_tasks=1, threads=args.threads)
    fold_rt = TaskRuntime(packed, strategy="inplace", cache_tasks=1, threads=args.threads, factor=False)
    # the same, switched convolutions left plain graph inputs (before `edgecl.runtime.blocked_convs`)
    plain_rt = TaskRuntime(packed, strategy="inplace", cache_tasks=1, threads=args.threads, blocked_convs=False)
    hit_rt = TaskRuntime(packed, strategy="inplace", cache_tasks=packed.n_tasks, threads=args.threads)
    for t in range(packed.n_tasks):
        hit_rt.switch(t)
    order = iter(np.tile(np.arange(packed.n_tasks), 10 * args.repeats))
    switch_times = interleaved({
        "floor": (lambda t: None, lambda t: copy_all(dense_weights, floor_bufs, pool, args.threads)),
        "miss": (lambda t: None, lambda t: miss_rt.switch(int(next(order)))),
        "file_miss": (lambda t: None, lambda t: file_rt.switch(int(next(order)))),
        "hit": (lambda t: None, lambda t: hit_rt.switch(int(next(order)))),
        "fold": (lambda t: None, lambda t: fold_rt.switch(int(next(order)))),
        "unblocked": (lambda t: None, lambda t: plain_rt.switch(int(next(order)))),
    }, packed.n_tasks, args.repeats, warm=False)
    floor, miss, hit = switch_times["floor"], switch_times["miss"], switch_times["hit"]
    session_times = interleaved({
        "bytes": (lambda t: None, lambda t: ort.InferenceSession(task_bytes[1], options, providers=cpu)),
        "file": (lambda t: None, lambda t: ort.InferenceSession(onnx_file, options, providers=cpu)),
    }, packed.n_tasks, max(5, args.repeats // 3), warm=False)
    new_session, new_session_file = session_times["bytes"], session_times["file"]
    sessions_rt = TaskRuntime(packed, strategy="sessions", threads=args.threads)
    session_switch = median_ms(lambda: sessions_rt.switch(int(next(order))), args.repeats)

    infer = {}
    rng = np.random.default_rng(0)
    dense_sessions = [ort.InferenceSession(b, options, providers=cpu) for b in task_bytes]
    for batch in (1, 64):
        x = rng.standard_normal((batch, *arch["input_shape"])).astype(np.float32)
        variants = {"dense": (lambda t: None, lambda t: dense_sessions[t].run(None, {"x": x})),
                    "inplace": (miss_rt.switch, lambda t: miss_rt.infer(x)),
                    "fold": (fold_rt.switch, lambda t: fold_rt.infer(x)),
                    "unblocked": (plain_rt.switch, lambda t: plain_rt.infer(x)),
                    "sessions": (sessions_rt.switch, lambda t: sessions_rt.infer(x))}
        row = {}
        for name, ms in interleaved(variants, packed.n_tasks, args.repeats, warm=False).items():
            row[f"{name}_after_switch_ms"] = ms
        for name, ms in interleaved(variants, packed.n_tasks, args.repeats, warm=True).items():
            row[f"{name}_warm_ms"] = ms
        for name in ("inplace", "fold", "sessions", "unblocked"):
            row[f"{name}_ratio"] = row[f"{name}_after_switch_ms"] / row["dense_after_switch_ms"]
            row[f"{name}_warm_ratio"] = row[f"{name}_warm_ms"] / row["dense_warm_ms"]
        infer[batch] = row
    return {"shape": shape, "arch": arch.get("name", "custom"), "params": int(n_params),
            "dense_mib": 4 * n_params / 2**20, "floor_ms": floor,
            "switch_miss_ms": miss, "switch_hit_ms": hit, "sessions_switch_ms": session_switch,
            "blocked_convs": len(miss_rt._strategy.blocked_convs),
            "unblocked_switch_miss_ms": switch_times["unblocked"],
            "unblocked_miss_over_floor": switch_times["unblocked"] / floor,
            "factored_layers": factor_forms(packed),
            "switched_mib": 4 * sum(int(np.prod(p.shape)) for p in miss_rt.varying) / 2**20,
            "fold_switch_miss_ms": switch_times["fold"], "fold_miss_over_floor": switch_times["fold"] / floor,
            "file_switch_miss_ms": switch_times["file_miss"], "file_miss_over_floor": switch_times["file_miss"] / floor,
            "file_heads_read_on_miss": any(p.plan == "read" for p in file_rt.plans),
            "new_session_ms": new_session, "new_session_from_file_ms": new_session_file,
            "new_session_file_over_miss": new_session_file / max(miss, 1e-9), "miss_over_floor": miss / floor,
            "new_session_over_miss": new_session / max(miss, 1e-9),
            # the most any switch that writes every weight once could reach against a new session
            "trunk_lines_changed": lines_changed(packed),
            "new_session_in_floors": new_session / floor, "new_session_file_in_floors": new_session_file / floor,
            "infer": infer}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=8, help="width of the MLP preset (--arch mlp)")
    p.add_argument("--arch", default="mlp", help="mlp (the wide preset), or a spec as `edgecl train --arch` takes it, "
                   "e.g. torchvision.models:resnet18")
    p.add_argument("--input-shape", default=None, help="C,H,W for --arch (default 1,8,8)")
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="ONNX Runtime intra-op threads, same for every session, and the threads of a switch")
    p.add_argument("--repeats", type=int, default=48)
    p.add_argument("--bn", choices=("shared", "task"), default="shared",
                   help="BatchNorm tensors shared, or per task (LPS's default batchnorm='task')")
    p.add_argument("--shapes", default="lps,finetune,node,lowrank,permute")
    p.add_argument("--artifact", nargs="+", default=None,
                   help="benchmark these trained artifacts (at least 2 tasks) instead of the synthetic shapes")
    p.add_argument("--conv-factor-min-channels", type=int, default=None,
                   help="override edgecl.runtime.plan.CONV_FACTOR_MIN_CHANNELS (a huge value: convolutions factored "
                   "by size alone, the rule before it)")
    p.add_argument("--out", default="bench_switch.json")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the per-task .onnx baseline file is written")
    p.add_argument("--stat", choices=sorted(STAT), default="median",
                   help="statistic of the repeats; 'min' resists other load on a shared machine")
    args = p.parse_args()
    ARGS.stat = args.stat
    if args.conv_factor_min_channels is not None:
        plan.CONV_FACTOR_MIN_CHANNELS = args.conv_factor_min_channels
    if args.artifact:
        rows = [bench_packed(os.path.basename(path), artifact.load(path).to_packed(), args) for path in args.artifact]
    else:
        arch = bench_arch(args)
        rows = [bench_shape(shape, arch, args) for shape in args.shapes.split(",")]
    print(f"{'shape':9} {'params':>9} {'switched':>8} {'floor':>7} {'miss':>7} {'hit':>7} {'fold':>7} {'new sess':>8} "
          f"{'miss/floor':>10} {'sess/miss':>9} | {'b1 inpl':>7} {'b1 fold':>7} {'b1 sess':>7} {'b64 inpl':>8} "
          f"{'b64 fold':>8} {'b64 sess':>8} | warm: {'b1':>5} {'b64':>5}"
          "  (ms, MiB; inference as ratios vs dense sessions)")
    for r in rows:
        i1, i64 = r["infer"][1], r["infer"][64]
        print(f"{r['shape']:9} {r['params']:>9} {r['switched_mib']:8.2f} {r['floor_ms']:7.3f} "
              f"{r['switch_miss_ms']:7.3f} {r['switch_hit_ms']:7.4f} {r['fold_switch_miss_ms']:7.3f} "
              f"{r['new_session_ms']:8.2f} {r['miss_over_floor']:10.2f} {r['new_session_over_miss']:9.1f} | "
              f"{i1['inplace_ratio']:7.2f} {i1['fold_ratio']:7.2f} {i1['sessions_ratio']:7.2f} "
              f"{i64['inplace_ratio']:8.2f} {i64['fold_ratio']:8.2f} {i64['sessions_ratio']:8.2f} |       "
              f"{i1['inplace_warm_ratio']:5.2f} {i64['inplace_warm_ratio']:5.2f}")
    goals = {r["shape"]: {"switch ≤ 2.0× copy floor": r["miss_over_floor"] <= 2.0,
                          "switch ≥ 20× faster than a new session (bytes)": r["new_session_over_miss"] >= 20,
                          "switch ≥ 20× faster than a new session (.onnx file)":
                              r["new_session_file_over_miss"] >= 20,
                          "in-place inference after a switch ≤ 1.05× dense (b1, b64)":
                              max(r["infer"][b]["inplace_ratio"] for b in (1, 64)) <= 1.05,
                          "per-task sessions inference ≤ 1.05× dense (b1, b64)":
                              max(r["infer"][b]["sessions_ratio"] for b in (1, 64)) <= 1.05} for r in rows}
    for r in rows:
        i1, i64 = r["infer"][1], r["infer"][64]
        print(f"  {r['shape']:9} {r['blocked_convs']} convs blocked; unblocked (plain graph inputs): miss "
              f"{r['unblocked_miss_over_floor']:.2f}× floor, after a switch b1 {i1['unblocked_ratio']:.2f}× "
              f"b64 {i64['unblocked_ratio']:.2f}× dense")
        print(f"  {r['shape']:9} miss from the artifact file: {r['file_switch_miss_ms']:.3f} ms = "
              f"{r['file_miss_over_floor']:.2f}× the copy floor (heads read on a miss: {r['file_heads_read_on_miss']})")
    for shape, met in goals.items():
        print(f"  {shape:9} " + "; ".join(f"{'MET' if ok else 'UNMET'} {goal}" for goal, ok in met.items()))
    with open(args.out, "w") as f:
        json.dump({"machine": machine_info(), "maskfill": maskfill.IMPLEMENTATION,  # as chosen at the first fill
                   "maskfill_choice": maskfill.STATUS.get("chosen"), "args": vars(args), "rows": rows, "goals": goals},
                  f, indent=2)
    print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
