"""Torch side of relative position logits, as `edgecl.graph.rel_pos_onnx` and `edgecl.graph.lambda_onnx` emit
them: an attention's (BotNet's and HaloNet's ``PosEmbedRel``, `edgecl.arch.rel_pos`: the tables read at the fixed
offsets, then one product per axis with q) and a lambda layer's relative position lambdas (`edgecl.arch.lambda_ops`:
the embedding read at the fixed offsets, q's logits against it times v)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from edgecl.arch.lambda_ops import lambda_rel_index
from edgecl.arch.mlp_bias import MLP_TENSORS, mlp_coords, mlp_extent, mlp_squashed
from edgecl.arch.rel_pos import rel_index, rel_scale


@functools.lru_cache(maxsize=64)
def _index(queries: int, keys: int, mvit: bool) -> torch.Tensor:
    """`rel_index` as a tensor, built once per shape and direction."""
    return torch.from_numpy(rel_index(queries, keys, mvit))


def rel_logits(q: torch.Tensor, node: dict, rel_h: torch.Tensor, rel_w: torch.Tensor,
               keys: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, heads, A·B, kh·kw): query (a, b) of q's (N, heads·d, A, B) map (or block) and key (y, x) of the node's
    ``rel_pos`` [kh, kw] get q(a, b)·(rel_h[y − a + kh − 1] + rel_w[x − b + kw − 1]) (q times the scale with
    ``rel_scaled``; with ``rel_mvit`` the rows `mvit_index` gives, a − y + kh − 1 and b − x + kw − 1 where q and k
    are alike). `keys`: k's map where it is not ``rel_pos`` (MViTv2's pooled keys, ``rel_mvit`` only)."""
    n, h, (rows_q, cols_q) = q.shape[0], node["heads"], q.shape[2:]
    kh, kw = keys if keys is not None else node["rel_pos"]
    mvit = bool(node.get("rel_mvit"))
    qh = q.reshape(n, h, -1, rows_q, cols_q).permute(0, 1, 3, 4, 2) * rel_scale(node)  # (N, h, A, B, d)
    rows = rel_h[_index(rows_q, kh, mvit).to(q.device)]  # (A, kh, d): query row a, key row y
    cols = rel_w[_index(cols_q, kw, mvit).to(q.device)]  # (B, kw, d)
    by_row = torch.einsum("nhabd,ayd->nhaby", qh, rows)  # (N, h, A, B, kh)
    by_col = torch.einsum("nhabd,bxd->nhabx", qh, cols)  # (N, h, A, B, kw)
    return (by_row.unsqueeze(-1) + by_col.unsqueeze(-2)).reshape(n, h, rows_q * cols_q, kh * kw)


def prefixed_rel_logits(q: torch.Tensor, node: dict, rel_h: torch.Tensor, rel_w: torch.Tensor,
                        keys: int) -> torch.Tensor:
    """(N, heads, p + qh·qw, `keys`): with ``rel_prefix`` p (MViTv2's class token, timm's ``cal_rel_pos_type``), q's
    (N, C, p + qh·qw, 1) tokens past the prefix as the ``rel_query`` map meet the ``rel_key`` map's keys with
    `rel_logits`; the prefix's rows and columns get none (zeros)."""
    p, (rows, cols) = node["rel_prefix"], node["rel_query"]
    grid = q[:, :, p:, 0].reshape(q.shape[0], q.shape[1], rows, cols)
    logits = rel_logits(grid, node, rel_h, rel_w, keys=tuple(node["rel_key"]))
    return F.pad(logits, (keys - logits.shape[3], 0, p, 0))


@functools.lru_cache(maxsize=64)
def _lambda_index(height: int, width: int) -> torch.Tensor:
    """`lambda_rel_index` as a tensor, built once per map."""
    return torch.from_numpy(lambda_rel_index(height, width))


def lambda_rel_position(qh: torch.Tensor, v: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
    """(N, heads, dv, T): a lambda layer's relative position output, Σ_n (q(m)·E(m, n))·v(n), with q as
    (N, heads, dim, T), v (N, dv, H, W) and E the (2H − 1, 2W − 1, dim) embedding read at the fixed offsets."""
    n, dv, height, width = v.shape
    table = pos_emb.reshape(-1, pos_emb.shape[-1])[_lambda_index(height, width).to(v.device)]  # (T, T, dim)
    logits = torch.einsum("nhdm,mjd->nhmj", qh, table)  # (N, heads, T, T)
    return torch.einsum("nhmj,ncj->nhcm", logits, v.reshape(n, dv, height * width))


def mlp_bias_table(node: dict, params: dict[str, torch.Tensor], q_shape: list[int]) -> torch.Tensor:
    """(heads, B): an MLP-generated bias table (`edgecl.arch.mlp_bias`), fc2(relu(fc1(coords))) over the
    (2H − 1)(2W − 1) offsets' coordinates of the window or q's (C, H, W) map (fc2's bias where the form has one,
    then 16·sigmoid where it squashes), as `edgecl.graph.rel_pos_onnx.mlp_bias_table`."""
    w1, b1, w2, b2 = (params.get(f"{node['name']}.{k}") for k in MLP_TENSORS)
    coords = torch.from_numpy(mlp_coords(node, *mlp_extent(node, q_shape))).to(w1)
    out = torch.relu(coords @ w1.T + b1) @ w2.T
    out = out if b2 is None else out + b2
    return (16 * torch.sigmoid(out) if mlp_squashed(node) else out).T
