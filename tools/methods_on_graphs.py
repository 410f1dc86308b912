"""Every method on networks with graph structure (issue 16): ACC, BWT, artifact bytes against one dense model and wall
time per run, plus the deployment checks — the torch-free runtime's accuracy on every task equals the engine's
(`results.json`), and each task's exported ONNX agrees with the runtime within 1e-4.

Architectures: ``resnet`` (the preset: residual adds, BatchNorm), ``rescat`` (tests/torch_nets.py: residual add,
concatenation, depthwise conv, SE gate; ``rescat32``: 32 channels instead of 8), ``mobilenet_v2`` (torchvision, width
0.25) and ``mobilenetv3`` (timm ``mobilenetv3_small_050``); the last two read the digits enlarged to 3×32×32
(`make_stream(..., input_shape=(3, 32, 32))`).
A method is a registry name with optional config, ``NAME`` or ``NAME[key=value,...]`` (JSON values), e.g.
``rgo[fel=false,batchnorm=frozen]``; ``--epochs-scale`` multiplies every method's epochs (HALRP keeps its warm-up).

    python tools/methods_on_graphs.py --archs resnet,rescat32 --streams split-digits,rotated-digits \
        --methods lps,halrp,rgo,finetune,stl --tasks 5 --out tools/results/methods_on_graphs.json
    python tools/methods_on_graphs.py --archs resnet --streams rotated-digits --tasks 5 \
        --methods "lps,lps[batchnorm=frozen],rgo,rgo[batchnorm=frozen]" --out /tmp/bn.json   # the BatchNorm rule
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

from edgecl import artifact
from edgecl.machine import machine_info
from edgecl.train import engine, registry
from edgecl.train.data import make_stream
from edgecl.train.protocol import TrainContext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_ARCHS = {"mobilenet_v2": "torchvision.models:mobilenet_v2", "mobilenetv3": "timm:mobilenetv3_small_050"}


def _graph_models():
    spec = importlib.util.spec_from_file_location("torch_nets", os.path.join(ROOT, "tests", "torch_nets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(arch_name: str, stream_name: str, tasks: int, seed: int):
    """(arch, stream) for one architecture name and built-in stream."""
    from edgecl.arch import from_torch, preset

    gm = _graph_models()
    stream = make_stream(stream_name, tasks, seed)
    if arch_name == "resnet":
        return preset("resnet", stream.input_shape), stream
    if arch_name.startswith("rescat"):  # rescat (8 channels, as in the tests) or rescatW (W channels)
        return gm.rescat_spec(stream.input_shape, int(arch_name[6:] or 8)), stream
    stream = make_stream(stream_name, tasks, seed, (3, 32, 32))
    if arch_name == "mobilenet_v2":
        from edgecl.arch.factories import ensure_torchvision_imports

        ensure_torchvision_imports()
        import torchvision

        module = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25)
        return from_torch(module, stream.input_shape, name="mobilenet_v2_w025"), stream
    if arch_name == "mobilenetv3":
        from edgecl.arch.factories import resolve_arch

        return resolve_arch(IMAGE_ARCHS[arch_name], stream.input_shape), stream
    raise SystemExit(f"unknown --archs entry {arch_name!r}")


def parse_method(text: str) -> tuple[str, dict]:
    """'rgo[fel=false,batchnorm=frozen]' → ('rgo', {'fel': False, 'batchnorm': 'frozen'})."""
    name, _, rest = text.partition("[")
    config = {}
    for item in filter(None, rest.rstrip("]").split(",")):
        key, _, value = item.partition("=")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return name, config


def split_methods(text: str) -> list[str]:
    """Comma-separated methods, commas inside [...] kept."""
    out, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    return out + [current] if current else out


def scaled(name: str, config: dict, scale: float) -> dict:
    if scale == 1.0:
        return config
    defaults = registry.config_class(name)().to_json()
    out = {**config, "epochs": max(1, round(config.get("epochs", defaults["epochs"]) * scale))}
    if name == "halrp":
        out["epochs"] = max(out["epochs"], config.get("warmup_epochs", defaults["warmup_epochs"]) + 1)
    return out


def deployment_checks(path: str, stream, result_row: list[float]) -> dict:
    """Runtime accuracy per task vs the engine's last row, ONNX (exported, folded) vs runtime outputs."""
    import onnxruntime as ort

    from edgecl.export import export_onnx
    from edgecl.runtime import TaskRuntime

    runtime_acc, onnx_diff, largest = [], 0.0, 0.0
    with tempfile.TemporaryDirectory() as out, TaskRuntime(path) as rt:
        index = export_onnx(path, out, progress=False)
        for t, task in enumerate(stream.tasks):
            logits = rt.infer(task.x_test, task=t)
            runtime_acc.append(float((logits.argmax(1) == task.y_test).mean()))
            session = ort.InferenceSession(os.path.join(out, index["tasks"][t]["file"]),
                                           providers=["CPUExecutionProvider"])
            onnx_diff = max(onnx_diff, float(np.abs(session.run(None, {"x": task.x_test})[0] - logits).max()))
            largest = max(largest, float(np.abs(logits).max()))
    # float32 rounding grows with the logits' size: relative to max(1, |largest logit|), like tests/test_from_torch
    return {"runtime_acc": runtime_acc, "runtime_equals_results": runtime_acc == result_row,
            "onnx_vs_runtime_max_abs": onnx_diff, "largest_logit": largest,
            "onnx_vs_runtime_scaled": onnx_diff / max(1.0, largest)}


