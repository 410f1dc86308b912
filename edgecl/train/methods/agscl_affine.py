"""AGS-CL past a scalar affine (PP-HGNetV2's learnable affine block, ``y = a·x + b`` with one number each): a node
whose every row the proximal step has made exactly zero is 0 up to the affine and b after it. Its readers' columns
read that b while the task trains, but (I.1) cuts them when the task ends (the node is unimportant), so the deployed
function would lose b·(reader column): measured on TinyHGNet (width 16, permuted digits, 3 epochs) 36.1 % trained
against 31.3 % deployed before this module; with it 33.7 % both, the logits equal (tasks 1, 2: 16.9 %, 14.4 %, where
12.4 %, 11.9 % were deployed before); at 10 epochs 42.4 % trained and 10.2 % (chance) deployed before, logits moved
by up to 6.3, and 39.3 % both with it.

Chosen fix: while a task trains, an affine's b reaches only the channels of *live* nodes — important for an earlier
task, or with any row not exactly zero (``y_c = a·x_c + b·live_c``). A zeroed node is then 0 all the way to its
readers, as on a network without affines, and the column cut after the task changes nothing it computed (the task's
Ω, BatchNorm recalibration and accuracy all read this same network). The gradient still reaches a zeroed node's rows
through a·x, so the lasso can let it revive (its b returns with it), as AGS-CL does on any graph. Nothing an earlier
task deploys changes: b and a are the task's own numbers, and important nodes are never masked.

A node can also be unimportant with rows not exactly zero (a ReLU silent on all of the task's data, Ω = 0, whose
rows the lasso has not finished shrinking; hgnetv2_b0's head conv after 2 epochs: 147 of them, tasks after the first
also the (I.2) redrawn rows): it is live while the task trains, so its channel is b past the affine, and the head's
columns that read it are cut after the task. There the cut is folded into the head's bias (`fold_into_head`): the
mean of each such feature over the task's data times its column — exact where the feature is a constant (b through
pooling and flattening, as in PP-HGNetV2's head: a head has no padding); where a data-dependent gate multiplies it
after the affine it is b·gate and the mean is the nearest constant, not exact. Before it, the deployed logits moved
by 0.0077 on hgnetv2_b0, by 0.087 on a TinyHGNet with an HGNetV2 head (task 1: 34.8 % trained, 32.2 % deployed) and
by 0.15 / 0.29 with lasso="euclidean"; after it by < 1e-6. In the trunk such a node's b is still lost at the cut
(see below why no fold there): measured 0 there on those runs.

Weighed and left: folding b·(column sum) into the reader's bias at the cut is exact only for unpadded readers (a
padded convolution's border windows read zeros there, not b — TinyHGNet's 3×3 layers do), needs a bias or the
task's BatchNorm statistics behind every reader, and leaves the b-shift in the task's Ω and recalibration.

Exact where every reader of the affine's channels reads them through conv/linear columns or the head, after
per-channel ops only (`column_read`; every PP-HGNetV2). An affine whose channels reach a channel-mixing op (LayerNorm,
GRN, ECA, attention, a branch softmax) keeps b on every channel: those ops read it in the deployed network too, which
no column mask removes, so masking it in training would open the gap it closes here. Its dead nodes' head columns
read b in training too, so their cut is folded into the head's bias as well (`carrying_b`: logits moved by 0.21 on a
TinyHGNet-like stem read by a LayerNorm and the head before); a conv/linear reading them directly still loses b at the
cut (0.052 measured on that net with a 1×1 conv added beside the LayerNorm: left, as for the trunk above).
"""
from __future__ import annotations

import numpy as np
import torch

from edgecl.arch import Arch, consumers, is_depthwise, node_by_name
from edgecl.arch.ops import ACTIVATIONS
from edgecl.arch.spec import node_shapes
from edgecl.train.methods.agscl_nodes import NodeMap
from edgecl.train.models import Params

# each output channel is computed from the same channel of its inputs: a masked channel stays the node's own
PER_CHANNEL_OPS = frozenset((*ACTIVATIONS, "bn", "layer_scale", "affine", "scalar_affine", "maxpool", "avgpool",
                             "gap", "upsample", "pad", "blur", "adaptive_avgpool", "bicubic", "scale", "add", "mul",
                             "cat", "slice", "shuffle", "space_to_depth", "flatten"))


