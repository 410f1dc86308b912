"""timm's RMSNorm of a feature map (``RmsNorm2d``, ``RmsNormAct2d`` and their ``Fp32`` forms: MobileNetV5, Gemma
3n's vision encoder), for `fx_import._Converter`. The tracer keeps the module whole (its forward branches on a
fast-norm flag and reduces over dim 1, which `from_torch` follows nowhere else); it becomes a ``layer_norm`` node with
``rms`` — x / √(mean of x² over the channels + eps) · weight at each position, no mean subtracted, no bias — named by
the module (its ``weight`` keeps its state-dict key), then the activation of an ``RmsNormAct2d``.

A norm over other axes than the channels (a ``normalized_shape`` that is not the map's channels), one on anything but a
channels-first (C, H, W) map, a ``drop`` that is no identity and an activation edgecl has no op for are refused by
name with the source line."""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from edgecl.arch.fx_activations import module_activation, unknown_activation
from edgecl.arch.fx_calls import is_library_identity, location, map_shape
from edgecl.errors import UsageError

# timm's RMSNorms of NCHW maps (the Fp32 forms compute in float32, what edgecl computes in), by where they are defined
RMS_NORMS_2D = {("timm.layers.norm", "RmsNorm2d"), ("timm.layers.norm", "RmsNorm2dFp32"),
                ("timm.layers.norm_act", "RmsNormAct2d"), ("timm.layers.norm_act", "RmsNormAct2dFp32")}


def is_rms_norm_2d(m: Any) -> bool:
    """timm's RmsNorm2d or RmsNormAct2d (or their Fp32 forms), judged by its class; timm is not imported for this."""
    return (type(m).__module__, type(m).__name__) in RMS_NORMS_2D


def _identity(m: Any) -> bool:
    return m is None or isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d)) or is_library_identity(m)


class _RmsNormConverter:
    """Mixin of `fx_import._Converter`: timm's RMSNorms of a map, kept whole by the tracer."""

    name: str
    _emit: Callable[..., str]
    _activation: Callable[..., None]
    alias: dict[fx.Node, str]

    def rms_norm(self, node: fx.Node, m: nn.Module, x: str, path: str) -> str:
        """A ``layer_norm`` {rms} over the map's channels, then an RmsNormAct2d's activation; the spec value of its
        output."""
        where = f"{type(m).__name__} at {path!r} {location(node)}"
        ch = map_shape(node, self.name, where)[0]
        if tuple(getattr(m, "normalized_shape", ())) != (ch,):
            raise UsageError(f"{self.name}: {where} normalises over {getattr(m, 'normalized_shape', None)}; edgecl "
                             f"supports an RMSNorm over the {ch} channels of the map it reads")
        affine = getattr(m, "weight", None) is not None
        if affine and tuple(m.weight.shape) != (ch,):
            raise UsageError(f"{self.name}: {where}: its weight has shape {tuple(m.weight.shape)}, not ({ch},)")
        drop, act = getattr(m, "drop", None), getattr(m, "act", None)
        if not _identity(drop):
            raise UsageError(f"{self.name}: {where}: drop is a {type(drop).__name__}, not a dropout")
        if not _identity(act) and module_activation(act) is None:
            raise UsageError(f"{self.name}: {where}: {unknown_activation(act, f'{path}.act')}")
        out = self._emit(node, "layer_norm", [x], path, ch=ch, eps=float(m.eps), affine=affine, rms=True,
                         **({"bias": False} if affine else {}))
        if not _identity(act):
            self._activation(node, act, out, f"{path}.act")
        return self.alias[node]
