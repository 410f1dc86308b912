"""`edgecl compare` on a tiny real run, its metrics (Pareto front, OPD/MOPD/AOPD) against hand-computed examples, its
input checks, and a smoke run of tools/bench_train.py."""
import json
import os

import numpy as np
import pytest
import torch
from tools_loader import load_tool

from edgecl.arch import preset
from edgecl.cli import main
from edgecl.compare import CompareSpec, method_config, parse_seeds, run_compare, task_orders
from edgecl.errors import UsageError
from edgecl.metrics import aopd, mopd, opd, pareto_front
from edgecl.train import engine, registry
from edgecl.train.data import Stream, make_stream
from edgecl.train.protocol import TrainContext

TINY = ["--methods", "finetune,stl", "--tasks", "2", "--seeds", "2", "--epochs-scale", "0.1", "--orders", "2",
        "--timing-repeats", "2", "--no-progress"]
METHOD_KEYS = ("config", "runs", "acc_mean", "acc_std", "bwt_mean", "bwt_std", "forgetting_mean", "acc_matrix_mean",
               "artifact_bytes", "bytes_per_added_task", "runtime", "order_robustness")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert main(["compare", *TINY, "--out", str(out)]) == 0
    return out, json.loads((out / "compare.json").read_text())


@pytest.mark.slow  # the tiny comparison: 2 methods x 2 seeds + 1 order
def test_tiny_compare_writes_the_report(tiny):
    out, report = tiny
    for key in ("stream", "arch", "n_tasks", "seeds", "methods", "pareto_front", "plots", "machine", "wall_seconds"):
        assert key in report
    assert report["seeds"] == [0, 1] and report["n_tasks"] == 2 and list(report["methods"]) == ["finetune", "stl"]
    for name, entry in report["methods"].items():
        for key in METHOD_KEYS:
            assert key in entry, (name, key)
        assert [r["seed"] for r in entry["runs"]] == [0, 1]
        assert entry["config"]["epochs"] == 1  # finetune/stl default 10 epochs × 0.1
        accs = [r["acc"] for r in entry["runs"]]
        assert entry["acc_mean"] == pytest.approx(np.mean(accs))
        assert entry["acc_std"] == pytest.approx(np.std(accs, ddof=1))
        assert all(0.0 <= v <= 1.0 for row in entry["acc_matrix_mean"] for v in row)
    assert report["methods"]["stl"]["bwt_mean"] == 0.0
    md = (out / "compare.md").read_text()
    assert "| finetune |" in md and "| stl |" in md and "MOPD" in md


@pytest.mark.slow  # the tiny comparison: 2 methods x 2 seeds + 1 order
def test_compare_runs_reproduce_edgecl_train(tiny):
    """Seed k in compare is the same data and initialisation as `edgecl train --seed k`."""
    _, report = tiny
    entry = report["methods"]["finetune"]
    stream = make_stream("permuted-digits", 2, 1)
    direct = engine.run(registry.create("finetune", preset("mlp"), {**entry["config"], "seed": 1}), stream,
                        TrainContext(progress=False), log=lambda _l: None)
    assert direct.acc_matrix == entry["runs"][1]["acc_matrix"]


@pytest.mark.slow  # the tiny comparison: 2 methods x 2 seeds + 1 order
def test_order_robustness_maps_positions_back_to_tasks(tiny):
    _, report = tiny
    robust = report["methods"]["finetune"]["order_robustness"]
    assert robust["orders"] == [[0, 1], [1, 0]]
    stream = make_stream("permuted-digits", 2, 0)
    reversed_stream = Stream(stream.name, stream.input_shape, stream.tasks[::-1])
    config = report["methods"]["finetune"]["config"]
    run = engine.run(registry.create("finetune", preset("mlp"), config), reversed_stream, TrainContext(progress=False),
                     log=lambda _l: None)
    assert robust["final_acc"][1] == run.acc_matrix[-1][::-1]
    assert robust["final_acc"][0] == report["methods"]["finetune"]["runs"][0]["acc_matrix"][-1]
    assert robust["opd"] == pytest.approx(opd(robust["final_acc"]).tolist())


