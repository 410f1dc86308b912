"""EfficientViM (timm's ``timm.models.efficientvim``): its HSM-SSD mixer kept whole as state_pool / state_read
(`edgecl.arch.fx_efficientvim`), with module parity; the two ops' torch and ONNX forms against numpy, their
validation and channels; what is still refused, by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from efficientvim_nets import TinyHsmNet, TinyVimNet, tiny_vim
from torch import nn
from torch_nets import check_parity, randomise_batchnorm, spec_logits

from edgecl.arch import channel_map, from_torch, validate
from edgecl.arch.fx_import import tensors_of
from edgecl.arch.module_state import state_keys, to_module_state
from edgecl.errors import UsageError

import timm  # noqa: E402  (efficientvim_nets set up the imports)


def _randomised(module: nn.Module) -> nn.Module:
    """Every tensor drawn away from its start (out_proj and dw start at 0 in timm, D at 1, A in [1, 16])."""
    torch.manual_seed(0)
    randomise_batchnorm(module)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.5)
    return module.eval()


@pytest.mark.parametrize("states,expand,shape", [(5, 1.0, (3, 6, 5)), (3, 1.5, (2, 4, 4)), (1, 0.5, (3, 3, 7))])
def test_tiny_hsm_parity_and_its_nodes(states, expand, shape):
    module = _randomised(TinyHsmNet(in_channels=shape[0], states=states, expand=expand))
    spec = from_torch(module, shape)
    check_parity(module, spec, shape)
    ops = [n["op"] for n in spec["nodes"]]
    assert ops.count("state_pool") == ops.count("state_read") == 1
    keys = state_keys(spec)
    assert keys["mixer.D.weight"] == "mixer.D"  # the bare parameter
    assert "mixer.A" not in keys.values()  # cancels in the softmax over the positions


def test_a_cancels_in_the_softmax():
    """A (one number per state, added at every position before the softmax over them) changes no output: the
    spec leaves it out because of that, not by oversight."""
    module = _randomised(TinyHsmNet(in_channels=3))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = module(x)
        module.mixer.A.add_(torch.linspace(-3.0, 5.0, module.mixer.A.numel()))
        assert torch.allclose(module(x), before, atol=1e-5)
        module.mixer.D.mul_(2.0)  # and D does
        assert not torch.allclose(module(x), before, atol=1e-3)


def _state_spec(states: int = 3, ch: int = 4, **bad) -> dict:
    nodes = [{"name": "x", "op": "conv", "inputs": ["input"], "in": 2, "out": ch, "k": 1},
             {"name": "l", "op": "conv", "inputs": ["input"], "in": 2, "out": 3 * states, "k": 1},
             {"name": "dt", "op": "slice", "inputs": ["l"], "start": 0, "stop": states},
             {"name": "b", "op": "slice", "inputs": ["l"], "start": states, "stop": 2 * states},
             {"name": "c", "op": "slice", "inputs": ["l"], "start": 2 * states, "stop": 3 * states},
             {"name": "h", "op": "state_pool", "inputs": bad.get("pool", ["x", "dt", "b"])},
             {"name": "y", "op": "state_read", "inputs": bad.get("read", ["h", "c"])},
             {"name": "f", "op": "flatten", "inputs": ["y"]}]
    return {"name": "states", "input_shape": [2, 5, 3], "output": "f", "nodes": nodes}


def test_state_ops_onnx_and_torch_equal_numpy():
    rng = np.random.default_rng(0)
    spec = validate(_state_spec())
    weights = {"x.weight": rng.normal(size=(4, 2, 1, 1)), "x.bias": rng.normal(size=4),
               "l.weight": rng.normal(size=(9, 2, 1, 1)), "l.bias": rng.normal(size=9),
               "head.weight": np.eye(60), "head.bias": np.zeros(60)}
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    x = torch.randn(3, 2, 5, 3, generator=torch.Generator().manual_seed(0))
    got = spec_logits(spec, weights, x).reshape(3, 4, 15)  # torch = ONNX, checked there
    a = x.numpy().reshape(3, 2, 15).astype(np.float64)
    xm = np.einsum("oi,nip->nop", weights["x.weight"][:, :, 0, 0], a) + weights["x.bias"][:, None]
    lm = np.einsum("oi,nip->nop", weights["l.weight"][:, :, 0, 0], a) + weights["l.bias"][:, None]
    dt, b, c = lm[:, :3], lm[:, 3:6], lm[:, 6:]
    soft = np.exp(dt - dt.max(2, keepdims=True))
    soft /= soft.sum(2, keepdims=True)
    h = np.einsum("ncp,nsp->ncs", xm, soft * b)
    want = np.einsum("ncs,nsp->ncp", h, c)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_state_ops_validation_and_channels():
    for bad, words in ((dict(pool=["x", "dt", "l"]), "state_pool needs a"), (dict(pool=["x", "dt"]), "inputs"),
                       (dict(read=["x", "c"]), "state_read needs"), (dict(read=["h", "l"]), "state_read needs")):
        with pytest.raises(UsageError, match=words):
            validate(_state_spec(**bad))
    cm = channel_map(validate(_state_spec()))
    assert cm.pinned == cm.ordered == {"l:0-3", "l:3-6", "l:6-9"}  # the states are positions; x's channels pass


def test_the_hidden_state_is_tokens_and_other_layers_are_refused_by_name():
    """The hidden state (B, C, S) is the (C, S, 1) state tokens swapped to token-last: its mean over the states
    goes in (EfficientViM's head pools it so); a mean over its channels is refused naming the line."""
    class ReadsState(TinyHsmNet):
        def forward(self, x):
            y, h = self.mixer(self.stem(x))
            return self.fc(y.mean([2, 3]) + h.mean(-1))

    class MixesState(TinyHsmNet):
        def forward(self, x):
            y, h = self.mixer(self.stem(x))
            return self.fc(y.mean([2, 3]) + h.mean(1).sum(-1, keepdim=True))

    module = _randomised(ReadsState(in_channels=3))
    check_parity(module, from_torch(module, (3, 6, 6)), (3, 6, 6))
    with pytest.raises(UsageError, match="mean") as err:
        from_torch(MixesState().eval(), (1, 8, 8))
    assert "test_efficientvim.py:" in str(err.value)
    module = TinyHsmNet()
    module.mixer.act = nn.GELU()
    with pytest.raises(UsageError, match="HSMSSD at 'mixer'.*its act is GELU"):
        from_torch(module.eval(), (1, 8, 8))
    module = TinyHsmNet()
    module.mixer.hz_proj.act = nn.ReLU()
    with pytest.raises(UsageError, match="'mixer.hz_proj' is .*no norm, no activation"):
        from_torch(module.eval(), (1, 8, 8))


@pytest.mark.parametrize("depth,states,shape", [(1, 4, (3, 6, 6)), (2, 3, (2, 5, 4))])
def test_tiny_blocks_parity_and_their_gates(depth, states, shape):
    module = _randomised(TinyVimNet(in_channels=shape[0], depth=depth, states=states))
    spec = from_torch(module, shape)
    check_parity(module, spec, shape)
    gates = [n for n in spec["nodes"] if n["op"] == "layer_scale"]
    assert [(g["module"], g["weight_rows"], g["sigmoid"]) for g in gates] == \
        [(f"blocks.{b}.alpha", [i, 4], True) for b in range(depth) for i in range(4)]


def test_the_gates_write_back_into_one_alpha():
    """The four gates of a block are rows of its one (4, C) alpha: read from it, and written back into it together
    (after training, say), each row where it came from; the module's other tensors round-trip too (A, left out, and
    the BatchNorms' counters and the classifier excepted)."""
    module = _randomised(TinyVimNet(in_channels=3, depth=2))
    spec = from_torch(module, (3, 6, 6))
    values = tensors_of(module, spec)
    assert np.array_equal(values["blocks.1.gate2.weight"], module.blocks[1].alpha[2].detach().numpy())
    values = {k: v + 1.0 for k, v in values.items()}  # trained: moved
    state, own = to_module_state(spec, values), module.state_dict()
    assert np.array_equal(state["blocks.1.alpha"], own["blocks.1.alpha"].numpy() + 1.0)
    left = {k for k in own if k not in state}
    assert left == {k for k in own if k.endswith(("num_batches_tracked", "mixer.A")) or k.startswith("fc.")}


def test_gate_validation_and_stored_form():
    """A σ gate's fields: rows held once by the nodes of one table, flags typed; left out of the stored form at
    their defaults (files without gates unchanged)."""
    from edgecl.arch.later_fields import at_default

    def spec(*rows, **fields) -> dict:
        nodes = [{"name": "c", "op": "conv", "inputs": ["input"], "in": 2, "out": 3, "k": 1}]
        for i, r in enumerate(rows):
            nodes.append({"name": f"g{i}", "op": "layer_scale", "inputs": [nodes[-1]["name"]], "ch": 3,
                          "sigmoid": True, "weight_rows": r, "module": "blk.alpha", **fields})
        nodes.append({"name": "f", "op": "flatten", "inputs": [nodes[-1]["name"]]})
        return {"name": "g", "input_shape": [2, 3, 3], "output": "f", "nodes": nodes}

    assert validate(spec([0, 2], [1, 2]))["nodes"][1]["weight_rows"] == [0, 2]
    for rows, words in ((([0, 2],), "row 1 of it is no node's"), (([0, 2], [0, 2]), "both name"),
                        (([2, 2],), "part < parts"), (([0, 2], [1, 3]), "different shapes")):
        with pytest.raises(UsageError, match=words):
            validate(spec(*rows))
    with pytest.raises(UsageError, match="sigmoid"):
        validate(spec([0, 1], sigmoid="yes"))
    assert at_default("layer_scale", "sigmoid", False, stored=True)
    assert not at_default("layer_scale", "sigmoid", True, stored=True)


def test_gate_onnx_equals_torch():
    spec = validate({"name": "g", "input_shape": [2, 3, 3], "output": "f", "nodes": [
        {"name": "c", "op": "conv", "inputs": ["input"], "in": 2, "out": 3, "k": 1},
        {"name": "g", "op": "layer_scale", "inputs": ["c"], "ch": 3, "sigmoid": True},
        {"name": "f", "op": "flatten", "inputs": ["g"]}]})
    rng = np.random.default_rng(0)
    weights = {"c.weight": rng.normal(size=(3, 2, 1, 1)), "c.bias": rng.normal(size=3),
               "g.weight": np.array([-3.0, 0.0, 2.0]), "head.weight": np.eye(27), "head.bias": np.zeros(27)}
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    x = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    got = spec_logits(spec, weights, x).reshape(2, 3, 9)
    conv = torch.nn.functional.conv2d(x, torch.from_numpy(weights["c.weight"]), torch.from_numpy(weights["c.bias"]))
    want = conv.reshape(2, 3, 9).numpy() / (1.0 + np.exp(-weights["g.weight"]))[None, :, None]
    assert np.abs(got - want).max() < 1e-5


def test_a_fused_block_or_another_mixer_is_refused():
    """A block is converted from its parts, not its forward: a fused one (its dwconvs folded) or one whose mixer
    is another module would be another network, so they are refused by name."""
    module = TinyVimNet().eval()
    module.blocks[0].fuse()
    with pytest.raises(UsageError, match="EfficientViMBlock at 'blocks.0'.*fused True"):
        from_torch(module, (1, 8, 8))
    module = TinyVimNet().eval()
    module.blocks[0].mixer = nn.Identity()
    with pytest.raises(UsageError, match="EfficientViMBlock at 'blocks.0'.*mixer Identity"):
        from_torch(module, (1, 8, 8))


@pytest.mark.parametrize("distilled", [False, True])
def test_tiny_efficientvim_parity_and_its_head(distilled):
    """timm's own EfficientViM (three stages, their hidden states and the last map pooled, each with a head, the
    heads' softmax-weighted sum; distilled: two such sums averaged): the features side by side, one head of them."""
    from timm.models.efficientvim import EfficientViMDistilled

    module = _randomised(tiny_vim() if not distilled else EfficientViMDistilled(
        num_classes=3, embed_dim=(16, 24, 32), depths=(1, 1, 1), state_dim=(4, 3, 2), mlp_ratio=2.0))
    spec = from_torch(module, (3, 48, 32))
    check_parity(module, spec, (3, 48, 32))
    out = next(n for n in spec["nodes"] if n["name"] == spec["output"])
    assert out["op"] == "cat" and len(out["inputs"]) == 4  # three hidden states and the last map
    assert sum(n["op"] == "state_pool" for n in spec["nodes"]) == 3


def test_the_whole_model_reads_and_writes_back_its_trunk():
    """Every trunk tensor of timm's EfficientViM is read from the module and written back to the same key in its
    shape (the α rows into their one tensor); left out: A (cancels), the BatchNorms' counters and the classifier
    (weights and heads, which edgecl's heads replace)."""
    module = _randomised(tiny_vim())
    spec = from_torch(module, (3, 32, 32))
    state, own = to_module_state(spec, tensors_of(module, spec)), module.state_dict()
    for key, value in state.items():
        assert np.array_equal(value, own[key].numpy()), key
    assert {k for k in own if k not in state} == {k for k in own if k.endswith(("num_batches_tracked", "mixer.A"))
                                                  or k == "weights" or k.startswith("heads.")}


def test_a_head_of_another_form_is_refused_by_name():
    """A head that is not an nn.Linear (here a Sequential around one) is no part of the weighted sum edgecl
    reads: refused naming timm's line."""
    module = tiny_vim()
    module.heads[1] = nn.Sequential(module.heads[1])
    with pytest.raises(UsageError, match="EfficientViM's head .*must multiply the output of heads") as err:
        from_torch(module.eval(), (3, 32, 32))
    assert "efficientvim.py:" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientvim_m1", "efficientvim_m2", "efficientvim_m3", "efficientvim_m4",
                                  "efficientvim_m1_dist", "efficientvim_m4_dist"])
def test_efficientvim_at_64(name):
    module = _randomised(timm.create_model(name, pretrained=False, num_classes=5))
    spec = from_torch(module, (3, 64, 64))
    check_parity(module, spec, (3, 64, 64))


@pytest.mark.slow
@pytest.mark.parametrize("method_name", ["lps", "stl", "rgo"])
def test_tiny_efficientvim_trains_and_deploys(method_name, tmp_path):
    """The whole small model through a method on 32×32 digits: the artifact's runtime gives training's accuracy and
    every exported graph the runtime's logits. (On the 8×8 digits of every method's graph run its /16 stem leaves
    1×1 maps, where float32 rounding alone moves its logits by 1.5e-4 (float64 measured), past those runs' 1e-4.)"""
    from test_methods_on_graphs import CTX, QUICK, _deploys

    from edgecl.train import registry
    from edgecl.train.data import make_stream

    stream = make_stream("permuted-digits", 2, 0, (3, 32, 32))
    method = registry.create(method_name, from_torch(tiny_vim(embed_dim=(8, 16, 16)), (3, 32, 32)),
                             dict(QUICK[method_name]))
    for t, task in enumerate(stream.tasks):
        method.learn_task(t, task, CTX)
    _deploys(method.pack(), stream, tmp_path)
