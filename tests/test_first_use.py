"""A first-time user's friction (issue 17, item 12): logs, charts, numbers and citations a new user meets first."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from edgecl.compare.plots import pareto_figure
from edgecl.compare.runner import added_task_bytes, summarize_runs
from edgecl.train.outputs import matrix_figure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_redirected_training_log_has_no_progress_bar_redraws(tmp_path):
    """`make demo > log 2>&1`: progress bars are asked for (no --no-progress) but stderr is not a terminal."""
    done = subprocess.run([sys.executable, "-m", "edgecl.cli", "train", "--method", "finetune", "--tasks", "2",
                           "--set", "epochs=2", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr + done.stdout and "it/s" not in done.stderr and "%|" not in done.stderr
    assert "ACC" in done.stdout


def test_the_accuracy_heatmap_shows_one_decimal_and_acc_bwt():
    matrix = [[0.981], [0.975, 0.979], [0.971, 0.974, 0.982]]
    fig = matrix_figure(matrix, "lps on permuted-digits")
    ax = fig.axes[0]
    labels = {t.get_text() for t in ax.texts}
    assert {"98.1", "97.5", "97.9", "97.1", "97.4", "98.2"} <= labels
    assert re.search(r"ACC 97\.6 %\s+BWT -0\.8 points", ax.get_title())
    low, high = ax.images[0].get_clim()
    assert high == 100 and 80 <= low < 97.1  # 97 % and 98 % get different colours
    assert ax.images[0].norm(98.2) - ax.images[0].norm(97.1) > 0.08  # 10× the 0-100 scale's 0.011
    forgetting = matrix_figure([[0.99], [0.20, 0.97]], "finetune")
    assert forgetting.axes[0].images[0].get_clim()[0] <= 20


def _report(front: list[str]) -> dict:
    methods = {name: {"artifact_bytes": size, "acc_mean": acc, "acc_std": 0.01}
               for name, size, acc in (("lps", 400_000, 0.97), ("stl", 2_800_000, 0.96), ("finetune", 360_000, 0.69))}
    return {"methods": methods, "pareto_front": front, "stream": "permuted-digits", "n_tasks": 10}


def test_the_pareto_legend_shows_only_what_is_drawn():
    from matplotlib.collections import PathCollection
    from matplotlib.lines import Line2D

    one = pareto_figure(_report(["lps"])).axes[0]
    assert not [line for line in one.get_lines() if line.get_linestyle() == "--"]  # no step line of one point
    handles = one.get_legend().legend_handles
    assert len(handles) == 1 and isinstance(handles[0], PathCollection)
    assert one.get_legend().get_texts()[0].get_text() == "on the Pareto front"
    two = pareto_figure(_report(["finetune", "lps"])).axes[0]
    assert [line for line in two.get_lines() if line.get_linestyle() == "--"]
    assert not any(isinstance(h, Line2D) for h in two.get_legend().legend_handles)


def test_bytes_per_added_task_is_never_negative():
    """AGS-CL's dense base compresses better once nodes are dead: the file after 3 tasks can be smaller than after
    one, which the old (file difference) definition reported as negative bytes per task."""
    run = {"acc_matrix": [[0.9], [0.9, 0.9], [0.9, 0.9, 0.9]], "acc": 0.9, "bwt": 0.0, "forgetting": 0.0,
           "train_seconds": 1.0, "artifact_bytes": 250_000, "artifact_bytes_first_task": 260_000,
           "artifact_task_bytes": [1_000, 1_200, 1_400], "artifact_shared_bytes": 246_400,
           "artifact_shared_bytes_first_task": 259_000}
    assert added_task_bytes(run) == 1_300
    assert summarize_runs([run])["bytes_per_added_task"] == 1_300
    growing = {**run, "artifact_shared_bytes": 259_000 + 2 * 5_000}  # LPS: W̄ fills in with every task
    assert added_task_bytes(growing) == 1_300 + 5_000


def test_the_readme_cites_each_paper_rather_than_a_local_folder():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "shared/papers" not in text
    for arxiv in ("2012.06956", "2003.13726", "2311.15161", "2201.12522"):
        assert f"arXiv:{arxiv}" in text


def test_the_readmes_own_network_snippet_imports_torchvision_and_converts_it():
    """The README's Python path to your own network, run as a user runs it (a fresh interpreter, torchvision imported
    by the user's code, not edgecl's CLI): with the pinned CPU torch, `import torchvision` alone failed on
    'operator torchvision::nms does not exist'; the snippet calls `edgecl.arch.ensure_torchvision_imports` first. The
    whole snippet runs, `registry.create` included (it used `registry` without importing it)."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"```python\n(from edgecl\.arch import ensure_torchvision_imports.*?)```", readme, re.S).group(1)
    code = block + "print(spec['feature_dim'], type(method).__name__)\n"  # through registry.create, as written
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-2]) > 0 and proc.stdout.split()[-1] != "NoneType"
    light = "import sys, edgecl.arch; print('torch' in sys.modules)"  # the new name keeps edgecl.arch torch-free
    assert subprocess.run([sys.executable, "-c", light], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}).stdout.strip() == "False"