@pytest.mark.slow  # the tiny comparison: 2 methods x 2 seeds + 1 order
def test_plots_are_readable_images(tiny):
    import matplotlib.image as mpimg

    out, report = tiny
    expected = {"acc_matrix_finetune", "acc_matrix_stl", "acc_bwt", "order_robustness"}
    assert expected <= set(report["plots"])
    for key, name in report["plots"].items():
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 300, (key, img.shape)
        assert img[..., :3].std() > 0.05, f"{key} looks blank"


@pytest.mark.slow  # the tiny comparison: 2 methods x 2 seeds + 1 order
def test_artifacts_and_runtime_columns(tiny):
    """One artifact per method and seed, STL grows by a whole model per task while finetune grows by a head; the
    runtime columns hold timings and a runtime accuracy equal to training's."""
    out, report = tiny
    ft, stl = report["methods"]["finetune"], report["methods"]["stl"]
    for entry in (ft, stl):
        for run in entry["runs"]:
            assert os.path.getsize(out / run["artifact"]) == run["artifact_bytes"] > 0
    assert stl["bytes_per_added_task"] > 10 * ft["bytes_per_added_task"] > 0
    assert set(report["pareto_front"]) <= {"finetune", "stl"} and report["pareto_front"]
    assert "pareto" in report["plots"] and "bytes" in report["plots"]
    runtime = ft["runtime"]
    assert "note" not in runtime, runtime["note"]  # a runtime failure is a failure here, not a skip
    assert runtime["switch_ms"] > 0 and runtime["infer_ms"] > 0 and runtime["switches"] == 2 * 2
    assert runtime["runtime_acc"] == pytest.approx(ft["runs"][0]["acc"], abs=0.01)


def test_pareto_front_hand_example():
    points = {"a": (1.0, 0.5), "b": (2.0, 0.7), "c": (3.0, 0.6), "d": (2.0, 0.7), "e": (0.5, 0.4),
              "g": (1.0, 0.45), "h": (4.0, 0.7), "none": (None, 0.99), "nan": (1.0, float("nan"))}
    # c is beaten by b (cheaper, better), g by a (same cost, better), h by b (same accuracy, cheaper);
    # b and d are identical, so neither dominates the other.
    assert pareto_front(points) == ["e", "a", "b", "d"]
    assert pareto_front({"only": (5.0, 0.1)}) == ["only"]
    assert pareto_front({}) == []


def test_opd_mopd_aopd_hand_example():
    final = [[0.90, 0.80, 0.70],   # order 0, final accuracy per task id
             [0.85, 0.90, 0.70],
             [0.95, 0.60, 0.75]]
    assert opd(final) == pytest.approx([0.10, 0.30, 0.05])
    assert mopd(final) == pytest.approx(0.30)
    assert aopd(final) == pytest.approx(0.15)
    assert opd([[0.5, 0.6]]).tolist() == [0.0, 0.0]  # one order: no disparity
    with pytest.raises(UsageError):
        opd([[0.5, float("nan")]])


def test_task_orders_are_distinct_permutations():
    orders = task_orders(4, 6, seed=3)
    assert orders[0] == [0, 1, 2, 3] and len(orders) == 6
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert len({tuple(o) for o in orders}) == 6
    assert task_orders(4, 6, seed=3) == orders
    assert len(task_orders(2, 3)) == 3  # more orders than permutations: repeats allowed, no endless loop


