"""`edgecl run ARTIFACT --task N (--input x.npy [--output y.npy] [--labels] | --benchmark N [--batch B])`: one task's
logits or argmax labels on a device, without torch, or its latency percentiles on random input. The work is
`edgecl.runtime.run.run_task`."""
from __future__ import annotations

import argparse

from edgecl.checks import MAX_BATCH, MAX_BENCHMARK, int_arg, path_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=path_arg, help="artifact file (model.edgecl)")
    p.add_argument("--task", required=True, help="task index or name")
    p.add_argument("--input", type=path_arg,
                   help=".npy float array of shape (batch, *input_shape), or an .npz with one array")
    p.add_argument("--output", type=path_arg,
                   help="write the logits here as .npy, never over --input (default: print the predicted classes)")
    p.add_argument("--labels", action="store_true", help="print the argmax labels, also when --output is given")
    p.add_argument("--benchmark", type=int_arg(0, MAX_BENCHMARK), default=0, metavar="N",
                   help="time N inferences (after a warm-up) on random input, or on --input; print percentiles")
    p.add_argument("--batch", type=int_arg(1, MAX_BATCH), default=None,
                   help=f"batch of the random --benchmark input (default 1, at most {MAX_BATCH}; with --input the "
                        "batch is the file's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backend", default="auto", help="auto, ort-cpu, ort-cuda, ort-tensorrt")
    p.add_argument("--budget", default=None, help="memory budget, e.g. 32MiB (refuse rather than exceed it)")
    p.add_argument("--device-budget", default=None, help="GPU memory budget for --device cuda, e.g. 2GiB")
    p.add_argument("--cuda-graph", action="store_true",
                   help="--device cuda: replay each (slot, batch) as a CUDA graph (ONNX Runtime's enable_cuda_graph)")


def main(args: argparse.Namespace) -> int:
    from edgecl.runtime.run import run_task

    run_task(args.artifact, args.task, input=args.input, output=args.output, labels=args.labels,
             benchmark=args.benchmark, batch=args.batch, device=args.device, backend=args.backend, budget=args.budget,
             device_budget=args.device_budget, cuda_graph=args.cuda_graph)
    return 0
