"""What one per-task session costs, measured against what the runtime's cost model charges for it
(`edgecl.runtime.costs.task_session_estimate`): the ledger must be an upper bound, or a runtime given budget B can
exceed B.

    python tools/bench_session_memory.py [--out tools/results/session_memory.json]   # ~4 min

For each network (torchvision ShuffleNet v2 ×0.5 and mobilenet_v2 ×0.25, timm convnext_atto and torchvision
resnet18 at 3×32×32, the resnet and lenet presets) a synthetic dense model (`random_packed(..., "finetune")`) with
1 and with 4 tasks is saved, and `edgecl audit --strategy sessions --json` runs on each in a fresh process: its
prediction and the measured RSS increase of a runtime that built every task's session and served a batch. The
difference between 4 and 1 tasks, over 3, is one session, predicted and measured; "total_error" is the 4-task
prediction's relative error against the measurement (what `edgecl audit` prints).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgecl.machine import machine_info  # noqa: E402
from edgecl.train.outputs import save_json  # noqa: E402

NETWORKS = {
    "torchvision shufflenet_v2_x0_5": ("torchvision.models:shufflenet_v2_x0_5", {}),
    "torchvision mobilenet_v2 x0.25": ("torchvision.models:mobilenet_v2", {"width_mult": 0.25}),
    "timm convnext_atto": ("timm:convnext_atto", {}),
    "torchvision resnet18": ("torchvision.models:resnet18", {}),
    "resnet preset": ("resnet", None),
    "lenet preset": ("lenet", None),
}


def audit(spec: dict, n_tasks: int) -> tuple[int, int]:
    """(predicted, measured) bytes of a sessions runtime of a synthetic `n_tasks` model of `spec`."""
    from edgecl import artifact
    from edgecl.synthetic import random_packed

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.edgecl")
        artifact.save(random_packed(spec, n_tasks=n_tasks, shape="finetune", classes=(5,) * n_tasks), path)
        run = subprocess.run([sys.executable, "-m", "edgecl", "audit", path, "--budget", "4GiB", "--strategy",
                              "sessions", "--json"], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    resident = json.loads(run.stdout)["resident"]
    return resident["predicted_total"], resident["measured_rss_increase"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "tools" / "results" / "session_memory.json"))
    args = p.parse_args()
    from edgecl.arch import preset
    from edgecl.arch.factories import resolve_arch

    rows = {}
    for name, (arch, factory_args) in NETWORKS.items():
        spec = preset(arch) if factory_args is None else resolve_arch(arch, (3, 32, 32), factory_args=factory_args)
        (p1, m1), (p4, m4) = audit(spec, 1), audit(spec, 4)
        rows[name] = {"spec_nodes": len(spec["nodes"]), "predicted": {"1": p1, "4": p4}, "measured": {"1": m1, "4": m4},
                      "per_session_predicted": (p4 - p1) // 3, "per_session_measured": (m4 - m1) // 3,
                      "total_error": round(p4 / m4 - 1, 4)}
        r = rows[name]
        print(f"{name:32s} {r['spec_nodes']:4d} nodes  one session: predicted {r['per_session_predicted'] / 1e6:7.2f} "
              f"MB, measured {r['per_session_measured'] / 1e6:7.2f} MB; 4 tasks: prediction {r['total_error']:+.1%}",
              flush=True)
    save_json({"machine": machine_info(), "networks": rows}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