def one_run(arch, stream, label: str, seed: int, scale: float, check: bool) -> dict:
    name, config = parse_method(label)
    config = scaled(name, {**config, "seed": seed}, scale)
    method = registry.create(name, arch, config)
    start = time.perf_counter()
    result = engine.run(method, stream, TrainContext(progress=False), log=lambda *a: None)
    seconds = time.perf_counter() - start
    summary = result.to_json()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.edgecl")
        artifact.save(result.packed, path)
        info = artifact.inspect(path)
        row = {"method": label, "config": method.config.to_json(), "seed": seed, "acc": summary["acc"],
               "bwt": summary["bwt"], "acc_matrix": result.acc_matrix, "artifact_bytes": info["file_bytes"],
               "dense_fp32_bytes": info["dense_fp32_bytes"], "ratio_to_dense": info["ratio_to_dense"],
               "seconds": seconds}
        if check:
            row.update(deployment_checks(path, stream, result.acc_matrix[-1]))
    if name == "rgo":
        row["fel_groups"] = result.packed.extra.get("fel_groups")
        row["fel_skipped"] = result.packed.extra.get("fel_skipped")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="resnet,rescat")
    p.add_argument("--streams", default="split-digits,rotated-digits")
    p.add_argument("--methods", default="lps,halrp,rgo,finetune,stl")
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs-scale", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-checks", action="store_true", help="skip the runtime and ONNX checks")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"machine": machine_info(), "argv": sys.argv[1:] if argv is None else argv, "runs": []}
    for arch_name in args.archs.split(","):
        for stream_name in args.streams.split(","):
            for seed in map(int, args.seeds.split(",")):
                arch, stream = build(arch_name, stream_name, args.tasks, seed)
                for label in split_methods(args.methods):
                    row = {"arch": arch_name, "stream": stream.name,
                           **one_run(arch, stream, label, seed, args.epochs_scale, not args.no_checks)}
                    report["runs"].append(row)
                    checks = (f" runtime==results {row['runtime_equals_results']} onnx-runtime "
                              f"{row['onnx_vs_runtime_max_abs']:.1e} (scaled {row['onnx_vs_runtime_scaled']:.1e})"
                              if "runtime_acc" in row else "")
                    print(f"{arch_name:13s} {stream.name:18s} {label:34s} seed {seed}: ACC {100 * row['acc']:6.2f} "
                          f"BWT {100 * row['bwt']:+6.2f}  {row['ratio_to_dense']:5.2f}x dense  "
                          f"{row['seconds']:6.1f}s{checks}", flush=True)
                    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                    with open(args.out, "w") as f:
                        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
