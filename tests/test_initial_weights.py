"""Starting weights (`registry.create(..., start=)`, `edgecl train --init-weights`): every method trains from the
given trunk values instead of a fresh draw, the artifact records which, a resume insists on the same start, and
every bad source is refused naming the file and tensor."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from cli_run import run_cli
from safetensors.numpy import save_file
from torch import nn
from torch_nets import ResCat, randomise_batchnorm

from edgecl.arch import from_torch, param_shapes
from edgecl.deltas import materialize
from edgecl.errors import EdgeclWarning, UsageError
from edgecl.train import engine, registry
from edgecl.train.data import make_stream
from edgecl.artifact.report import INITIAL_WEIGHTS as RECORD_KEY
from edgecl.train.initial import starting_weights
from edgecl.train.protocol import TrainContext

METHODS = ["lps", "agscl", "halrp", "rgo", "finetune", "stl"]
# lr ~0: after one epoch the trunk is still where it started, up to what the method itself does to it (pruning,
# AGS-CL's proximal shrink of unimportant groups); HALRP needs a warm-up epoch before its first task's end
FROZEN = {"epochs": 1, "lr": 1e-9}
FROZEN_CONFIG = {"halrp": {"epochs": 2, "warmup_epochs": 1, "lr": 1e-9}, "rgo": {**FROZEN, "batchnorm": "task"}}


def _mlp() -> nn.Module:
    torch.manual_seed(7)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                        nn.Linear(32, 10))
    with torch.no_grad():
        net[2].weight.uniform_(0.5, 1.5)
        net[2].bias.uniform_(-0.2, 0.2)
    return net


def _trained_trunk(name: str, spec, start, state: dict[str, np.ndarray]) -> tuple[dict, dict, dict]:
    """One task learned at lr ~0: (the trunk tensors as deployed, the same tensors of `state` as they compare, the
    packed extra). RGO's tasks see feature-permuted copies of its trunk: its shared base is compared as it is (the
    trunk's own channel order), its per-task BatchNorm by sorted values (a permutation of channels keeps them)."""
    method = registry.create(name, spec, FROZEN_CONFIG.get(name, FROZEN), start=start)
    packed = engine.run(method, make_stream("split-digits", 1, 0, tuple(spec["input_shape"])),
                        TrainContext(progress=False), log=lambda *_: None).packed
    deployed, expected = materialize(packed, 0), dict(state)
    if name == "rgo":
        for k in deployed:
            if k in packed.base:
                deployed[k] = packed.base[k]
            elif k in expected:
                deployed[k], expected[k] = np.sort(deployed[k], axis=None), np.sort(expected[k], axis=None)
    return deployed, expected, packed.extra


def _learned_tensors(spec) -> list[str]:
    return [k for k in param_shapes(spec) if "running_" not in k]


def _close_to(trained: np.ndarray, start: np.ndarray) -> bool:
    """Equal on every entry the method kept (pruned entries are 0), within 1 % of the tensor's scale."""
    kept = trained != 0
    return bool(kept.any()) and float(np.abs(trained[kept] - start[kept]).max()) <= 1e-2 * float(np.abs(start).max())


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_from_the_given_weights(name):
    net = _mlp()
    spec = from_torch(net, (1, 8, 8))
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    trained, expected, extra = _trained_trunk(name, spec, net, state)
    for k in _learned_tensors(spec):
        assert _close_to(trained[k], expected[k]), f"{name}: {k} did not start from the given weights"
    assert extra[RECORD_KEY] == starting_weights(net, spec).record()
    fresh, expected, extra = _trained_trunk(name, spec, None, state)  # the check can fail: a fresh draw differs
    assert not all(_close_to(fresh[k], expected[k]) for k in _learned_tensors(spec) if k.endswith(".weight"))
    assert RECORD_KEY not in extra


@pytest.mark.parametrize("name", ["lps", "agscl"])
def test_a_residual_conv_net_with_batchnorm_starts_from_its_weights(name):
    net = ResCat(classes=2, in_channels=1, width=8)
    randomise_batchnorm(net)
    spec = from_torch(net, (1, 8, 8))
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    trained, expected, _ = _trained_trunk(name, spec, net, state)
    for k in _learned_tensors(spec):
        assert _close_to(trained[k], expected[k]), f"{name}: {k}"