def column_read(arch: Arch, name: str) -> bool:
    """True when every path from node `name` ends at a conv/linear reader (its columns) or at the heads, through
    per-channel ops only: there the deployed network removes a dead channel entirely, so training may too."""
    readers, nodes = consumers(arch), node_by_name(arch)
    todo, seen = [name], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for reader in readers[current]:
            node = nodes[reader]
            if node["op"] in ("conv", "linear") and not is_depthwise(node):
                continue
            if node["op"] not in PER_CHANNEL_OPS and not (node["op"] == "conv" and is_depthwise(node)):
                return False
            todo.append(reader)
    return True


def nonzero_nodes(tensors: dict[str, torch.Tensor], rows: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """Bool per node: some row of it (in any tensor of `rows`, node index per row) is not exactly zero."""
    count = None
    for k, idx in rows.items():
        w = tensors[k]
        count = torch.zeros(n, device=w.device) if count is None else count
        count.index_add_(0, idx, (w.reshape(w.shape[0], -1) != 0).any(1).to(count.dtype))
    return count > 0 if count is not None else torch.ones(n, dtype=torch.bool)


class BiasMasks:
    """Per column-read scalar affine: its b times the live mask of its output's channels (module docstring)."""

    def __init__(self, arch: Arch, nodes: NodeMap, device: str | torch.device = "cpu"):
        shapes = node_shapes(arch)
        self.n = nodes.n
        self.rows = {k: torch.from_numpy(idx).to(device) for k, idx in nodes.trainable.items()}
        self.channels: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}  # bias tensor → (node per channel, view)
        self.unmasked = torch.zeros(self.n + 1, dtype=torch.bool, device=device)  # past an affine keeping b everywhere
        for name, index in nodes.affines.items():
            if column_read(arch, name):
                view = (-1,) + (1,) * (len(shapes[name]) - 1)  # the channel axis of a map, token grid or features
                self.channels[f"{name}.bias"] = (torch.from_numpy(index).to(device), view)
            else:
                self.unmasked[torch.from_numpy(index).to(device)] = True
        self.live = torch.ones(self.n + 1, dtype=torch.bool, device=device)  # index −1: the network input

    def __bool__(self) -> bool:
        return bool(self.channels)

    def update(self, tensors: dict[str, torch.Tensor], important: torch.Tensor | np.ndarray) -> None:
        """Recompute which nodes are live from the current rows (after every step that can zero one)."""
        if not self.channels:
            return
        held = torch.as_tensor(important, device=self.live.device)
        self.live[:-1] = held | nonzero_nodes(tensors, self.rows, self.n).to(self.live.device)

    def apply(self, params: Params) -> Params:
        """`params` with each masked affine's b as a per-channel tensor (the same tensors otherwise, so running
        statistics a training forward updates land in `params`)."""
        if not self.channels:
            return params
        out = dict(params)
        for bias, (index, view) in self.channels.items():
            out[bias] = params[bias] * self.live[index].to(params[bias].dtype).reshape(view)
        return out

    def carrying_b(self, exact_zero: np.ndarray) -> np.ndarray:
        """Bool per node: its channels carried an affine's b in training — past a masked affine while its rows are
        not all zero, past an unmasked one (channel-mixing readers) always; where such a node is cut, its head
        columns' b is folded into the head's bias (`fold_into_head`)."""
        masked = torch.zeros(self.n + 1, dtype=torch.bool, device=self.live.device)
        for index, _ in self.channels.values():
            masked[index] = True
        return (masked[:-1].cpu().numpy() & ~exact_zero) | self.unmasked[:-1].cpu().numpy()


def fold_into_head(head: Params, mean: torch.Tensor | None, cut: np.ndarray) -> None:
    """Add to the head's bias what its columns `cut` (bool per feature) read on average over the task's training data
    (`mean`: the head's input features in the network the task trained, summed in AGS-CL's Ω pass, which reads that
    network bit for bit), before they are cut: the b a live but unimportant node carries past an affine (module
    docstring)."""
    if not cut.any():
        return
    if mean is None:
        raise ValueError("fold_into_head: columns to cut but no feature mean (update_omega(features=True))")
    keep = torch.from_numpy(cut)
    with torch.no_grad():
        head["head.bias"] += head["head.weight"][:, keep] @ mean[keep]
