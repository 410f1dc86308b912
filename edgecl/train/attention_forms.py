"""The torch forms of the attention ops (`edgecl.arch.ops`: attention, in windows or not, linear, channel and lambda
attention, MobileViTv2's patch context) and a conv run window by window: `edgecl.train.models` applies them; kept
apart so the graph walker stays one file and each form can be tested on its own."""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

from edgecl.arch.attention_windows import partition, window_mask, window_of
from edgecl.train.gated_attention import gated_positions
from edgecl.train.rel_logits import lambda_rel_position, rel_logits

_BIAS_INDEX: dict[int, tuple[dict, torch.Tensor]] = {}  # id(node) → (node, its index as a tensor): built once


def gathered_bias(node: dict, table: torch.Tensor) -> torch.Tensor:
    """An attention's (heads, T_q, T_kv) bias: its (heads, B) table read at the fixed offsets (gradients add up in
    the table, as LeViT's). The index list becomes a tensor once per node, not on every forward (4 ms an attention
    at 196 tokens); the cache keeps its node alive so an id is never reused, and holds the last 256 nodes."""
    cached = _BIAS_INDEX.get(id(node))
    if cached is None or cached[0] is not node:
        if len(_BIAS_INDEX) >= 256:
            _BIAS_INDEX.pop(next(iter(_BIAS_INDEX)))
        cached = _BIAS_INDEX[id(node)] = (node, torch.tensor(node["bias_index"], dtype=torch.long))
    return table[:, cached[1].to(table.device)]


@functools.lru_cache(maxsize=64)
def _window_mask(height: int, width: int, wh: int, ww: int, sh: int, sw: int) -> torch.Tensor | None:
    """`window_mask` as a tensor, built once per shape (0.7 ms at Swin-T's first stage, on every forward else)."""
    mask = window_mask(height, width, wh, ww, sh, sw)
    return None if mask is None else torch.from_numpy(mask)


