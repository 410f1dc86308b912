"""One rank of the distributed CI test (`tests/test_distributed.py` starts it with torchrun, 2 gloo processes).

For every method: train 2 tasks of a small stream with `train_and_write` (rank 0 writes the artifact), resume it
with a third task, then evaluate the method's own data statistic — AGS-CL's Ω, HALRP's gradient importances,
RGO's projection update, BatchNorm recalibration — on the weights rank 0 wrote, under 2 ranks. Every rank writes
what it holds to OUT/rank{R}.json: its own state digest after every task and the statistics, for the test to compare
across ranks and against one process computing the same thing.

usage: torchrun --standalone --nproc-per-node 2 tests/dist_worker.py OUT METHOD[,METHOD...]
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

from edgecl import artifact
from edgecl.deltas import materialize
from edgecl.errors import UsageError
from edgecl.train import distributed, registry
from edgecl.train.data import make_stream
from edgecl.train.models import from_numpy
from edgecl.train.pipeline import train_and_write

# A small convnet with BatchNorm after a conv and after a linear layer: sync BatchNorm, conv patches (RGO) and
# channel groups (AGS-CL) all take part, and an epoch on the digits takes a fraction of a second.
SPEC = {"name": "tinybn", "input_shape": [1, 8, 8], "layers": [
    {"op": "conv", "name": "conv1", "in": 1, "out": 4, "k": 3, "pad": 1}, {"op": "bn", "name": "bn1", "ch": 4},
    {"op": "relu"}, {"op": "maxpool", "k": 2}, {"op": "flatten"},
    {"op": "linear", "name": "fc1", "in": 64, "out": 24}, {"op": "bn", "name": "bn2", "ch": 24}, {"op": "relu"}]}
CONFIGS = {"lps": {"epochs": 1, "admm_epochs": 2, "final_epochs": 1}, "agscl": {"epochs": 2},
           "halrp": {"epochs": 2}, "rgo": {"epochs": 1, "batch_size": 20, "curvature_batch": 100},
           "finetune": {"epochs": 1}, "stl": {"epochs": 1}}
STREAM = "permuted-digits"
NO_RESUME = ("finetune", "stl")  # baselines: nothing to append to


def statistics(method_name: str, path: str) -> dict[str, list[float]]:
    """The method's data statistic computed under the current ranks from the model at `path` (identical inputs on
    every rank and in one process: only the statistic's synchronisation can make them differ)."""
    with artifact.load(path) as art:
        packed = art.to_packed()
    stream = make_stream(STREAM, packed.n_tasks)
    task = stream.tasks[1]
    out: dict[str, list[float]] = {}
    if method_name == "agscl":
        method = registry.create("agscl", packed.arch, packed.config)
        method.resume(packed)
        method.update_omega(task)
        out["omega"] = method.omega.tolist()
    elif method_name == "halrp":
        from edgecl.train.methods.halrp import gradient_importance

        weights = from_numpy(materialize(packed, 1))
        names = ["conv1.weight", "fc1.weight"]
        grads = gradient_importance(packed.arch, weights, names, task, 32, torch.Generator().manual_seed(5))
        out["importance"] = [grads[n] for n in names]
    elif method_name == "rgo":
        from edgecl.train.state import load_training_state

        method = registry.create("rgo", packed.arch, packed.config)
        method.resume(packed, load_training_state(path))
        method.trunk = {k: v.requires_grad_(True) for k, v in method.trunk.items()}  # as during learn_task
        own = from_numpy(packed.task_tensors[1])
        method.update_projections(task, own, method.permutations(1))
        out["projection"] = np.concatenate([p.p.reshape(-1).numpy() for p in method.proj.values()]).tolist()
    elif method_name == "finetune":
        from edgecl.train.batchnorm import recalibrate

        weights = from_numpy(materialize(packed, 0))
        recalibrate(packed.arch, weights, task)
        out["running_stats"] = np.concatenate([weights[k].reshape(-1).numpy() for k in sorted(weights)
                                               if "running" in k]).tolist()
    return out


def main(out_dir: str, methods: list[str]) -> None:
    spec_path = os.path.join(out_dir, "tinybn.json")
    with distributed.joined("cpu") as world:
        if world.is_main:
            with open(spec_path, "w") as f:
                json.dump(SPEC, f)
        distributed.barrier()
        mine: dict[str, object] = {}
        for name in methods:
            first = os.path.join(out_dir, name)
            data = train_and_write(name, STREAM, first, arch_name=spec_path, n_tasks=2, overrides=CONFIGS[name],
                                   threads=1, progress=False, log=lambda _: None)
            digests = data["distributed"]["state_sha256"]
            if name not in NO_RESUME:
                more = train_and_write(name, STREAM, first + "-resumed", n_tasks=1, threads=1, progress=False,
                                       resume=data["artifact"]["path"], log=lambda _: None)
                digests = digests + more["distributed"]["state_sha256"]
            mine[name] = {"digests": [d[world.rank] for d in digests], "all_digests": digests,
                          "statistics": statistics(name, data["artifact"]["path"]),
                          "world": data["distributed"]["world_size"]}
        try:  # a user mistake: each rank reading its own data instead of its slice of the same stream
            train_and_write("finetune", "split-digits" if world.rank == 0 else "rotated-digits",
                            os.path.join(out_dir, "mismatch"), n_tasks=2, overrides={"epochs": 1}, progress=False,
                            log=lambda _: None)
        except UsageError as exc:
            mine["mismatch_error"] = str(exc)
        with open(os.path.join(out_dir, f"rank{world.rank}.json"), "w") as f:
            json.dump(mine, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
