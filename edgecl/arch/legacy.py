"""Layer-list specs (edgecl ≤ 0.1 artifacts and hand-written presets) → graph nodes, keeping every tensor name.

A list runs each layer on the previous one's output. ``block`` is a ResNet basic block: conv-bn-relu-conv-bn, plus a
projection shortcut (1×1 conv + bn) when it changes channels or resolution, added, then relu; its tensors are
``NAME.conv1``, ``NAME.bn1``, ``NAME.conv2``, ``NAME.bn2``, ``NAME.short``, ``NAME.shortbn``, and the block's output
node is ``NAME``. ``gap`` is global average pooling then flatten. Unnamed layers get ``_OPi`` names (i: the index).
Field types are checked by `edgecl.arch.spec.validate` on the nodes this returns."""
from __future__ import annotations

from typing import Any

from edgecl.errors import UsageError

_LEGACY_OPS = ("linear", "conv", "bn", "relu", "maxpool", "flatten", "gap", "block")
MAX_LAYERS = 10_000


def layers_to_nodes(layers: Any) -> list[dict[str, Any]]:
    if not isinstance(layers, list) or not layers or len(layers) > MAX_LAYERS:
        raise UsageError(f"architecture layers must be a non-empty list of at most {MAX_LAYERS} objects")
    nodes: list[dict[str, Any]] = []
    previous = "input"
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or layer.get("op") not in _LEGACY_OPS:
            op = layer.get("op") if isinstance(layer, dict) else layer
            raise UsageError(f"architecture layer {i}: unknown op {str(op)[:60]!r} (known: {', '.join(_LEGACY_OPS)})")
        op = layer["op"]
        name = layer.get("name", f"_{op}{i}")
        # format-1 files carry `bias: false` on every layer (the old normaliser set it everywhere): not a field here
        fields = {k: v for k, v in layer.items()
                  if k not in ("op", "name") and not (k == "bias" and op not in ("linear", "conv") and v is False)}
        if op == "block":
            nodes += _block(name, fields, previous, i)
        elif op == "gap":
            nodes += [{"name": f"{name}.pool", "op": "gap", "inputs": [previous], **fields},
                      {"name": name, "op": "flatten", "inputs": [f"{name}.pool"]}]
        else:
            nodes.append({"name": name, "op": op, "inputs": [previous], **fields})
        previous = nodes[-1]["name"]
    return nodes


def _block(name: Any, fields: dict[str, Any], x: str, i: int) -> list[dict[str, Any]]:
    for key in ("in", "out"):
        if key not in fields:
            raise UsageError(f"architecture layer {i} (block): missing field {key!r}")
    unknown = set(fields) - {"in", "out", "stride"}
    if unknown:
        raise UsageError(f"architecture layer {i} (block): unknown fields {sorted(unknown)[:5]}")
    if not isinstance(name, str):
        raise UsageError(f"architecture layer {i} (block): name {name!r} must be a string")
    cin, cout, stride = fields["in"], fields["out"], fields.get("stride", 1)

    def conv(part: str, src: str, c_in: Any, k: int, s: Any, pad: int) -> dict[str, Any]:
        return {"name": f"{name}.{part}", "op": "conv", "inputs": [src], "in": c_in, "out": cout, "k": k,
                "stride": s, "pad": pad, "bias": False}

    def bn(part: str, src: str) -> dict[str, Any]:
        return {"name": f"{name}.{part}", "op": "bn", "inputs": [src], "ch": cout}

    nodes = [conv("conv1", x, cin, 3, stride, 1), bn("bn1", f"{name}.conv1"),
             {"name": f"{name}.relu1", "op": "relu", "inputs": [f"{name}.bn1"]},
             conv("conv2", f"{name}.relu1", cout, 3, 1, 1), bn("bn2", f"{name}.conv2")]
    shortcut = x
    if cin != cout or stride != 1:
        nodes += [conv("short", x, cin, 1, stride, 0), bn("shortbn", f"{name}.short")]
        shortcut = f"{name}.shortbn"
    return nodes + [{"name": f"{name}.add", "op": "add", "inputs": [f"{name}.bn2", shortcut]},
                    {"name": name, "op": "relu", "inputs": [f"{name}.add"]}]
