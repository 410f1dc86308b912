"""Write-back after training, for the timm families added on 2026-12-01: each tiny module converted, trained from
its own weights (finetune, one epoch on real digits, so every tensor moves), the trained trunk written back into the
module (`to_module_state`: timm's keys and shapes, no key the module lacks, every float tensor given) and the task's
head put in the classifier's place: the module then computes what the trained spec computes. A tensor stored in
another layout (channels-last or tiled embeddings, bias parts, weight rows, MLP-made tables, rotary tables) written
back wrong shows here as another output."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from byoa_nets import TinyBotNet, TinyCoAtMlp, TinyHaloNet, TinyRelLambdaNet
from layer_nets_cait import TinyCoatStage, tiny_cait, tiny_convit
from layer_nets_vit import TinyNextViT, TinySHViT, tiny_crossvit, tiny_gcvit, tiny_pvt, tiny_tnt, tiny_volo
from torch import nn
from torch_nets import randomised_all
from vit_bias_nets import tiny_beit, tiny_eva, tiny_vit_relpos

from edgecl.arch import from_torch
from edgecl.arch.module_state import to_module_state
from edgecl.deltas import materialize
from edgecl.train import registry
from edgecl.train.data import make_stream
from edgecl.train.models import forward, from_numpy
from edgecl.train.protocol import TrainContext

FAMILIES = {"gcvit": tiny_gcvit, "volo": tiny_volo, "tnt": tiny_tnt, "convit": tiny_convit, "cait": tiny_cait,
            "coat": TinyCoatStage, "crossvit": tiny_crossvit, "botnet": TinyBotNet, "halonet": TinyHaloNet,
            "rel_lambda": TinyRelLambdaNet, "coat_mlp": TinyCoAtMlp, "beit": tiny_beit, "eva": tiny_eva,
            "eva_rope": lambda: tiny_eva(use_rot_pos_emb=True), "vit_relpos": tiny_vit_relpos, "pvt": tiny_pvt,
            "nextvit": TinyNextViT, "shvit": TinySHViT}


def _linear(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer


def _put_head(module: nn.Module, name: str, weight: np.ndarray, bias: np.ndarray) -> None:
    """The task's head as the module's classifier; CrossViT averages a head per branch over features [8 | 16]."""
    if name == "crossvit":
        for i, part in enumerate((slice(0, 8), slice(8, 24))):
            module.head[i] = _linear(2 * weight[:, part], bias)
        return
    path = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, leaf = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, _linear(weight, bias))


@pytest.fixture(scope="module")
def task():
    return make_stream("split-digits", 1, seed=0).tasks[0]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_trained_tensors_written_back_make_the_module_compute_the_trained_network(name, task):
    torch.manual_seed(0)
    module = randomised_all(FAMILIES[name]())
    spec = from_torch(module, (1, 8, 8))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    method = registry.create("finetune", spec, {"epochs": 1}, start=module)
    method.learn_task(0, task, TrainContext(progress=False))
    weights = materialize(method.pack(), 0)
    state = to_module_state(spec, {k: v for k, v in weights.items() if not k.startswith("head.")})
    own = module.state_dict()
    assert set(state) <= set(own) and all(tuple(own[k].shape) == np.shape(v) for k, v in state.items())
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    classifier = {"head.0", "head.1"} if name == "crossvit" else {linears[-1]}
    given = [k for k in own if own[k].is_floating_point() and k.rpartition(".")[0] not in classifier]
    assert [k for k in given if k not in state] == []  # every trunk tensor written (buffers of indices are not)
    assert any(not np.array_equal(state[k], before[k].numpy()) for k in state)  # training moved them
    module.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}, strict=False)
    _put_head(module, name, weights["head.weight"], weights["head.bias"])
    x = torch.from_numpy(task.x_test[:7])
    with torch.no_grad():
        want = forward(spec, from_numpy(weights), x).numpy()
        got = module.eval()(x).numpy()
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
