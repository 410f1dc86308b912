"""Weight standardisation (timm's ScaledStdConv2d, NF-ResNet) outside torch: each filter of a conv with
``standardize`` is replaced by gain·gain_scale·(w − mean) / √(var + eps) over its in/groups·kh·kw numbers (biased
variance, as timm's ``F.batch_norm`` of the weight computes it). numpy only: the exporter, compaction and the runtime
use it; `edgecl.train.models` computes the same in torch.

Why a field of the conv and folded here: standardisation re-parametrises the weight, so it is applied to the weight
a task *runs* — after its method's delta (LPS masks, AGS-CL node masks, HALRP's factors, RGO's permutation) — never
to a stored base. A folded per-task model (`fold_standardized`) then holds a plain conv, and compaction folds first,
because removing a dead input channel's columns would change the filter's mean and variance."""
from __future__ import annotations

from typing import Any

import numpy as np

from edgecl.arch.op_rules import has_gain, is_standardized
from edgecl.arch.spec import Arch
from edgecl.errors import UsageError
from edgecl.graph.nodes import Builder


STANDARDIZE_FIELDS = ("standardize", "gain_scale", "std_gain")  # a conv's fields that a folded one has none of
CHUNK_ELEMENTS = 1 << 16  # filters standardised at a time: float64 temporaries of ~0.5 MB whatever the conv's size


def standardized(weight: Any, gain: Any | None, eps: float, scale: float, out: Any | None = None,
                 xp: Any = np) -> Any:
    """The standardised (out, in/groups, kh, kw) weight, float32 (statistics in float64), written into `out` (may be
    `weight` itself) or a new array; a few filters at a time, so a large conv needs no float64 copy of itself.
    `gain` None: a conv without one (``std_gain`` false, timm's StdConv2d), each filter's factor `scale` alone.
    `xp`: the arrays' namespace — numpy, or CuPy for a device slot (`edgecl.runtime.device_standardize`): only
    operations both have, and float64 temporaries of at most `chunk_elements` numbers, twice (`scratch_bytes`)."""
    gain = xp.ones(weight.shape[0], xp.float32) if gain is None else gain
    out = xp.empty(weight.shape, xp.float32) if out is None else out
    n = int(np.prod(weight.shape[1:]))
    step = filters_per_chunk(n)
    for lo in range(0, weight.shape[0], step):
        w = xp.array(weight[lo:lo + step], dtype=xp.float64).reshape(-1, n)  # a copy: centred in place below
        w -= w.mean(axis=1, keepdims=True)
        var = (w * w).mean(axis=1, keepdims=True)
        w *= xp.asarray(gain[lo:lo + step], dtype=xp.float64).reshape(-1, 1) * scale
        with np.errstate(over="ignore"):  # an overflow is inf here, refused by `check_finite` where it is served
            w /= xp.sqrt(var + eps)
            out[lo:lo + step] = w.reshape(out[lo:lo + step].shape)
    return out


