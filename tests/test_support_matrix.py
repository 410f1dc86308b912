"""The README's support matrix, cell by cell: every method on every kind of network a user brings — the three presets,
torchvision resnet18 and mobilenet_v2, timm models (a ConvNeXt among them) and custom modules (a residual add and a
concat, channel slices, ConvNeXt blocks, channel shuffles, a Vision Transformer) and a TensorFlow port — through the
path a user takes: `edgecl train`'s pipeline (an `.npz` stream file, `--arch` as a preset, `module:factory`,
`timm:NAME` or `file.py:factory`) → artifact → the torch-free runtime and the exported ONNX. Two small real digit
tasks each, one or two epochs: the cell holds when training finishes, the runtime's accuracy per task equals
results.json's, every exported graph gives the runtime's logits, and the method's guarantee about the first task
holds (accuracy-level here; bit-level in the per-method tests). Accuracy at full size: tools/own_network_acceptance.py."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgecl import artifact
from edgecl.deltas import PackedModel, materialize
from edgecl.export import export_onnx
from edgecl.runtime import TaskRuntime
from edgecl.train.data import make_stream
from edgecl.train.models import forward
from edgecl.train.pipeline import train_and_write

pytestmark = pytest.mark.slow

METHODS = ["lps", "agscl", "halrp", "rgo", "finetune", "stl"]
QUICK = {"lps": {"epochs": 1}, "agscl": {"epochs": 2}, "halrp": {"epochs": 2}, "rgo": {"epochs": 1},
         "finetune": {"epochs": 1}, "stl": {"epochs": 1}}
# --arch value (the factory file is written per test) and the digits' input shape
NETWORKS = {
    "mlp": ("mlp", None),
    "lenet": ("lenet", None),
    "resnet preset": ("resnet", None),
    "torchvision resnet18": ("torchvision.models:resnet18", (3, 16, 16)),
    "torchvision mobilenet_v2": ("{factories}:mobilenet_v2_quarter", (3, 16, 16)),
    "timm mobilenetv3_small_050": ("timm:mobilenetv3_small_050", (3, 16, 16)),
    "custom residual + concat": ("{factories}:ResCat", (3, 8, 8)),
    "custom channel slices": ("{factories}:GhostSplit", (3, 8, 8)),
    "timm mixnet_s": ("timm:mixnet_s", (3, 16, 16)),
    "timm convnext_atto": ("timm:convnext_atto", (3, 32, 32)),
    "custom ConvNeXt (LayerNorm, layer scale)": ("{factories}:TinyConvNeXt3", (3, 8, 8)),
    "custom channel shuffle": ("{factories}:TinyShuffle3", (3, 8, 8)),
    "timm tf_mobilenetv3_small_minimal_100 (TensorFlow same padding)": ("timm:tf_mobilenetv3_small_minimal_100",
                                                                       (3, 16, 16)),
    "custom ViT (class token, attention)": ("{factories}:TinyViT3", (3, 8, 8)),
}
FACTORIES = '''
    import sys
    import torchvision  # first, as a user's file would (edgecl makes it importable where its ops cannot load)

    sys.path.insert(0, {tests!r})
    from torch_nets import GhostSplit, ResCat, TinyConvNeXt, TinyShuffle  # custom nn.Modules: a residual add,
    # concat, depthwise conv, SE gate; a ghost module cut by x[:, :c], split and chunk parts meeting in an add;
    # ConvNeXt and ShuffleNet in small
    from layer_nets import TinyViT  # a Vision Transformer in small


    def TinyViT3():
        return TinyViT(3, 3, dim=16)


    def TinyConvNeXt3():
        return TinyConvNeXt(in_channels=3, width=16)


    def TinyShuffle3():
        return TinyShuffle(in_channels=3, width=16)


    def mobilenet_v2_quarter():
        return torchvision.models.mobilenet_v2(width_mult=0.25)
'''
# what the README tells a user to set for these cells (RGO's default holds BatchNorm at the identity, which
# mobilenets cannot train without, and ResCat does not; resnet18's P per conv group is 85 MB at 512·9 inputs)
RGO_WITH_BATCHNORM = {"batchnorm": "task", "batch_size": 64, "lr": 0.01}
NETWORK_SETTINGS = {("rgo", "torchvision resnet18"): {"max_projection_bytes": 4 << 30},
                    ("rgo", "torchvision mobilenet_v2"): RGO_WITH_BATCHNORM,
                    ("rgo", "timm mobilenetv3_small_050"): {**RGO_WITH_BATCHNORM, "lr": 0.03},
                    ("rgo", "custom residual + concat"): {"batchnorm": "task"},
                    ("rgo", "custom channel slices"): {"batchnorm": "task"},
                    ("rgo", "custom channel shuffle"): {"batchnorm": "task"},
                    ("rgo", "timm mixnet_s"): {**RGO_WITH_BATCHNORM, "lr": 0.03},
                    ("rgo", "timm tf_mobilenetv3_small_minimal_100 (TensorFlow same padding)"):
                        {**RGO_WITH_BATCHNORM, "lr": 0.03}}
KEEPS_OLD_TASKS = {"lps", "agscl", "halrp", "stl"}  # BWT exactly 0
SAMPLES = 96  # training samples per task (test splits stay whole)


@pytest.fixture(scope="module")
def stream_files(tmp_path_factory):
    """Two split-digits tasks per input shape, written as the documented .npz stream layout."""
    folder, files = tmp_path_factory.mktemp("streams"), {}
    for shape in {shape for _, shape in NETWORKS.values()}:
        stream = make_stream("split-digits", 2, seed=0, input_shape=shape)
        arrays = {}
        for t, task in enumerate(stream.tasks):
            arrays.update({f"task{t}_x_train": task.x_train[:SAMPLES], f"task{t}_y_train": task.y_train[:SAMPLES],
                           f"task{t}_x_test": task.x_test, f"task{t}_y_test": task.y_test})
        files[shape] = folder / f"split-{'x'.join(map(str, shape or (1, 8, 8)))}.npz"
        np.savez(files[shape], **arrays)
    return files


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_deploys_and_keeps_its_promise_on_every_network(method, network, stream_files,
                                                                            tmp_path, request):
    arch, shape = NETWORKS[network]
    if "{factories}" in arch:
        path = tmp_path / "factories.py"
        path.write_text(textwrap.dedent(FACTORIES.format(tests=str(request.path.parent))))
        arch = arch.format(factories=path)
    config = {**QUICK[method], **NETWORK_SETTINGS.get((method, network), {})}
    out = tmp_path / "run"
    results = train_and_write(method, str(stream_files[shape]), str(out), arch_name=arch, overrides=config,
                              progress=False, log=lambda _: None)  # the file's own shape
    assert json.loads((out / "results.json").read_text())["acc_matrix"] == results["acc_matrix"]
    assert (out / "spec.json").exists()
    if method in KEEPS_OLD_TASKS:
        assert results["bwt"] == 0.0
    elif method == "finetune":
        assert results["acc_matrix"][-1][0] != results["acc_matrix"][0][0] or results["bwt"] <= 0

    stream = np.load(stream_files[shape])
    tasks = [(stream[f"task{t}_x_test"], stream[f"task{t}_y_test"]) for t in range(2)]
    model = str(out / "model.edgecl")
    with artifact.load(model) as opened:
        packed = opened.to_packed()
    index = export_onnx(model, str(tmp_path / "onnx"), progress=False)
    with TaskRuntime(model) as rt:
        for t, (x, y) in enumerate(tasks):
            logits = rt.infer(x, task=t)
            assert float((logits.argmax(1) == y).mean()) == results["acc_matrix"][-1][t]
            graph = ort.InferenceSession(str(tmp_path / "onnx" / index["tasks"][t]["file"]),
                                         providers=["CPUExecutionProvider"])
            assert np.abs(graph.run(None, {"x": x})[0] - logits).max() <= tolerance(packed, t, x, logits)


def tolerance(packed: PackedModel, t: int, x: np.ndarray, logits: np.ndarray) -> float:
    """1e-4 of the logits' scale, or — for a model that float32 cannot evaluate that closely — 4× the distance
    between its float32 and float64 forwards in torch (its own rounding sensitivity: no two float32 kernels agree
    more closely than that)."""
    weights = materialize(packed, t)
    out = [forward(packed.arch, {k: torch.tensor(np.asarray(v), dtype=dtype) for k, v in weights.items()},
                   torch.tensor(x, dtype=dtype), train=False).double().numpy() for dtype in (torch.float32, torch.float64)]
    return max(1e-4 * max(1.0, float(np.abs(logits).max())), 4 * float(np.abs(out[0] - out[1]).max()))
