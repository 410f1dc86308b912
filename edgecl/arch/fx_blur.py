"""Anti-aliased downsampling (timm's ``BlurPool2d``: ``resnetblur*``, ``resnetaa*``, TResNet, any ``aa_layer``) in
a user's network, for `fx_import._Converter`. The tracer keeps the module whole (its forward picks the filter by a
Python branch on ``channels`` and reads a buffer); it becomes a ``pad`` node in the module's ``pad_mode`` (timm's
default 'reflect'; 'constant' for ``aa_layer='blurpc'``; 'replicate') and a ``blur`` node, the fixed binomial filter
at the module's stride.

The ``blur`` op computes its filter from its size (`edgecl.arch.ops.blur_filter`) rather than carrying the taps: the
spec stays free of tensors, validation needs no numbers checked, and the constants rule is exact by construction
(taps summing to 1). A module whose buffer holds anything else (a filter edited after construction, an older timm's
layout, a subclass) is refused by name with its source line, as is a 'circular' pad, a reflection as large as the
map (torch's own reflect refuses it first, while shapes are traced) or a filter larger than the padded map."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import fx, nn

from edgecl.arch.fx_calls import location, map_shape
from edgecl.arch.fx_padding import pad_problem
from edgecl.arch.ops import MAX_BLUR, blur_filter
from edgecl.errors import UsageError

BLUR_POOL = ("timm.layers.blur_pool", "BlurPool2d")


def is_blur_pool(m: Any) -> bool:
    """timm's BlurPool2d (judged by its class, as the library's other layers; timm is not imported for this)."""
    return (type(m).__module__, type(m).__name__) == BLUR_POOL


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _BlurConverter:
    """Mixin of `fx_import._Converter`: BlurPool2d modules kept whole by the tracer."""

    name: str
    _emit: Callable[..., str]

    def blur_pool(self, node: fx.Node, m: nn.Module, x: str, path: str) -> None:
        """A BlurPool2d as its pad and its fixed filter: ``pad`` {pads, mode} then ``blur`` {k, stride}."""
        where = f"BlurPool2d at {path!r} {location(node)}"
        shape = map_shape(node, self.name, where)
        k, stride, padding = _int(getattr(m, "filt_size", None)), _int(getattr(m, "stride", None)), \
            getattr(m, "padding", None)
        if k is None or not 2 <= k <= MAX_BLUR or stride is None or stride < 1:
            raise UsageError(f"{self.name}: {where}: filt_size {getattr(m, 'filt_size', None)!r} must be an int from "
                             f"2 to {MAX_BLUR} and stride {getattr(m, 'stride', None)!r} an int ≥ 1")
        if not isinstance(padding, (list, tuple)) or len(padding) != 4 or \
                not all(_int(p) is not None and p >= 0 for p in padding):
            raise UsageError(f"{self.name}: {where}: padding {str(padding)[:60]} must be four ints ≥ 0 "
                             "(left, right, top, bottom)")
        channels = getattr(m, "channels", None)  # torch refused a map of other channels while tracing shapes
        filt = getattr(m, "filt", None)
        want = blur_filter(k)
        if not isinstance(filt, torch.Tensor) or filt.dim() != 4 or tuple(filt.shape[1:]) != (1, k, k) or \
                filt.shape[0] != (channels or 1) or \
                not np.array_equal(filt.detach().cpu().float().numpy(), np.broadcast_to(want, filt.shape)):
            raise UsageError(f"{self.name}: {where}: its filter is not the binomial filter of size {k} on every "
                             "channel (a filter edited or built otherwise); only timm's is supported")
        if not hasattr(m, "pad_mode"):  # timm before 1.0 reflected always, in a forward edgecl cannot check here
            raise UsageError(f"{self.name}: {where}: a BlurPool2d without pad_mode (timm before 1.0) is not "
                             "supported; timm 1.0 or later builds one edgecl follows")
        left, right, top, bottom = padding
        pads, mode = [top, left, bottom, right], m.pad_mode
        if (problem := pad_problem(shape, pads, mode)) is not None:
            raise UsageError(f"{self.name}: {where}: {problem}")
        if min(shape[1] + top + bottom, shape[2] + left + right) < k:
            raise UsageError(f"{self.name}: {where}: the padded map {shape[1:]} is smaller than the filter {k}")
        if any(pads):
            x = self._emit(node, "pad", [x], f"{path}.pad", pads=pads, mode=mode)
        self._emit(node, "blur", [x], path, k=k, stride=stride)
