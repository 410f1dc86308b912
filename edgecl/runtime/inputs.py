"""Input checks for `TaskRuntime.infer` and `edgecl run`, so a wrong array is a clear UsageError, not an ONNX
Runtime traceback or a silently wrong answer.

Policy (documented in the README and tested):
- shape must be (batch, *input_shape) with batch ≥ 1; a single sample must be given as x[None];
- float32 is used as is; float16 and float64 are cast to float32 (the model computes in float32 either way, so the
  cast loses nothing a float32 caller would keep); integer, bool, complex and object arrays are refused, because the
  model was trained on scaled floats and raw pixel integers would give confident nonsense;
- NaN or ±inf anywhere is refused (one pass over the input, negligible next to inference).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from edgecl.errors import UsageError


def check_input(x: Any, input_shape: tuple[int, ...], what: str = "input") -> np.ndarray:
    """A C-contiguous float32 batch ready to bind, or UsageError naming what was wrong."""
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{what} is not an array: {exc}") from None
    if x.dtype.kind != "f":
        raise UsageError(f"{what} has dtype {x.dtype}; expected float32 (float16/float64 are cast), scaled as in "
                         f"training")
    want = tuple(input_shape)
    if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
        hint = " (a single sample needs a batch axis: x[None])" if tuple(x.shape) == want else ""
        raise UsageError(f"{what} has shape {tuple(x.shape)}; expected (batch, {', '.join(map(str, want))}){hint}")
    if x.shape[0] == 0:
        raise UsageError(f"{what} has an empty batch")
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf and is refused below
            x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise UsageError(f"{what} has {len(bad)} NaN/inf values (first at index {tuple(int(i) for i in bad[0])})")
    return x
