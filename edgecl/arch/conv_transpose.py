"""The ``conv_transpose`` op: a transposed convolution, torch's ``nn.ConvTranspose2d`` / ``F.conv_transpose2d`` and
ONNX's ConvTranspose (decoders, U-Nets, upsampling heads; LowFormer's and CPUBone's transposed-conv upsampling).

Fields: ``in``, ``out``, ``k``, ``stride``, ``pad`` (torch's ``padding``: rows/columns cut from each side of the full
output), ``output_padding`` (rows/columns added at the bottom and right only; each below the stride: ONNX Runtime's
rule, stricter than torch's max(stride, dilation)), ``dilation``, ``groups`` (dividing ``in`` and ``out``),
``bias``. Its weight is stored as torch stores it, ``(in, out/groups, kh, kw)``: axis 0 is the *input* channels and
its output channels are axis 1 (group by group), the bias ``(out,)``. Each output side is (n − 1)·stride − 2·pad +
dilation·(k − 1) + output_padding + 1.

Channels: the weight's axes are not a conv's (rows = outputs), so no per-channel rule (node masks, pruning,
compaction, permutations, projections, low-rank factors) reads them: like an attention's bias table its tensors
belong to no channel (`ops.ROWLESS_OPS`: RGO, HALRP and AGS-CL keep them per task; LPS, as its biases, learns them on
the first task and freezes them), and its input's and output's channels are pinned and ordered
(`edgecl.arch.channels`): none removed, none moved.
"""
from __future__ import annotations

from typing import Any

from edgecl.arch.limits import MAX_ACTIVATION
from edgecl.errors import UsageError

CONV_TRANSPOSE_FIELDS: dict[str, tuple[str, Any]] = {
    "in": ("size", ...), "out": ("size", ...), "k": ("pair", ...), "stride": ("pair", [1, 1]),
    "pad": ("pad", [0, 0]), "output_padding": ("pad", [0, 0]), "dilation": ("pair", [1, 1]),
    "groups": ("size", 1), "bias": ("bool", True)}


def conv_transpose_fields(out: dict[str, Any], where: str) -> None:
    """``groups`` divides ``in`` and ``out``; each ``output_padding`` below the stride: torch allows it below
    max(stride, dilation), but ONNX Runtime's ConvTranspose refuses one of at least the stride, so such a node
    would train and then not deploy."""
    g = out["groups"]
    if out["in"] % g or out["out"] % g:
        raise UsageError(f"{where}: conv_transpose groups={g} must divide in={out['in']} and out={out['out']}")
    for a in range(2):
        if out["output_padding"][a] >= out["stride"][a]:
            raise UsageError(f"{where}: conv_transpose output_padding {out['output_padding']} must be below the "
                             f"stride {out['stride']} on each axis (ONNX Runtime's ConvTranspose refuses more)")


def conv_transpose_shape(node: dict[str, Any], x: list[int], where: str) -> list[int]:
    """Output (out, H', W') of a ``conv_transpose`` on a (in, H, W) map; UsageError when the input does not fit or
    the padding cuts the whole output."""
    if len(x) != 3 or x[0] != node["in"]:
        raise UsageError(f"{where}: conv_transpose expects a ({node['in']}, height, width) map, gets {x}")
    hw = [(x[1 + a] - 1) * node["stride"][a] - 2 * node["pad"][a] + node["dilation"][a] * (node["k"][a] - 1) +
          node["output_padding"][a] + 1 for a in range(2)]
    if min(hw) <= 0:
        raise UsageError(f"{where}: conv_transpose pad {node['pad']} cuts the whole output of {x}")
    if (columns := conv_transpose_intermediates(node, [x])) > MAX_ACTIVATION:
        raise UsageError(f"{where}: conv_transpose of a {x} map by a {node['k']} kernel to {node['out']} channels "
                         f"spreads {columns} column values per sample (out·kh·kw·H·W), more than {MAX_ACTIVATION}")
    return [node["out"], *hw]


def conv_transpose_intermediates(node: dict[str, Any], ins: list[list[int]]) -> int:
    """Elements per sample ONNX Runtime's ConvTranspose computes before scattering them into the output: every
    input position times each output channel's kh × kw taps (its col2im buffer), out·kh·kw·H·W. A small spec (a big
    kernel over a big map) could ask for gigabytes of it, so `conv_transpose_shape` bounds it as an activation."""
    _, h, w = ins[0]
    return node["out"] * node["k"][0] * node["k"][1] * h * w


def conv_transpose_tensor_shapes(node: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Its weight as torch stores it, (in, out/groups, kh, kw), and its (out,) bias."""
    weight = (node["in"], node["out"] // node["groups"], *node["k"])
    return {"weight": weight, **({"bias": (node["out"],)} if node["bias"] else {})}