def test_files_and_modules_give_the_same_start(tmp_path):
    net = _mlp()
    spec = from_torch(net, (1, 8, 8))
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    np.savez(tmp_path / "w.npz", **state)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    digests = {starting_weights(src, spec).sha256 for src in (net, state, str(tmp_path / "w.npz"),
                                                               str(tmp_path / "w.safetensors"))}
    assert len(digests) == 1
    half = {k: v.astype(np.float16) for k, v in state.items() if v.dtype == np.float32}
    assert starting_weights(half, spec).sha256 not in digests  # other values, another start


def test_bad_starting_weights_are_refused_naming_the_tensor(tmp_path):
    net = _mlp()
    spec = from_torch(net, (1, 8, 8))
    state = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    with pytest.raises(UsageError, match=r"no starting value for 1 of the 8 trunk tensors \(4.bias\)"):
        starting_weights({k: v for k, v in state.items() if k != "4.bias"}, spec)
    with pytest.raises(UsageError, match=r"'1.weight' has shape \(48, 63\), the architecture needs \(48, 64\)"):
        starting_weights({**state, "1.weight": state["1.weight"][:, :63]}, spec)
    bad = state["4.weight"].copy()
    bad[3, 4] = np.nan
    with pytest.raises(UsageError, match=r"'4.weight' holds 1 NaN"):
        starting_weights({**state, "4.weight": bad}, spec)
    with pytest.raises(UsageError, match=r"'1.bias' has dtype int64"):
        starting_weights({**state, "1.bias": np.zeros(48, np.int64)}, spec)
    with pytest.raises(UsageError, match=r"'2.running_var' holds negative variances"):
        starting_weights({**state, "2.running_var": -np.ones(48, np.float32)}, spec)
    with pytest.raises(UsageError, match="not list"):
        starting_weights([1, 2], spec)


def test_bad_weight_files_are_refused_before_their_data_is_read(tmp_path):
    net = _mlp()
    spec = from_torch(net, (1, 8, 8))
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    np.savez(tmp_path / "big.npz", **{**state, "1.weight": np.zeros((48, 64, 1000), np.float32)})
    with pytest.raises(UsageError, match=r"big.npz: tensor '1.weight' has shape \(48, 64, 1000\)"):
        starting_weights(str(tmp_path / "big.npz"), spec)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "big.npz").read_bytes()[:5000])
    with pytest.raises(UsageError, match="cut.npz: not a readable .npz file"):
        starting_weights(str(tmp_path / "cut.npz"), spec)
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(UsageError, match="bad.safetensors: not a readable .safetensors file"):
        starting_weights(str(tmp_path / "bad.safetensors"), spec)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(UsageError, match="w.pt: torch checkpoints are pickles"):
        starting_weights(str(tmp_path / "w.pt"), spec)
    with pytest.raises(UsageError, match="missing.npz: file not found"):
        starting_weights(str(tmp_path / "missing.npz"), spec)


def test_batchnorm_held_at_identity_says_the_start_loses_it():
    net = _mlp()
    spec = from_torch(net, (1, 8, 8))
    with pytest.warns(EdgeclWarning, match="batchnorm=task keeps them"):
        registry.create("rgo", spec, {}, start=net)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EdgeclWarning)
        registry.create("rgo", spec, {"batchnorm": "task"}, start=net)


NET_PY = """
import numpy as np, torch
from torch import nn

def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))

def pretrained():  # a factory that loads the user's checkpoint: their own code, their own format
    net = build()
    with np.load(__file__.replace("net.py", "weights.npz")) as z:
        net.load_state_dict({k: torch.from_numpy(z[k]) for k in z.files})
    return net
"""


def _net_py_and_weights(tmp_path) -> nn.Module:
    """NET_PY as tmp_path/net.py, and the weights its `pretrained` factory loads (tmp_path/weights.npz): the net."""
    (tmp_path / "net.py").write_text(NET_PY)
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
    np.savez(tmp_path / "weights.npz", **{k: v.numpy() for k, v in net.state_dict().items()})
    return net


