"""Architecture specs: one JSON-able graph description of a trunk that torch training, the ONNX builder, the runtime
and compaction all build from (`spec`), the built-in trunks (`presets`), the channel-dependency map across residual
adds, gates and concatenations (`channels`), and the import of a user's `torch.nn.Module` (`from_torch`, which
imports torch only when called). Importing this package stays light: no torch, no numpy."""
from __future__ import annotations

from typing import Any

from edgecl.arch.channels import ChannelError, ChannelMap, channel_map
from edgecl.arch.presets import PRESETS, check_preset, preset
from edgecl.arch.spec import (INPUT, OPS, WEIGHT_OPS, Arch, consumers, dense_params, gemm_shape, is_depthwise,
                              is_sequential, last_layer, node_by_name, node_shapes, param_shapes, prunable,
                              shapes_after, unit_sources, validate)


def from_torch(module: Any, input_shape: tuple[int, ...] | list[int], *, classifier: bool | None = None,
               name: str | None = None) -> Arch:
    """The spec of a `torch.nn.Module` (traced with torch.fx): see `edgecl.arch.fx_import.from_torch`."""
    from edgecl.arch.fx_import import from_torch as _from_torch

    return _from_torch(module, input_shape, classifier=classifier, name=name)


def ensure_torchvision_imports() -> None:
    """Call before `import torchvision` in your own code: where torchvision's compiled ops do not load on this torch
    (the pinned CPU torch with PyPI's torchvision) its import fails on 'operator torchvision::nms does not exist';
    `edgecl.arch.factories.ensure_torchvision_imports` declares what it needs (the CLI does this itself)."""
    from edgecl.arch.factories import ensure_torchvision_imports as _ensure

    _ensure()


__all__ = ["INPUT", "OPS", "PRESETS", "WEIGHT_OPS", "Arch", "ChannelError", "ChannelMap", "channel_map", "check_preset",
           "consumers", "dense_params", "ensure_torchvision_imports", "from_torch", "gemm_shape", "is_depthwise",
           "is_sequential", "last_layer", "node_by_name", "node_shapes", "param_shapes", "preset", "prunable",
           "shapes_after", "unit_sources", "validate"]