def in_windows(fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """`fn` (a conv) on each wh × ww window of the (N, C, H, W) map on its own, as one batch entry (`partition`), its
    outputs put back side by side: a conv with ``window`` (RGO's tap sees the windows as its input patches)."""
    n, c, height, width = h.shape
    grid, into, back = partition(height, width, wh, ww, False)
    out = fn(h.reshape(n, c, *grid).permute(*into).reshape(-1, c, wh, ww))
    oc, oh, ow = out.shape[1:]
    return out.reshape(n, height // wh, width // ww, oc, oh, ow).permute(*back).reshape(n, oc, height // wh * oh,
                                                                                         width // ww * ow)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, node: dict,
                     bias: torch.Tensor | None, cosine: torch.Tensor | None = None,
                     rel: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Swin's (shifted) window attention (`edgecl.arch.attention_windows`): roll by (−sh, −sw), each wh × ww window
    (side by side or dilated: `partition`) as one batch entry, `attention` with the shift's mask, the windows put
    back, roll back. `rel` (rel_h, rel_w): SAM's relative position logits of each window's q (unshifted)."""
    wh, ww, sh, sw = window_of(node)
    n, height, width = q.shape[0], q.shape[2], q.shape[3]
    if sh or sw:
        q, k, v = (torch.roll(t, (-sh, -sw), (2, 3)) for t in (q, k, v))

    grid, into, back = partition(height, width, wh, ww, bool(node.get("dilated")))

    def windows(t: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) → (N·windows, C, wh, ww)
        return t.reshape(n, t.shape[1], *grid).permute(*into).reshape(-1, t.shape[1], wh, ww)

    mask = _window_mask(height, width, wh, ww, sh, sw)
    q = windows(q)
    out = attention(q, windows(k), windows(v), node["heads"], node["scale"], None, bias,
                    None if mask is None else mask.to(q.device, q.dtype), cosine=cosine,
                    logits=None if rel is None else rel_logits(q, node, *rel))
    c = out.shape[1]
    out = out.reshape(n, height // wh, width // ww, c, wh, ww).permute(*back).reshape(n, c, height, width)
    return torch.roll(out, (sh, sw), (2, 3)) if sh or sw else out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float,
              kv_heads: int | None = None, bias: torch.Tensor | None = None,
              mask: torch.Tensor | None = None, talking: tuple[torch.Tensor, ...] | None = None,
              gated: tuple[torch.Tensor, ...] | None = None, cosine: torch.Tensor | None = None,
              logits: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention over the positions of (N, C, H, W) maps (tokens: (N, C, T, 1)), each head a contiguous
    block of channels, as `edgecl.graph.builder` emits it: softmax((scale·q)ᵀk) over the keys, times v. With fewer
    k/v heads (multi-query: one), the g = heads / kv_heads query heads of one k/v head are stacked along the query
    positions, so one product serves them all. `bias` (heads, T_q, T_kv), LeViT's gathered attention bias, is added
    to the scores before the softmax, then `mask` (windows, T, T): the batch is N·windows, window-minor (Swin).
    `talking` (w1, b1, w2, b2), EfficientFormerV2's talking heads (kv = heads): the scores mixed across the heads by
    w1 (heads, heads) plus b1 before the softmax, its weights by w2 plus b2 after it. `gated` (pos_weight, pos_bias,
    gating): ConViT's gated positional weights mixed in (`edgecl.train.gated_attention`).
    `cosine` (heads,), Swin V2's logit scale (kv = heads): q and k L2-normalised per head, the scores times
    exp(min(logit_scale, ln 100)), as timm's WindowAttention computes them, before the bias. `logits` (N, heads,
    T, T_kv), BotNet's relative position logits (kv = heads), are added to the scores."""
    n, c, t, tk = q.shape[0], q.shape[1], q.shape[2] * q.shape[3], k.shape[2] * k.shape[3]
    kv = kv_heads or heads
    d, dv = c // heads, v.shape[1] // kv
    qh, kh = q.reshape(n, heads, d, t), k.reshape(n, kv, d, tk)  # kh: (N, kv, d, Tk)
    if cosine is not None:  # F.normalize over each head's channels
        qh, kh = F.normalize(qh, dim=2), F.normalize(kh, dim=2)
    qh = qh.transpose(2, 3) * scale  # (N, h, T, d)
    if kv != heads:
        qh = qh.reshape(n, kv, heads // kv * t, d)
    vh = v.reshape(n, kv, dv, tk).transpose(2, 3)  # (N, kv, Tk, dv)
    scores = qh @ kh
    if cosine is not None:
        scores = scores * torch.clamp(cosine, max=math.log(100.0)).exp().reshape(heads, 1, 1)
    if bias is not None:  # the heads of one k/v head stacked as the queries are
        scores = scores + bias.reshape(kv, heads // kv * t, tk)
    if logits is not None:
        scores = scores + logits
    if mask is not None:  # one mask per window, the same for every head
        scores = (scores.reshape(-1, mask.shape[0], kv, t, tk) + mask.unsqueeze(1)).reshape(scores.shape)
    weights = torch.softmax(scores if talking is None else _mix_heads(scores, *talking[:2]), dim=-1)
    weights = weights if talking is None else _mix_heads(weights, *talking[2:])
    out = (weights if gated is None else gated_positions(weights, *gated)) @ vh
    out = out.reshape(n, heads, t, dv)
    return out.transpose(2, 3).reshape(n, heads * dv, *q.shape[2:])


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, eps: float,
                     kernel: str = "relu") -> torch.Tensor:
    """EfficientViT's (MIT) ReLU linear attention over the positions of (N, C, H, W) maps, each head a contiguous
    block of channels, as `edgecl.graph.linear_ops` emits it: (v·relu(k)ᵀ)·relu(q) / ((Σ relu(k))ᵀ·relu(q) +
    eps), which timm computes with v padded by a row of ones; linear in the positions. `kernel` "softmax" (CoaT's
    factorised attention): (v·softmax(k)ᵀ)·q, k's softmax over the positions, no denominator (eps unused)."""
    n, t = q.shape[0], q.shape[2] * q.shape[3]
    if kernel == "softmax":
        qh, kh = (x.reshape(n, heads, x.shape[1] // heads, t) for x in (q, k))
        vh = v.reshape(n, heads, v.shape[1] // heads, t)
        return ((vh @ torch.softmax(kh, dim=3).transpose(2, 3)) @ qh).reshape(n, v.shape[1], *q.shape[2:])
    qh, kh = (F.relu(x).reshape(n, heads, x.shape[1] // heads, t) for x in (q, k))  # (N, h, d, T)
    vh = v.reshape(n, heads, v.shape[1] // heads, t)
    below = kh.sum(dim=3, keepdim=True).transpose(2, 3) @ qh + eps  # (N, h, 1, T)
    return ((vh @ kh.transpose(2, 3)) @ qh / below).reshape(n, v.shape[1], *q.shape[2:])


def patch_context(x: torch.Tensor, logits: torch.Tensor, patch: list[int]) -> torch.Tensor:
    """MobileViTv2's context vector on the map: per offset of the ph × pw patches, the softmax of the logits over the
    patches and each channel's sum of x weighted by it (timm's LinearSelfAttention on its unfolded (B, C, P, N)), each
    position given its offset's value, as `edgecl.graph.linear_ops.patch_context` emits it."""
    n, c, height, width = x.shape
    (ph, pw), nh, nw = patch, height // patch[0], width // patch[1]

    def unfolded(t: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) → (N, C, ph, pw, patches)
        return t.reshape(n, t.shape[1], nh, ph, nw, pw).permute(0, 1, 3, 5, 2, 4).reshape(n, t.shape[1], ph, pw, -1)

    return (unfolded(x) * torch.softmax(unfolded(logits), dim=-1)).sum(-1).repeat(1, 1, nh, nw)


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor | float,
                      eps: float, normalize: bool = True, heads: int | None = None) -> torch.Tensor:
    """EdgeNeXt's cross-covariance (transposed) attention over (N, C, H, W) maps, each head a contiguous block of
    channels, as `edgecl.graph.sdta_ops` emits it: q and k L2-normalised over the positions (unless not
    `normalize`: DaViT's), softmax of the head's d × d scores times its temperature (a tensor (heads,)) or a fixed
    `scale` over k's channels, times v (timm's CrossCovarianceAttn on its (B, heads, d, N) views)."""
    learned = isinstance(scale, torch.Tensor)
    n, heads = q.shape[0], scale.shape[0] if learned else heads
    qh, kh, vh = (x.reshape(n, heads, x.shape[1] // heads, -1) for x in (q, k, v))  # (N, h, d, T)
    if normalize:
        qh, kh = F.normalize(qh, dim=-1, eps=eps), F.normalize(kh, dim=-1, eps=eps)
    scores = qh @ kh.transpose(2, 3)
    weights = torch.softmax(scores * (scale.reshape(1, heads, 1, 1) if learned else scale), dim=-1)
    return (weights @ vh).reshape(v.shape)


def lambda_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, pos_emb: torch.Tensor | None = None) -> torch.Tensor:
    """A lambda layer over (N, C, H, W) maps (`edgecl.arch.lambda_ops`), as `edgecl.graph.lambda_onnx` emits it:
    k softmaxed over the positions, the content lambda k̂·vᵀ, the position lambdas a conv of each v channel alone
    with the (dim, 1, r, r) filters (timm's Conv3d of kernel (r, r, 1)), both applied to each head of q; or with
    `pos_emb` the relative position output (`lambda_rel_position`)."""
    (n, d, hh, ww), dv, t = k.shape, v.shape[1], k.shape[2] * k.shape[3]
    qh = q.reshape(n, heads, d, t)
    content = torch.softmax(k.reshape(n, d, t), dim=-1) @ v.reshape(n, dv, t).transpose(1, 2)  # (N, d, dv)
    out = content.transpose(1, 2).unsqueeze(1) @ qh  # (N, heads, dv, T)
    if pos_emb is not None:
        return (out + lambda_rel_position(qh, v, pos_emb)).reshape(n, heads * dv, hh, ww)
    position = F.conv2d(v.reshape(n * dv, 1, hh, ww), weight, bias, padding=weight.shape[-1] // 2)
    out = out + (qh.unsqueeze(2) * position.reshape(n, 1, dv, d, t)).sum(3)
    return out.reshape(n, heads * dv, hh, ww)


def _mix_heads(scores: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(N, h, T, Tk) mixed across the heads, as a 1×1 conv over them: out[i] = Σ_j weight[i, j]·in[j] + bias[i]."""
    n, h, t, tk = scores.shape
    return (weight @ scores.reshape(n, h, t * tk) + bias.reshape(h, 1)).reshape(n, h, t, tk)
