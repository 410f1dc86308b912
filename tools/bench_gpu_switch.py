"""Task switching on a CUDA GPU with torch: device-resident superposed weights + per-task bit masks, a switch is a few
fused elementwise kernels (optionally one CUDA graph replay), reported as a fraction of one forward pass.

    python tools/bench_gpu_switch.py [--tasks 10] [--repeats 50] [--out gpu_switch.json]

Models: a ResNet-18-sized network (11 M parameters, 3×224×224 input, edgecl block ops) and the ≥ 4 M parameter MLP
of the CPU benchmark (`preset('mlp', width=8)`). Masks are LPS-shaped (disjoint owners, each task sharing a random
half of the earlier support) and random, as in tools/bench_switch.py: only the structure matters for timing.

Layout: all prunable weights live in one flat device buffer (each layer's parameter is a view into it), the
superposed weights W̄ in another, and each task's keep mask as packed bits (1 bit per weight). A switch copies the
task's bits into a static buffer and runs: unpack (shift, and) → where(keep, W̄, 0) into the flat buffer — captured
once as a CUDA graph, so a switch is one small copy plus one graph replay. Heads are swapped by reference.
Everything is checked: after every switch the weights equal torch.where(keep_t, W̄, 0) exactly, and the forward
equals a forward with independently built weights.
Needs only torch (CUDA) and edgecl's pure-Python spec module; numpy is not required.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch

from edgecl.arch import Arch, param_shapes, preset, prunable, validate
from edgecl.train.models import forward


def resnet18_arch() -> Arch:
    """ResNet-18's stages (64-128-256-512, two basic blocks each) on 224×224 inputs, in edgecl's spec language
    (the stem's 3×3/2 max pool is a 2×2 pool here, as edgecl's maxpool has kernel = stride)."""
    layers = [{"op": "conv", "name": "stem", "in": 3, "out": 64, "k": 7, "stride": 2, "pad": 3, "bias": False},
              {"op": "bn", "name": "stembn", "ch": 64}, {"op": "relu"}, {"op": "maxpool", "k": 2}]
    cin = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for i in range(2):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append({"op": "block", "name": f"s{stage}b{i}", "in": cin, "out": width, "stride": stride})
            cin = width
    layers.append({"op": "gap"})
    return validate({"name": "resnet18", "input_shape": [3, 224, 224], "layers": layers})


class MaskSwitcher:
    """Device-resident W̄ + bit masks; `switch(t)` rewrites the flat weight buffer the forward reads."""

    def __init__(self, arch: Arch, n_tasks: int, n_classes: int, device: torch.device, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.arch, self.device = arch, device
        shapes = param_shapes(arch)
        self.names = prunable(arch)
        sizes = [int(torch.Size(shapes[n]).numel()) for n in self.names]
        total = sum(sizes)
        self.padded = (total + 7) // 8 * 8
        owner = torch.randint(0, n_tasks + 1, (self.padded,), generator=g, dtype=torch.uint8)
        base = torch.randn(self.padded, generator=g) * 0.05
        base[owner == 0] = 0
        self.base = base.to(device)
        self.flat = torch.zeros(self.padded, device=device)
        self.zero = torch.zeros((), device=device)
        weights = 2 ** torch.arange(7, -1, -1, dtype=torch.int32)
        self.keeps, self.bits = [], []
        for t in range(n_tasks):
            earlier = (owner >= 1) & (owner <= t)
            keep = (owner == t + 1) | (earlier & (torch.rand(self.padded, generator=g) < 0.5))
            self.keeps.append(keep.to(device))
            self.bits.append((keep.view(-1, 8).int() * weights).sum(1).to(torch.uint8).to(device))
        self.current_bits = torch.empty_like(self.bits[0])
        self.shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=device)
        self.params: dict[str, torch.Tensor] = {}
        self.views: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        offset = 0
        for name, size in zip(self.names, sizes):
            self.views[name] = (offset, size, shapes[name])
            self.params[name] = self.flat[offset:offset + size].view(shapes[name])
            offset += size
        for name, shape in shapes.items():
            if name not in self.params:
                value = torch.rand(shape, generator=g) + 0.5 if name.endswith("running_var") else \
                    torch.randn(shape, generator=g) * 0.05
                self.params[name] = value.to(device)
        feat = arch["feature_dim"]
        self.heads = [{"head.weight": (torch.randn(n_classes, feat, generator=g) * 0.05).to(device),
                       "head.bias": torch.zeros(n_classes).to(device)} for _ in range(n_tasks)]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.n_params = total

    def _apply(self) -> None:
        keep = ((self.current_bits.unsqueeze(1) >> self.shifts) & 1).view(-1).view(torch.bool)
        torch.where(keep, self.base, self.zero, out=self.flat)

    def compiled_switch(self):
        """The same switch fused by torch.compile (Inductor: one kernel reading the bits and W̄, writing the flat
        buffer in place); None with the reason where compilation is unavailable."""
        def fused(flat: torch.Tensor, bits: torch.Tensor, base: torch.Tensor) -> None:
            keep = ((bits.unsqueeze(1) >> self.shifts) & 1).view(-1) != 0  # Inductor cannot view uint8 as bool
            flat.copy_(torch.where(keep, base, 0.0))

        try:
            step = torch.compile(fused, dynamic=False)
            for t in range(len(self.bits)):
                step(self.flat, self.bits[t], self.base)
            return lambda t: (step(self.flat, self.bits[t], self.base), self.params.update(self.heads[t]))
        except Exception as exc:  # noqa: BLE001 - report, do not lose the other figures
            return f"{type(exc).__name__}: {str(exc)[:200]}"

    def capture(self) -> None:
        self.current_bits.copy_(self.bits[0])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._apply()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._apply()

    def switch(self, t: int, graph: bool = True) -> None:
        self.current_bits.copy_(self.bits[t])
        if graph and self.graph is not None:
            self.graph.replay()
        else:
            self._apply()
        self.params.update(self.heads[t])


def cuda_ms(fn, repeats: int) -> float:
    """Median GPU time of fn() in ms (CUDA events around each call, after warm-up)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def graphed_forward(arch: Arch, params: dict, x: torch.Tensor):
    """The forward captured as a CUDA graph reading the (in-place switched) parameter tensors."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            forward(arch, params, x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = forward(arch, params, x)
    return graph, out


def bench(name: str, arch: Arch, batches: tuple[int, ...], args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    sw = MaskSwitcher(arch, args.tasks, 10, device)
    if device.type == "cuda":
        sw.capture()
    row: dict = {"model": name, "params_switched": sw.n_params,
                 "params_total": sum(int(torch.Size(s).numel()) for s in param_shapes(arch, 10).values())}
    # correctness: every task, graph and eager switching
    for t in list(range(args.tasks)) + [0, args.tasks - 1]:
        for graph in (True, False):
            sw.switch(t, graph)
            if device.type == "cuda":
                torch.cuda.synchronize()
            assert torch.equal(sw.flat, torch.where(sw.keeps[t], sw.base, sw.zero)), (name, t, graph)
    x = torch.randn(2, *arch["input_shape"], device=device)
    sw.switch(1)
    with torch.no_grad():
        ours = forward(arch, sw.params, x)
        ref_flat = torch.where(sw.keeps[1], sw.base, sw.zero)
        ref_params = {**sw.params, **{n: ref_flat[o:o + k].view(shape).clone() for n, (o, k, shape) in sw.views.items()}}
        torch.testing.assert_close(ours, forward(arch, ref_params, x), rtol=0, atol=0)
    if device.type != "cuda":
        return row  # --device cpu: a dry run of the correctness checks only
    order = iter(list(range(args.tasks)) * (20 * args.repeats))
    row["switch_graph_ms"] = cuda_ms(lambda: sw.switch(next(order), True), args.repeats)
    row["switch_eager_ms"] = cuda_ms(lambda: sw.switch(next(order), False), args.repeats)
    compiled = sw.compiled_switch() if args.compile else "not asked (--compile)"
    if callable(compiled):
        for t in range(args.tasks):
            compiled(t)
            torch.cuda.synchronize()
            assert torch.equal(sw.flat, torch.where(sw.keeps[t], sw.base, sw.zero)), (name, t, "compiled")
        row["switch_compiled_ms"] = cuda_ms(lambda: compiled(next(order)), args.repeats)
    else:
        row["switch_compiled_ms"] = compiled
    row["device_copy_floor_ms"] = cuda_ms(lambda: sw.flat.copy_(sw.base), args.repeats)
    host = sw.base.cpu().pin_memory()
    row["host_upload_ms"] = cuda_ms(lambda: sw.flat.copy_(host, non_blocking=True), args.repeats)
    for batch in batches:
        xb = torch.randn(batch, *arch["input_shape"], device=device)
        with torch.no_grad():
            eager = cuda_ms(lambda: forward(arch, sw.params, xb), args.repeats)
        graph, _ = graphed_forward(arch, sw.params, xb)
        graphed = cuda_ms(graph.replay, args.repeats)
        both = cuda_ms(lambda: (sw.switch(next(order), True), graph.replay()), args.repeats)
        row[f"batch{batch}"] = {"forward_eager_ms": eager, "forward_graph_ms": graphed,
                                "switch_plus_forward_graph_ms": both,
                                "switch_over_forward_eager": row["switch_graph_ms"] / eager,
                                "switch_over_forward_graph": row["switch_graph_ms"] / graphed}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", default="gpu_switch.json")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile-fused switch")
    p.add_argument("--device", default="cuda", help="cuda; cpu runs the correctness checks only (a dry run)")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
        for name, arch in (("mlp-w8", preset("mlp", width=8)), ("resnet18", resnet18_arch())):
            print(bench(name, arch, (), args))
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_switch: needs a CUDA GPU (torch.cuda.is_available() is false)")
    torch.backends.cudnn.benchmark = True
    rows = [bench("resnet18", resnet18_arch(), (1, 64), args), bench("mlp-w8", preset("mlp", width=8), (1, 64), args)]
    info = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}
    print(f"device: {info['gpu']}, torch {info['torch']}, CUDA {info['cuda']}")
    for r in rows:
        print(f"{r['model']}: {r['params_switched'] / 1e6:.2f} M switched parameters; switch {r['switch_graph_ms']:.3f} ms "
              f"(CUDA graph) / {r['switch_eager_ms']:.3f} ms (eager); device copy floor "
              f"{r['device_copy_floor_ms']:.3f} ms; host upload of dense weights {r['host_upload_ms']:.3f} ms; "
              f"torch.compile-fused switch: {r['switch_compiled_ms']}")
        for b in (1, 64):
            f = r[f"batch{b}"]
            print(f"  batch {b}: forward {f['forward_eager_ms']:.3f} ms eager / {f['forward_graph_ms']:.3f} ms graph;"
                  f" switch = {f['switch_over_forward_eager']:.3f} of an eager forward, "
                  f"{f['switch_over_forward_graph']:.3f} of a graphed one")
    with open(args.out, "w") as fh:
        json.dump({"machine": info, "args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
