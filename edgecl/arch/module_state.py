"""Where a traced module keeps each of a spec's trunk tensors: its state-dict key and the shape it stores there. The
link `from_torch`'s specs keep to the user's module, for starting weights (`edgecl.train.initial`) and for reading
the module's own values (`fx_import.tensors_of`); nothing else needs the module."""
from __future__ import annotations

from edgecl.arch.spec import Arch, node_by_name, param_shapes, state_key


def state_keys(arch: Arch) -> dict[str, str]:
    """Trunk tensor name → the key of the same tensor in the traced module's state dict: the same name, except
    where `from_torch` had to name a node otherwise (a trunk layer called ``head``, a name taken) and kept the
    layer's path in the node's ``module`` field. A layer scale is a bare parameter: its key is its path."""
    nodes = node_by_name(arch)
    out = {}
    for name in param_shapes(arch):
        layer, _, tensor = name.rpartition(".")
        out[name] = state_key(nodes[layer], tensor)
    return out


def state_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Trunk tensor name → its shape as the traced module stores it (`param_shapes`, except a weight whose node has
    a ``module_shape``); the values are the same in the same order, so a reshape converts either way."""
    shapes = param_shapes(arch)
    for node in arch["nodes"]:
        if "module_shape" in node:
            shapes[f"{node['name']}.weight"] = tuple(node["module_shape"])
    return shapes
