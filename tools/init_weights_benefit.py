"""What starting from trained weights (`--init-weights`) buys, measured without leakage.

A small conv net with BatchNorm (your-own-module path: `from_torch`) is first trained in plain torch on digits 0–5
(the training images of split-digits' tasks 0–2 only); then every method learns the two later tasks, digits 6/7 and
8/9, twice — from a fresh draw and from the trained weights — with 5 training images per class or all of them, at two
epoch budgets, over three seeds. No test image and no digit 6–9 is seen before its task. Records ACC and BWT of each
pair in tools/results/init_weights_benefit.json, with two probes of why: RGO at lr 0.01 (its paper's 0.1 is
unstable from trained weights) and a linear probe (logistic regression on 5 images per class) on the trunk's features,
trained against fresh.

    python tools/init_weights_benefit.py            # ~2 min on the 2-core machine
    python tools/init_weights_benefit.py --quick    # one seed, one budget, all images
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

from edgecl.arch import from_torch
from edgecl.train import engine, registry
from edgecl.train.data import Stream, make_stream
from edgecl.train.protocol import TrainContext

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "init_weights_benefit.json")
METHODS = {"lps": {}, "agscl": {}, "halrp": {}, "rgo": {"batchnorm": "task"}, "finetune": {}, "stl": {}}


class Net(nn.Module):
    """Two conv blocks with BatchNorm and a classifier: a network of the user's own, not a preset."""

    def __init__(self, classes: int = 6):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU())
        self.classifier = nn.Linear(64, classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def pretrained(seed: int) -> tuple[nn.Module, float]:
    """Net trained on digits 0–5 (split-digits tasks 0–2's training images); its accuracy on their test images."""
    split = make_stream("split-digits", 5, seed, None)
    x = np.concatenate([t.x_train for t in split.tasks[:3]])
    y = np.concatenate([t.y_train + 2 * k for k, t in enumerate(split.tasks[:3])])
    xt = np.concatenate([t.x_test for t in split.tasks[:3]])
    yt = np.concatenate([t.y_test + 2 * k for k, t in enumerate(split.tasks[:3])])
    torch.manual_seed(seed)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(20):
        net.train()
        for idx in torch.randperm(len(xs), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(torch.from_numpy(xt)).argmax(1).numpy() == yt).mean())
    return net, acc


def later_tasks(seed: int, shots: int | None) -> Stream:
    """Split-digits' tasks 3 and 4 (digits 6/7, 8/9), with `shots` training images per class (None: all ~140)."""
    split = make_stream("split-digits", 5, seed, None)
    tasks = []
    for t in split.tasks[3:]:
        keep = np.arange(len(t.y_train)) if shots is None else \
            np.concatenate([np.flatnonzero(t.y_train == c)[:shots] for c in range(t.n_classes)])
        tasks.append((t.x_train[keep], t.y_train[keep], t.x_test, t.y_test))
    return Stream.from_arrays("digits6to9", tasks)


def linear_probe(net: nn.Module, stream: Stream) -> float:
    """Mean test accuracy over the stream's tasks of logistic regression on `net`'s features (its trunk, eval mode)."""
    from sklearn.linear_model import LogisticRegression

    net.eval()
    scores = []
    with torch.no_grad():
        for task in stream.tasks:
            train, test = (net.features(torch.from_numpy(x)).numpy() for x in (task.x_train, task.x_test))
            scores.append(LogisticRegression(max_iter=2000).fit(train, task.y_train).score(test, task.y_test))
    return float(np.mean(scores))


def run(method: str, spec, stream: Stream, epochs: int, seed: int, start, **extra) -> dict:
    config = {**METHODS[method], "epochs": epochs, "seed": seed, **extra}
    if method == "halrp":
        config["warmup_epochs"] = max(1, epochs // 2)
    result = engine.run(registry.create(method, spec, config, start=start), stream, TrainContext(progress=False),
                        log=lambda *_: None)
    summary = result.to_json()
    return {"acc": summary["acc"], "bwt": summary["bwt"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(1)
    seeds, budgets, shot_counts = ([0], [2], [None]) if args.quick else ([0, 1, 2], [5, 20], [5, None])
    rows, pretrain, probes, rgo_low = [], [], [], []
    begin = time.perf_counter()
    for seed in seeds:
        net, acc = pretrained(seed)
        pretrain.append(acc)
        for shots in shot_counts:
            stream = later_tasks(seed, shots)
            spec = from_torch(net, stream.input_shape)
            for method in METHODS:
                for epochs in budgets:
                    fresh = run(method, spec, stream, epochs, seed, None)
                    start = run(method, spec, stream, epochs, seed, net)
                    rows.append({"method": method, "shots": shots, "epochs": epochs, "seed": seed, "fresh": fresh,
                                 "start": start})
                    print(f"seed {seed} {shots or 'all'} shots {method:8s} {epochs:2d} epochs: ACC fresh "
                          f"{100 * fresh['acc']:5.1f}  from trained weights {100 * start['acc']:5.1f}  (BWT "
                          f"{100 * fresh['bwt']:+.1f} / {100 * start['bwt']:+.1f})", flush=True)
        five = later_tasks(seed, 5)
        torch.manual_seed(seed + 100)
        probes.append({"seed": seed, "trained": linear_probe(net, five), "fresh": linear_probe(Net(), five)})
        spec = from_torch(net, five.input_shape)
        every = later_tasks(seed, None)
        rgo_low.append({"seed": seed, **{k: run("rgo", spec, every, budgets[-1], seed, start, lr=0.01)["acc"]
                                         for k, start in (("fresh", None), ("start", net))}})
        print(f"seed {seed}: linear probe 5-shot trained {100 * probes[-1]['trained']:.1f} / fresh "
              f"{100 * probes[-1]['fresh']:.1f}; rgo lr 0.01 all images {budgets[-1]} epochs fresh "
              f"{100 * rgo_low[-1]['fresh']:.1f} / start {100 * rgo_low[-1]['start']:.1f}", flush=True)
    summary = {}
    for shots in shot_counts:
        for method in METHODS:
            for epochs in budgets:
                sel = [r for r in rows if r["method"] == method and r["epochs"] == epochs and r["shots"] == shots]
                summary[f"{method} {shots or 'all'} shots {epochs} epochs"] = {
                    k: round(100 * statistics.mean(r[k]["acc"] for r in sel), 2) for k in ("fresh", "start")}
    out = {"what": __doc__.splitlines()[0], "seeds": seeds, "epochs": budgets, "shots_per_class": shot_counts,
           "pretrain_test_acc_digits0to5": pretrain, "mean_acc_percent": summary,
           "linear_probe_5_shots": probes, f"rgo_lr0.01_all_images_{budgets[-1]}_epochs": rgo_low, "runs": rows,
           "seconds": round(time.perf_counter() - begin, 1), "torch": torch.__version__}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
