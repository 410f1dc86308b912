"""An attention's MLP-generated relative position bias (``bias_table`` "mlp", ``bias_mlp`` the hidden width): its
table of (heads, offsets) is an MLP of each relative offset's fixed log coordinates, fc1 (hidden, 2), ReLU, fc2
(heads, hidden), so what trains is the MLP's weights (as in the module), not the table. ``bias_mlp_form`` says which
module's MLP it is — its coordinates, its output and where the module keeps its tensors:

    absent        timm's RelPosMlp (coatnet_rmlp_*, maxvit_rmlp_*): sign·ln(1 + |offset|), fc2 with a bias; tensors
                  under the node's module at ``mlp.fc1`` / ``mlp.fc2``
    "swin_v2"     timm's Swin V2 continuous position bias: each offset divided by (s − 1) of ``bias_mlp_span`` [sh, sw]
                  (the window, or the pretrained one, it was built for: at least 1), times 8, then
                  sign·log2(1 + |c|) / 3; fc2 without a bias; the table 16·sigmoid(fc2(…)); ``cpb_mlp.0`` / ``.2``
    "swin_v2_cr"  timm's Swin V2-CR meta MLP: RelPosMlp's coordinates and MLP, its tensors at ``meta_mlp.fc1`` /
                  ``.fc2``, and its cosine attention's ``logit_scale`` stored ``(heads,)`` (not ``(heads, 1, 1)``)
    "rel_pos_swin" timm's RelPosMlp of mode 'swin' (the relative-position ViT's rel_pos_type 'mlp_swin'): Swin V2's
                  coordinates, ``bias_mlp_span`` and 16·sigmoid, fc2 without a bias, its tensors at ``mlp.fc1`` /
                  ``.fc2``

The offsets span the window (or q's map), row-major: row (dy + H − 1)(2W − 1) + dx + W − 1, which ``bias_index``
reads (Swin's relative_position_index). `edgecl.train.rel_logits.mlp_bias_table` and
`edgecl.graph.rel_pos_onnx.mlp_bias_table` compute it from these constants.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from edgecl.errors import UsageError

MLP_TENSORS = ("mlp1_weight", "mlp1_bias", "mlp2_weight", "mlp2_bias")
MLP_FORMS = ("swin_v2", "swin_v2_cr", "rel_pos_swin")
_SPANNED = ("swin_v2", "rel_pos_swin")  # Swin V2's coordinates (over bias_mlp_span) and 16·sigmoid
_NAMES = {None: ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"),
          "swin_v2": ("cpb_mlp.0.weight", "cpb_mlp.0.bias", "cpb_mlp.2.weight", None),
          "swin_v2_cr": ("meta_mlp.fc1.weight", "meta_mlp.fc1.bias", "meta_mlp.fc2.weight", "meta_mlp.fc2.bias"),
          "rel_pos_swin": ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", None)}


def mlp_fields(out: dict[str, Any], where: str) -> None:
    """``bias_mlp_form`` qualifies an MLP bias; ``bias_mlp_span`` goes with "swin_v2" and "rel_pos_swin" alone, which
    need it."""
    form, span = out["bias_mlp_form"], out["bias_mlp_span"]
    if form is not None and out["bias_mlp"] is None or (form in _SPANNED) != (span is not None):
        raise UsageError(f"{where}: attention bias_mlp_form {form!r} needs bias_mlp, and bias_mlp_span {span} goes "
                         "with bias_mlp_form 'swin_v2' or 'rel_pos_swin' (which need it)")


def mlp_names(node: dict[str, Any]) -> dict[str, str]:
    """The MLP's tensors → their names under the node's module (Swin V2's fc2 has no bias: no ``mlp2_bias``)."""
    return {k: v for k, v in zip(MLP_TENSORS, _NAMES[node.get("bias_mlp_form")]) if v is not None}


def mlp_tensor_shapes(node: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """fc1 (hidden, 2) over an offset's two coordinates, fc2 (heads, hidden) and its bias (heads,): one bias per
    head."""
    hidden, h = node["bias_mlp"], node["heads"]
    shapes = {"mlp1_weight": (hidden, 2), "mlp1_bias": (hidden,), "mlp2_weight": (h, hidden), "mlp2_bias": (h,)}
    return {k: shapes[k] for k in mlp_names(node)}


def mlp_coords(node: dict[str, Any], height: int, width: int) -> np.ndarray:
    """((2H − 1)(2W − 1), 2) float32: each relative offset (dy, dx), row-major, as the node's form maps it (float32
    steps in the module's order, so the constants are the module's buffer)."""
    dy, dx = np.meshgrid(np.arange(1 - height, height), np.arange(1 - width, width), indexing="ij")
    coords = np.stack([dy, dx], axis=-1).reshape(-1, 2).astype(np.float32)
    if node.get("bias_mlp_form") not in _SPANNED:  # RelPosMlp's "cr" coordinates (V2-CR's too)
        return (np.sign(coords) * np.log(np.float32(1) + np.abs(coords))).astype(np.float32)
    coords = coords / np.float32([max(s - 1, 1) for s in node["bias_mlp_span"]]) * np.float32(8)
    return (np.sign(coords) * np.log2(np.abs(coords) + np.float32(1)) / np.float32(np.log2(8))).astype(np.float32)


def mlp_squashed(node: dict[str, Any]) -> bool:
    """Whether the MLP's output goes through 16·sigmoid (Swin V2's bound, 0…16) to make the table."""
    return node.get("bias_mlp_form") in _SPANNED


def mlp_extent(node: dict[str, Any], q: list[int]) -> tuple[int, int]:
    """The (H, W) the bias's offsets span: the window, or q's map."""
    return tuple(node["window"]) if node.get("window") else (q[1], q[2])


def offset_index(height: int, width: int) -> np.ndarray:
    """(H·W, H·W) int64: position t's row for position s of an H × W window (row-major), the row of offset
    (y_t − y_s, x_t − x_s) in `mlp_coords` (Swin's relative_position_index)."""
    y, x = (a.reshape(-1) for a in np.meshgrid(np.arange(height), np.arange(width), indexing="ij"))
    return ((y[:, None] - y[None, :] + height - 1) * (2 * width - 1) + x[:, None] - x[None, :] + width - 1) \
        .astype(np.int64)
