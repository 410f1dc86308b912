"""Train LPS (default config) on a 4.35 M-parameter MLP, `preset('mlp', width=8)`, over 5 permuted-digit tasks, and
save the artifact: a trained model of the size issue 5's switch acceptance names, for `bench_switch.py --artifact`.
About 4 minutes on 2 CPU threads.

    python tools/make_lps_4m.py --out /tmp/lps_w8.edgecl
    python tools/bench_switch.py --artifact /tmp/lps_w8.edgecl --out tools/results/bench_switch_trained_lps4m.json
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="where to write the artifact")
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()

    import torch

    from edgecl import artifact
    from edgecl.arch import preset
    from edgecl.train import engine, registry
    from edgecl.train.data import make_stream
    from edgecl.train.protocol import TrainContext

    torch.set_num_threads(args.threads)
    stream = make_stream("permuted-digits", args.tasks, 0)
    method = registry.create("lps", preset("mlp", tuple(stream.input_shape), width=8), {})
    start = time.perf_counter()
    result = engine.run(method, stream, TrainContext(progress=False), log=lambda *a, **k: None)
    final = result.acc_matrix[-1]
    print(f"trained {args.tasks} tasks in {time.perf_counter() - start:.0f} s; accuracy after the last task: "
          + " ".join(f"{a:.3f}" for a in final) + f" (mean {sum(final) / len(final):.3f})")
    artifact.save(result.packed, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