def test_cli_trains_from_a_module_or_file_and_a_resume_needs_the_same_start(tmp_path, capsys):
    net = _net_py_and_weights(tmp_path)
    common = ["train", "--method", "lps", "--stream", "split-digits", "--set", "epochs=2", "--no-progress"]
    code, _, err = run_cli(capsys, *common, "--tasks", "1", "--arch", f"{tmp_path}/net.py:build",
                           "--init-weights", str(tmp_path / "weights.npz"), "--out", str(tmp_path / "a"))
    assert code == 0, err
    code, _, err = run_cli(capsys, *common, "--tasks", "1", "--arch", f"{tmp_path}/net.py:pretrained",
                           "--init-weights", "module", "--out", str(tmp_path / "b"))
    assert code == 0, err
    records = [json.loads((tmp_path / d / "results.json").read_text())["method_info"][RECORD_KEY] for d in "ab"]
    assert records[0]["sha256"] == records[1]["sha256"] == starting_weights(net, from_torch(net, (1, 8, 8))).sha256
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "b" / "model.edgecl"))
    assert code == 0 and "trained from starting weights the module of --arch net.py:pretrained (sha256" in out
    resume = ["train", "--method", "lps", "--stream", "split-digits", "--tasks", "1", "--no-progress", "--resume",
              str(tmp_path / "a" / "model.edgecl")]
    code, _, err = run_cli(capsys, *resume, "--out", str(tmp_path / "c"))
    assert code == 2 and "trained from starting weights" in err and "pass the same --init-weights" in err
    code, _, err = run_cli(capsys, *resume, "--arch", f"{tmp_path}/net.py:build", "--init-weights", "module",
                           "--out", str(tmp_path / "c"))  # build's own fresh weights: another start
    assert code == 2 and "trained from other starting weights" in err
    code, _, err = run_cli(capsys, *resume, "--init-weights", str(tmp_path / "weights.npz"), "--out",
                           str(tmp_path / "c"))
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "results.json").read_text())["method_info"][RECORD_KEY] == records[0]


def test_cli_refuses_an_init_source_that_cannot_work(tmp_path, capsys):
    base = ["train", "--method", "lps", "--stream", "split-digits", "--tasks", "1", "--out", str(tmp_path / "o")]
    code, _, err = run_cli(capsys, *base, "--arch", "mlp", "--init-weights", "module")
    assert code == 2 and "--arch mlp is a preset or a saved spec" in err
    code, _, err = run_cli(capsys, *base, "--init-weights", str(tmp_path / "none.npz"))
    assert code == 2 and "none.npz: file not found" in err
    code, _, err = run_cli(capsys, *base, "--init-weights", "weights.pt")
    assert code == 2 and "torch checkpoints are pickles" in err
    np.savez(tmp_path / "other.npz", **{"1.weight": np.zeros((4, 64), np.float32)})
    code, _, err = run_cli(capsys, *base, "--init-weights", str(tmp_path / "other.npz"), "--set", "epochs=1")
    assert code == 2 and "no starting value for 4 of the 4 trunk tensors (fc1.weight" in err and "holds 1.weight" in err
    assert not (tmp_path / "o" / "model.edgecl").exists()


def test_methods_that_never_draw_again_resume_without_the_start_and_keep_its_record(tmp_path, capsys):
    _net_py_and_weights(tmp_path)
    common = ["train", "--method", "halrp", "--stream", "split-digits", "--no-progress", "--tasks", "1"]
    code, _, err = run_cli(capsys, *common, "--arch", f"{tmp_path}/net.py:build", "--set", "epochs=2",
                           "--init-weights", str(tmp_path / "weights.npz"), "--out", str(tmp_path / "a"))
    assert code == 0, err
    code, _, err = run_cli(capsys, *common, "--resume", str(tmp_path / "a" / "model.edgecl"), "--out",
                           str(tmp_path / "b"))
    assert code == 0, err  # HALRP draws its trunk once, for task 0's base: the file is not needed again
    info = [json.loads((tmp_path / d / "results.json").read_text())["method_info"][RECORD_KEY] for d in "ab"]
    assert info[0] == info[1] and info[0]["source"] == "weights.npz"  # the file's name, not where it lay


