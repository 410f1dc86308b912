"""Architecture specs: one JSON-able graph description of a trunk that torch training, the ONNX builder, the runtime
and compaction all build from (`spec`), the built-in trunks (`presets`), the channel-dependency map across residual
adds, gates and concatenations (`channels`), and the import of a user's `torch.nn.Module` (`from_torch`, which
imports torch only when called). Importing this package stays light: no torch, no numpy."""
from __future__ import annotations

from typing import Any

from edgecl.arch.channels import ChannelError, ChannelMap, channel_map
from edgecl.arch.presets import PRESETS, check_preset, preset
from edgecl.arch.spec import (INPUT, OPS, WEIGHT_OPS, Arch, consumers, dense_params, gemm_shape, is_depthwise,
                              is_sequential, node_by_name, node_shapes, param_shapes, prunable, validate)
from edgecl.errors import UsageError


def from_torch(module: Any, input_shape: tuple[int, ...] | list[int], *, classifier: bool | None = None,
               name: str | None = None) -> Arch:
    """The spec of a `torch.nn.Module` (traced with torch.fx): see `edgecl.arch.fx_import.from_torch`."""
    from edgecl.arch.fx_import import from_torch as _from_torch

    return _from_torch(module, input_shape, classifier=classifier, name=name)


def shapes_after(arch: Arch) -> list[list[int]]:
    """Activation shape after each node (without batch), for memory estimates."""
    shapes = node_shapes(arch)
    return [shapes[n["name"]] for n in arch["nodes"]]


def unit_sources(arch: Arch) -> dict[str, tuple[str | None, int]]:
    """For each linear/conv layer of a chain (`is_sequential`): (layer whose output units feed its inputs, input
    columns per source unit) — the repeat is H·W where a flatten sits between a conv and a linear; None means the
    network input. The general form for any graph is `channel_map`."""
    if not is_sequential(arch):
        raise UsageError(f"architecture {arch.get('name')!r} is not a chain; use edgecl.arch.channel_map")
    out: dict[str, tuple[str | None, int]] = {}
    src, repeat = None, 1
    shapes = node_shapes(arch)
    previous = INPUT
    for node in arch["nodes"]:
        if node["op"] == "flatten" and len(shapes[previous]) == 3:
            repeat *= shapes[previous][1] * shapes[previous][2]
        if node["op"] in WEIGHT_OPS:
            out[node["name"]] = (src, repeat)
            src, repeat = node["name"], 1
        previous = node["name"]
    return out


def last_layer(arch: Arch) -> str:
    """The conv/linear layer whose output units feed the heads (on a chain)."""
    return prunable(arch)[-1].rsplit(".", 1)[0]


__all__ = ["INPUT", "OPS", "PRESETS", "WEIGHT_OPS", "Arch", "ChannelError", "ChannelMap", "channel_map", "check_preset", "consumers",
           "dense_params", "from_torch", "gemm_shape", "is_depthwise", "is_sequential", "last_layer", "node_by_name",
           "node_shapes", "param_shapes", "preset", "prunable", "shapes_after", "unit_sources", "validate"]