def filters_per_chunk(n: int) -> int:
    """Filters of `n` numbers `standardized` takes at a time: `CHUNK_ELEMENTS` numbers' worth, at least one."""
    return max(1, CHUNK_ELEMENTS // max(1, n))


def chunk_elements(shape: tuple[int, ...]) -> int:
    """The most numbers `standardized` takes at a time from a weight of `shape` (`filters_per_chunk` whole
    filters, no more than the weight has): what `scratch_bytes` charges for."""
    n = int(np.prod(shape[1:]))
    return min(int(np.prod(shape)), filters_per_chunk(n) * n)


SCRATCH_FIXED = 8 * 512  # a few small temporaries, each at least one block of CuPy's pool (512 bytes)


def scratch_bytes(shapes: list[tuple[int, ...]]) -> int:
    """The temporaries `standardized` needs at once for the largest of `shapes`' chunks: the chunk's float64 copy
    and its square, one float32 chunk for a backend that casts through a temporary, and up to four float64 numbers
    per filter (mean, variance, gain, their quotient: as large as the chunk itself for a filter of one number, a
    depthwise 1×1), each at least a pool block: what a device charges."""
    def chunk(shape: tuple[int, ...]) -> int:
        elements = chunk_elements(shape)
        return 20 * elements + 32 * (elements // max(1, int(np.prod(shape[1:])))) + SCRATCH_FIXED

    return max((chunk(s) for s in shapes), default=0)


def check_finite(name: str, weight: Any, gain: Any | None, scale: float, xp: Any = np) -> Any:
    """`weight`, the standardised weight of conv `name`, if finite: finite gains times gain_scale can still overflow
    float32 (|z| ≤ √n), and a folded model would then hold inf weights that every input turns into inf or NaN."""
    if not bool(xp.isfinite(weight).all()):
        raise UsageError(f"architecture node {name!r}: its standardised weight overflows float32 (largest |gain| "
                         f"{1.0 if gain is None else float(xp.abs(gain).max()):g}, gain_scale {scale:g}): every "
                         "input's logits would be inf or NaN")
    return weight


def fold_standardized(arch: Arch, params: dict[str, np.ndarray]) -> tuple[Arch, dict[str, np.ndarray]]:
    """`arch` with every standardised conv a plain one and `params` with its weight standardised and its gain gone:
    the same network (float rounding aside); `arch` and `params` unchanged (and returned) when it has none."""
    if not any(is_standardized(n) for n in arch["nodes"]):
        return arch, params
    params, nodes = dict(params), []
    for node in arch["nodes"]:
        if is_standardized(node):
            name = node["name"]
            gain = params.pop(f"{name}.gain", None)
            params[f"{name}.weight"] = check_finite(name, standardized(params[f"{name}.weight"], gain,
                                                                       node["standardize"], node["gain_scale"]),
                                                    gain, node["gain_scale"])
            node = {k: v for k, v in node.items() if k not in STANDARDIZE_FIELDS}
        nodes.append(node)
    return {**arch, "nodes": nodes}, params


def standardized_onnx(b: Builder, node: dict, weight: str) -> str:
    """The standardised weight computed in the graph from the `weight` and ``NODE.gain`` it reads (the switchable
    graph, whose weights are bound per task): the same statistics as `standardized`, in float32; no gain without
    ``std_gain``."""
    shape = [node["out"], node["in"] // node["groups"], *node["k"]]
    rows = b.op("Reshape", [weight, b.ints(node["out"], -1)])
    centred = b.op("Sub", [rows, b.op("ReduceMean", [rows], axes=[1], keepdims=1)])
    var = b.op("ReduceMean", [b.op("Mul", [centred, centred])], axes=[1], keepdims=1)
    normed = b.op("Div", [centred, b.op("Sqrt", [b.op("Add", [var, b.constant(float(node["standardize"]))])])])
    gain = b.op("Unsqueeze", [f"{node['name']}.gain", b.ints(1)]) if has_gain(node) else None
    if node["gain_scale"] != 1.0:
        scale = b.constant(float(node["gain_scale"]))
        gain = scale if gain is None else b.op("Mul", [gain, scale])
    return b.op("Reshape", [normed if gain is None else b.op("Mul", [normed, gain]), b.ints(*shape)])


def cut_keeping_standardized(rows: np.ndarray, dead: np.ndarray, eps: float) -> np.ndarray:
    """Filters (out, n) with the entries `dead` (out, n) set to 0 and the others moved by one affine map a·w + c per
    filter, chosen so that the standardised values of the kept entries are unchanged: cutting a connection out of a
    weight-standardised filter (AGS-CL's (I.1)) would otherwise change its mean and variance, and so what it
    computes on the inputs it keeps. With z the standardised filter, the cut filter's σ' = t solves
    t² = eps / (1 − K), K = (Σ_kept z² + n_dead·mean_dead(z)²) / n < var / (var + eps) ≤ 1 (Jensen), so a = t/σ,
    and its mean is −t·mean_dead(z). Filters with nothing to cut, or nothing kept, are plain zeroings."""
    w = np.asarray(rows, dtype=np.float64)
    n = w.shape[1]
    mean = w.mean(axis=1, keepdims=True)
    sigma = np.sqrt(((w - mean) ** 2).mean(axis=1, keepdims=True) + eps)
    z = (w - mean) / sigma
    n_dead = dead.sum(axis=1, keepdims=True)
    mean_dead = np.where(dead, z, 0.0).sum(axis=1, keepdims=True) / np.maximum(n_dead, 1)
    k = (np.where(dead, 0.0, z * z).sum(axis=1, keepdims=True) + n_dead * mean_dead ** 2) / n
    t = np.sqrt(eps / np.maximum(1.0 - k, 1e-300))
    out = np.where(dead, 0.0, (t / sigma) * (w - mean) - t * mean_dead)
    plain = ((n_dead == 0) | (n_dead == n) | ~np.where(dead, w != 0, False).any(axis=1, keepdims=True))
    return np.where(plain, np.where(dead, 0.0, w), out).astype(np.float32)


def cut_columns_keeping_standardized(weight: np.ndarray, dead: np.ndarray, eps: float) -> np.ndarray:
    """`cut_keeping_standardized` of a conv weight (out, in, k…) whose input columns `dead` ((out or 1), in, 1) are
    cut, at every kernel position."""
    rows = weight.reshape(weight.shape[0], -1)
    mask = np.broadcast_to(dead, (weight.shape[0], weight.shape[1], rows.shape[1] // weight.shape[1]))
    return cut_keeping_standardized(rows, mask.reshape(rows.shape), eps).reshape(weight.shape)
