"""Window arithmetic of convolutions and pools along one spatial axis: torch's output length (ceil_mode included) and
the pools whose output ONNX and torch disagree on, refused before a graph is built (`edgecl.arch.spec`)."""
from __future__ import annotations

from typing import Any

from edgecl.errors import UsageError


def window_length(size: int, k: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """Output length of a conv/pool window along one axis (torch's rule, ceil_mode included)."""
    span = size + 2 * pad - dilation * (k - 1) - 1
    if span < 0:
        return 0
    n = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (n - 1) * stride >= size + pad:  # the last window must start inside the input or left pad
        n -= 1
    return n


def check_pool_windows(node: dict[str, Any], x: list[int], out: list[int], where: str) -> None:
    """Pools whose output ONNX and torch disagree on are refused: with ceil_mode, a last window starting in the right
    padding is dropped by torch (and ONNX Runtime's kernel) but counted by ONNX's shape rule, so a built graph fails
    or mis-sizes; a dilated max-pool window that holds padding only gives -inf in torch, -FLT_MAX in ONNX Runtime."""
    for a in range(2):
        size, k, stride, pad = x[1 + a], node["k"][a], node["stride"][a], node["pad"][a]
        dil = node.get("dilation", [1, 1])[a]
        onnx_rule = -(-(size + 2 * pad - dil * (k - 1) - 1) // stride) + 1 if node["ceil_mode"] else out[a]
        if onnx_rule != out[a]:
            raise UsageError(f"{where}: with ceil_mode the last window along axis {a} would start in the padding "
                             f"(input {size}, k {k}, stride {stride}, pad {pad}): ONNX sizes the output {onnx_rule}, "
                             f"torch {out[a]}; use ceil_mode=false or less padding")
        if dil > 1 and size < dil:  # only then can a window step over every input element (k ≤ 2 when it fits)
            for i in range(min(out[a], -(-pad // stride))):  # windows starting in the left padding
                start = i * stride - pad
                if start % dil >= size or -(-(-start) // dil) > k - 1:
                    raise UsageError(f"{where}: window {i} along axis {a} covers padding only (input {size}, k {k}, "
                                     f"dilation {dil}, pad {pad}): its maximum is undefined")


def conv_window_shape(node: dict[str, Any], x: list[int], where: str) -> list[int]:
    """Output shape of a conv with ``window`` [wh, ww] (EfficientViT-MSRA's depthwise conv on q): the conv runs on each
    wh × ww window of the (C, H, W) input on its own, its padding zeros at every window's border; the windows' outputs
    are put back side by side. The windows must tile the map (a user pads it first) and each give an output."""
    wh, ww = node["window"]
    if x[1] % wh or x[2] % ww:
        raise UsageError(f"{where}: conv window {node['window']} does not tile the {x[1]}×{x[2]} map; pad the map "
                         "to a multiple of the window first")
    out = [window_length(size, node["k"][a], node["stride"][a], node["pad"][a], node["dilation"][a], False)
           for a, size in enumerate((wh, ww))]
    if min(out) <= 0:
        raise UsageError(f"{where}: the kernel {node['k']} does not fit the conv window {node['window']}; each "
                         "window's output would be empty")
    return [node["out"], x[1] // wh * out[0], x[2] // ww * out[1]]
