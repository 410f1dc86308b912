"""Where RGO's old tasks drift: per-layer drift of task 0's features on timm tf_efficientnet_lite0 (split digits,
3×32×32, 5 tasks, seed 0; `batchnorm=task batch_size=64 lr=0.01` unless overridden).

    PYTHONPATH=. python tools/rgo_drift.py [alpha=0.001] [quiet=1]

After every task it prints each seen task's test accuracy (from the packed model), and, for task 0's test images
under task 0's materialised network, per conv layer: `global` = ‖out_t − out_0‖/‖out_0‖ of the layer's output
(every earlier layer's drift included), `local` = ‖conv(x_0, W_t) − conv(x_0, W_0)‖/‖out_0‖ on task 0's own
inputs to the layer (the part the projection P is meant to block: ΔW·x_old), `dW` = ‖W_t − W_0‖/‖W_0‖.
Results: tools/results/own_network_tf_efficientnet_lite0_rgo_drift_*.txt (the alpha=1 file was written before the
per-task accuracies and `quiet` were added: it prints task 0's accuracy only; the layer figures are the same code).
"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np, torch
from edgecl.arch.factories import ensure_torchvision_imports; ensure_torchvision_imports()
from edgecl.arch.factories import resolve_arch_and_module
from edgecl.train.data import make_stream, parse_input_shape
from edgecl.train import registry
from edgecl.train.protocol import TrainContext
from edgecl.train.models import forward
from edgecl.train.methods.rgo_ops import LayerTap
import torch.nn.functional as F

torch.set_num_threads(1)
sets = dict(a.split("=") for a in sys.argv[1:])
quiet = sets.pop("quiet", "0") == "1"
cfg = {"seed": 0, "batchnorm": "task", "batch_size": 64, "lr": 0.01}
for k, v in sets.items():
    cfg[k] = json.loads(v) if v not in ("task", "identity", "frozen", "input", "backprop", "patches", "mean") else v
shape = parse_input_shape("3,32,32")
stream = make_stream("split-digits", 5, 0, shape)
torch.manual_seed(0)
arch, module = resolve_arch_and_module("timm:tf_efficientnet_lite0", stream.input_shape)
method = registry.create("rgo", arch, cfg)
ctx = TrainContext(device="cpu", progress=False)
x0 = torch.from_numpy(np.asarray(stream.tasks[0].x_test, dtype=np.float32))
y0 = np.asarray(stream.tasks[0].y_test)
convs = {n["name"]: n for n in arch["nodes"] if n["op"] in ("conv", "linear")}

def record(params):
    p = {k: torch.from_numpy(np.array(v)) for k, v in params.items()}
    calls = {}
    ids = {id(p[f"{l}.weight"]): l for l in convs if f"{l}.weight" in p}
    with torch.no_grad(), LayerTap(ids, record=calls):
        logits = forward(arch, p, x0, train=False)
    return p, calls, logits

ref = None
for t, task in enumerate(stream.tasks):
    s = time.time(); method.learn_task(t, task, ctx)
    packed = method.pack()
    p, calls, logits = record(packed.materialize(0))
    accs = []
    for j in range(t + 1):
        pj = {k: torch.from_numpy(np.array(v)) for k, v in packed.materialize(j).items()}
        tj = stream.tasks[j]
        with torch.no_grad():
            lj = forward(arch, pj, torch.from_numpy(np.asarray(tj.x_test, dtype=np.float32)))
        accs.append(float((lj.argmax(1).numpy() == np.asarray(tj.y_test)).mean()))
    print(f"task {t} trained ({time.time()-s:.0f}s); accs " + " ".join(f"{a:.3f}" for a in accs), flush=True)
    if t == 4:
        print(f"ACC {np.mean(accs):.4f}")
    if ref is None:
        ref = (p, calls, logits); continue
    p0, c0, l0 = ref
    rows = []
    for l in c0:
        c = c0[l]; w0, wk = p0[f"{l}.weight"], p[f"{l}.weight"]
        if c.w_shape.__len__() == 2:
            loc = F.linear(c.x, wk) - F.linear(c.x, w0)
        else:
            conf = (c.stride, c.padding, c.dilation, c.groups)
            loc = F.conv2d(c.x, wk, None, *conf) - F.conv2d(c.x, w0, None, *conf)
        n0 = c.out.norm()
        rows.append((l, float((calls[l].out - c.out).norm() / n0), float(loc.norm() / n0),
                     float((wk - w0).norm() / w0.norm()), c.groups))
    print(f"  logits drift {float((logits-l0).norm()/l0.norm()):.3f}  mean local {np.mean([r[2] for r in rows]):.4f}"
          f"  max local {max(r[2] for r in rows):.4f}")
    if quiet:
        continue
    for l, g, lo, dw, grp in rows:
        print(f"  {l:28s} g{grp:<5d} global {g:.3f} local {lo:.4f} dW {dw:.3f}")
    sys.stdout.flush()