def test_a_malformed_start_record_in_an_artifact_is_refused_on_resume():
    from edgecl.train.initial import check_resumed_start

    for bad in ("forged", {"sha256": 5, "source": "x"}, ["a"]):
        with pytest.raises(UsageError, match=r"m.edgecl: extra\['initial_weights'\] is not a record"):
            check_resumed_start({RECORD_KEY: bad}, None, "m.edgecl", redraws=True)


def test_a_trunk_layer_from_torch_renames_keeps_its_state_dict_key():
    """A trunk layer called `head` is renamed in the spec (head.* are the per-task heads); its weights are still
    found under the module's own key, from the module and from a file."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.head, self.fc = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 1), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.head(torch.relu(self.stem(x))).mean((2, 3)))

    net = Net()
    spec = from_torch(net, (1, 8, 8))
    renamed = next(n for n in spec["nodes"] if n.get("module") == "head")
    assert renamed["name"] != "head"
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    start = starting_weights(net, spec)
    assert np.array_equal(start.values[f"{renamed['name']}.weight"], state["head.weight"])
    assert starting_weights(state, spec).sha256 == start.sha256
    from edgecl.arch.fx_import import tensors_of

    assert np.array_equal(tensors_of(net, spec)[f"{renamed['name']}.bias"], state["head.bias"])


def test_agscl_reinitialises_unimportant_nodes_to_the_starting_rows():
    """AGS-CL's (I.2) gives a share ρ of the unimportant nodes fresh rows for the next task: with starting weights,
    those rows are the start's (ρ = 1: every unimportant node)."""
    net = _mlp()
    spec = from_torch(net, (1, 8, 8))
    method = registry.create("agscl", spec, {"epochs": 3, "mu": 8.0, "rho": 1.0}, start=net)
    method.learn_task(0, make_stream("split-digits", 1, 0, None).tasks[0], TrainContext(progress=False))
    dead = ~method.alive[0]
    assert dead.any()
    for tensor, rows in method.nodes.trainable.items():
        picked = torch.from_numpy(dead[rows])
        got = method.trunk[tensor].reshape(len(rows), -1)[picked]
        want = torch.from_numpy(method.start.values[tensor]).reshape(len(rows), -1)[picked]
        assert torch.equal(got, want), tensor


def test_weight_files_and_arrays_in_every_form_a_user_has(tmp_path):
    """bfloat16 safetensors, torch parameters in a dict, an upper-case suffix: read as float32; a duplicated
    member, a folder, a FIFO and an empty path: refused by name."""
    import os

    from safetensors.torch import save_file as save_torch

    net = _mlp()
    spec = from_torch(net, (1, 8, 8))
    want = starting_weights(net, spec).sha256
    save_torch({k: v.to(torch.bfloat16).contiguous() for k, v in net.state_dict().items()},
               str(tmp_path / "w.safetensors"))
    bf16 = starting_weights(str(tmp_path / "w.safetensors"), spec)
    assert bf16.values["1.weight"].dtype == np.float32 and bf16.sha256 != want  # bfloat16 rounded the values
    assert starting_weights({**dict(net.named_parameters()), **dict(net.named_buffers())}, spec).sha256 == want
    with open(tmp_path / "W.NPZ", "wb") as f:  # np.savez would append .npz to a name that lacks it in lower case
        np.savez(f, **{k: v.numpy() for k, v in net.state_dict().items()})
    assert starting_weights(str(tmp_path / "W.NPZ"), spec).sha256 == want
    import zipfile

    with zipfile.ZipFile(tmp_path / "W.NPZ") as src, zipfile.ZipFile(tmp_path / "dup.npz", "w") as dst:
        for member in src.infolist():
            dst.writestr(member, src.read(member))
        with warnings.catch_warnings():  # zipfile warns, and writes it
            warnings.simplefilter("ignore")
            dst.writestr("1.weight.npy", src.read("1.weight.npy"))
    with pytest.raises(UsageError, match=r"dup.npz: holds '1.weight' twice"):
        starting_weights(str(tmp_path / "dup.npz"), spec)
    os.mkdir(tmp_path / "folder.npz")
    os.mkfifo(tmp_path / "fifo.npz")
    for name in ("folder.npz", "fifo.npz"):
        with pytest.raises(UsageError, match=f"{name}: not a regular file"):
            starting_weights(str(tmp_path / name), spec)
    with pytest.raises(UsageError, match="an empty path"):
        starting_weights("", spec)