def test_seeds_and_epoch_scaling():
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("0,4,7") == [0, 4, 7]
    assert method_config("finetune", CompareSpec(epochs_scale=0.3), 5) == {
        **registry.method_class("finetune").Config().to_json(), "epochs": 3, "seed": 5}
    spec = CompareSpec(epochs_scale=0.01, overrides={"finetune": {"epochs": 7}})
    assert method_config("finetune", spec, 0)["epochs"] == 7  # an explicit override wins over the scale
    assert method_config("stl", spec, 0)["epochs"] == 1  # never below one epoch
    # nor below what the rest of the config needs: HALRP's later tasks need an epoch after the warm-up
    assert method_config("halrp", spec, 0)["epochs"] == 2
    with pytest.raises(UsageError, match="warmup_epochs must be in"):  # an explicit value is not raised
        method_config("halrp", CompareSpec(overrides={"halrp": {"epochs": 1}}), 0)
    default = registry.method_class("lps").Config().epochs
    assert method_config("lps", CompareSpec(epochs_scale=2.0), 0)["epochs"] == 2 * default  # scaled up too


@pytest.mark.parametrize("args, message", [
    (["--methods", "finetune,ewc"], "unknown method"),
    (["--methods", ""], "--methods is empty"),
    (["--stream", "no-such-stream"], "unknown stream"),
    (["--seeds", "0"], "--seeds"),
    (["--seeds", "x"], "--seeds"),
    (["--seeds", "1,1"], "--seeds"),
    (["--seeds", "-2"], "--seeds"),
    (["--orders", "1"], "--orders"),
    (["--epochs-scale", "0"], "--epochs-scale"),
    (["--config", "finetune.epoch=3"], "unknown config fields"),
    (["--config", "lps.epochs=3"], "not among --methods"),
    (["--config", "epochs=3"], "METHOD.FIELD=VALUE"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, args, message):
    base = {"--methods": "finetune", "--seeds": "1", "--tasks": "2"}
    given = dict(zip(args[::2], args[1::2]))
    argv = ["compare", *[x for k, v in {**base, **given}.items() for x in (k, v)], "--no-progress",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_method_module_is_skipped_not_fatal(tmp_path, monkeypatch):
    """A registered method whose module is absent from this build is reported and skipped; the rest still run."""
    monkeypatch.setitem(registry._METHODS, "ghost", registry.Entry("edgecl.train.methods.ghost_missing:Ghost",
                                                                   "edgecl.train.methods.ghost_missing_config:Config"))
    spec = CompareSpec(methods=["ghost", "stl"], seeds=[0], n_tasks=2, epochs_scale=0.1, progress=False,
                       timing_repeats=1)
    report = run_compare(spec, str(tmp_path), log=lambda _l: None)
    assert list(report["methods"]) == ["stl"] and "not available" in report["skipped"]["ghost"]
    assert "skipped ghost" in (tmp_path / "compare.md").read_text()
    with pytest.raises(UsageError, match="none of the requested methods"):
        run_compare(CompareSpec(methods=["ghost"], seeds=[0], n_tasks=2, progress=False), str(tmp_path / "b"))


def test_bench_train_smoke(tmp_path):
    bench = load_tool("bench_train")
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--methods", "stl", "--tasks", "2", "--repeats", "1", "--epochs-scale", "0.2",
                           "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = {r["label"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["finetune"]["ratio_vs_finetune"] == 1.0
    assert rows["stl"]["seconds_per_epoch"] > 0 and rows["stl"]["epochs_per_task"] == 2
    assert bench.main(["--methods", "nope", "--out", str(out)]) == 2


def test_stream_file_is_accepted_and_cut_to_tasks(tmp_path):
    """`--stream path.npz` (the documented user format) works, and --tasks takes its first tasks."""
    source = make_stream("split-digits", 3)
    arrays = {f"task{i}_{k}": getattr(t, k) for i, t in enumerate(source.tasks)
              for k in ("x_train", "y_train", "x_test", "y_test")}
    path = tmp_path / "mine.npz"
    np.savez(path, **arrays)
    out = tmp_path / "out"
    assert main(["compare", "--stream", str(path), "--methods", "stl", "--seeds", "1", "--tasks", "2",
                 "--epochs-scale", "0.1", "--timing-repeats", "1", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["stream"] == "mine" and report["n_tasks"] == 2
    assert report["task_names"] == ["mine-0", "mine-1"]
    assert main(["compare", "--stream", str(path), "--methods", "stl", "--tasks", "4", "--out", str(out)]) == 2
