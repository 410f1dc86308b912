"""EfficientViM (timm's ``timm.models.efficientvim``): its HSM-SSD mixer kept whole as state_pool / state_read
(`edgecl.arch.fx_efficientvim`), with module parity; the two ops' torch and ONNX forms against numpy, their
validation and channels; what is still refused, by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from efficientvim_nets import TinyHsmNet
from torch import nn
from torch_nets import check_parity, randomise_batchnorm, spec_logits

from edgecl.arch import channel_map, from_torch, validate
from edgecl.arch.module_state import state_keys
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


def test_a_read_hidden_state_and_other_layers_are_refused_by_name():
    class ReadsState(TinyHsmNet):
        def forward(self, x):
            y, h = self.mixer(self.stem(x))
            return self.fc(y.mean([2, 3]) + h.mean(-1))

    with pytest.raises(UsageError, match="HSMSSD at 'mixer': its hidden state .* is read") as err:
        from_torch(ReadsState().eval(), (1, 8, 8))
    assert "test_efficientvim.py:" in str(err.value)
    module = TinyHsmNet()
    module.mixer.act = nn.GELU()
    with pytest.raises(UsageError, match="HSMSSD at 'mixer'.*its act is GELU"):
        from_torch(module.eval(), (1, 8, 8))
    module = TinyHsmNet()
    module.mixer.hz_proj.act = nn.ReLU()
    with pytest.raises(UsageError, match="'mixer.hz_proj' is .*no norm, no activation"):
        from_torch(module.eval(), (1, 8, 8))


def test_efficientvim_models_are_still_refused_at_their_gates():
    """Its blocks' sigmoid-gated residuals and its fused head are not converted yet: refused, naming the line."""
    module = timm.create_model("efficientvim_m1", pretrained=False, num_classes=5)
    with pytest.raises(UsageError, match="sigmoid") as err:
        from_torch(module.eval(), (3, 64, 64))
    assert "efficientvim.py:" in str(err.value)
