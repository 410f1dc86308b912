"""`edgecl compare`: several methods trained on the same stream and seeds, each packed into an artifact and timed in
the runtime, so a user can choose a method by accuracy against bytes and speed on *their* data.

What is measured per method (definitions, so the numbers can be checked):
- ACC, BWT, forgetting: mean ± sample std over seeds. Seed k sets both the stream (split, permutations) and the
  method's initialisation, exactly as `edgecl train --seed k`, so every method sees the same data for a seed.
- artifact bytes (mean over seeds) and bytes per added task
  = (bytes after all T tasks − bytes after task 1) / (T − 1).
- runtime: median switch time and median batch-1 inference time over repeated round trips through every task in
  `TaskRuntime` (seed 0's artifact, default budget and strategy); `switch_first_ms` / `infer_first_ms` are the
  medians of the first round (nothing cached yet); `runtime_acc` is the mean test accuracy computed through the
  runtime (should equal seed 0's training ACC).
- task-order robustness (--orders R ≥ 2, seed 0): order 0 is the stream's own order (the seed-0 run, reused),
  orders 1..R−1 are random permutations. P[r, t] is the final accuracy on task t (after all tasks) under order r;
  OPD_t = max_r P[r, t] − min_r P[r, t], MOPD = max_t OPD_t, AOPD = mean_t OPD_t (HALRP paper Eq. 14, APD protocol).

Modules: `spec` (what is asked, parsed and checked), `runner` (the runs and the report dict), `report` (compare.md),
`plots` (the PNG charts). Metrics across runs (OPD, Pareto front, mean ± std) are in `edgecl.metrics`.
"""
from __future__ import annotations

from edgecl.compare.runner import ARTIFACT_DIR, run_compare, task_orders
from edgecl.compare.spec import (DEFAULT_METHODS, CompareSpec, check_spec, method_config, parse_config_overrides,
                                 parse_methods, parse_seeds, split_available)

__all__ = ["ARTIFACT_DIR", "DEFAULT_METHODS", "CompareSpec", "check_spec", "method_config", "parse_config_overrides",
           "parse_methods", "parse_seeds", "run_compare", "split_available", "task_orders"]
