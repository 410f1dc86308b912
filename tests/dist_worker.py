"""One rank of the distributed CI test (`tests/test_distributed.py` starts it with torchrun, 2 gloo processes).

For every method: train 2 tasks of a small stream with `train_and_write` (rank 0 writes the artifact), resume it
with a third task, then evaluate the method's own data statistic — AGS-CL's Ω, HALRP's gradient importances,
RGO's projection update, BatchNorm recalibration — on the weights rank 0 wrote, under 2 ranks. Every rank writes
what it holds to OUT/rank{R}.json: its own state digest after every task and the statistics
(`tools/dist_equivalence.statistics`), for the test to compare across ranks and against one process computing the
same thing.

usage: torchrun --standalone --nproc-per-node 2 tests/dist_worker.py OUT METHOD[,METHOD...]
"""
from __future__ import annotations

import json
import os
import sys

from tools_loader import load_tool

from edgecl.errors import UsageError
from edgecl.train import distributed
from edgecl.train.pipeline import train_and_write

dist_equivalence = load_tool("dist_equivalence")

# A small convnet with BatchNorm after a conv and after a linear layer: sync BatchNorm, conv patches (RGO) and
# channel groups (AGS-CL) all take part, and an epoch on the digits takes a fraction of a second.
SPEC = dist_equivalence.TINY_BN
CONFIGS = {"lps": {"epochs": 1, "admm_epochs": 2, "final_epochs": 1}, "agscl": {"epochs": 2},
           "halrp": {"epochs": 2}, "rgo": {"epochs": 1, "batch_size": 20, "curvature_batch": 100},
           "finetune": {"epochs": 1}, "stl": {"epochs": 1}}
STREAM = "permuted-digits"
NO_RESUME = ("finetune", "stl")  # baselines: nothing to append to


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
                          "statistics": dist_equivalence.statistics(name, data["artifact"]["path"], STREAM),
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
