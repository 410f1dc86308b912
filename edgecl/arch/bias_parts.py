"""A conv's bias that its module stores in parts: BEiT's and EVA's attention hold ``qkv`` without a bias and add
``torch.cat((q_bias, k_bias, v_bias))`` in their forward, ``k_bias`` a zero buffer the state dict lacks. The spec's
conv has one ordinary bias (what ``F.linear(x, qkv.weight, qkv_bias)`` computes); its ``bias_parts`` field says where
each of its equal consecutive parts lives in the module: a tensor beside the conv (``["q_bias", null, "v_bias"]`` on
``blocks.0.attn.qkv``: ``blocks.0.attn.q_bias``, …) or, null, a fixed zero the module does not store.

A null part must be keys of attentions only (`check_null_parts`): a bias b on the keys adds scale·q·b to every score
of a query, one number across its keys, which the softmax cancels — not in a ``cosine`` attention (k normalised: a
bias turns it) nor a haloed one (``halo_blocks``: the zero padding has no bias), which are refused. So what training
puts there changes no output,
and writing the module's zero back (`split`) keeps the network; anywhere else a dropped part would be another
network, so such a spec is refused. The module link is all the field is: compaction, which cuts the dense weight's
channels, drops it (as it drops ``module_shape``).
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from edgecl.errors import UsageError

MAX_PARTS = 8
_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def is_bias_parts(value: Any) -> bool:
    """The field's form: 1 to `MAX_PARTS` entries, each null or a distinct Python name, at least one a name (one
    part: the bias stored whole under another name, as EVA's q_bias for a q conv that is rows of a fused qkv)."""
    names = [v for v in value if v is not None] if isinstance(value, list) else []
    return isinstance(value, list) and 1 <= len(value) <= MAX_PARTS and bool(names) and \
        all(isinstance(v, str) and _PART.fullmatch(v) for v in names) and len(set(names)) == len(names)


def bias_parts_fields(out: dict[str, Any], where: str) -> None:
    """A conv's ``bias_parts`` split its bias: it has one, into equal parts."""
    parts = out.get("bias_parts")
    if parts is not None and (not out["bias"] or out["out"] % len(parts)):
        raise UsageError(f"{where}: bias_parts {parts} needs bias true and {out['out']} outputs that its "
                         f"{len(parts)} equal parts divide")


def part_keys(node: dict[str, Any]) -> list[tuple[str | None, int, int]]:
    """A conv's bias parts as (state-dict key or None, first channel, end): each named beside the conv's own path."""
    parts, size = node["bias_parts"], node["out"] // len(node["bias_parts"])
    parent = node.get("module", node["name"]).rpartition(".")[0]
    return [(None if p is None else f"{parent}.{p}" if parent else p, i * size, (i + 1) * size)
            for i, p in enumerate(parts)]


def packed(arch: dict[str, Any]) -> dict[str, list[tuple[str | None, int, int]]]:
    """Spec tensor name (a conv's bias) → its parts (`part_keys`), for every conv with ``bias_parts``."""
    return {f"{n['name']}.bias": part_keys(n) for n in arch["nodes"] if n.get("bias_parts")}


def check_null_parts(nodes: list[dict[str, Any]]) -> None:
    """Every null part is read only by slices that are exactly it, each read only as attentions' keys (inputs[1])."""
    readers: dict[str, list[dict[str, Any]]] = {}
    for node in nodes:
        for src in set(node["inputs"]):
            readers.setdefault(src, []).append(node)
    for node in nodes:
        for key, start, stop in part_keys(node) if node.get("bias_parts") else ():
            if key is not None:
                continue
            where = f"architecture node {node['name']!r}: its bias part {start}:{stop} is a fixed zero (null)"
            for reader in readers.get(node["name"], []):
                span = (reader.get("start"), reader.get("stop")) if reader["op"] == "slice" else None
                if span is None or span[0] < stop and span[1] > start and span != (start, stop):
                    raise UsageError(f"{where}, so it is read by slices of exactly that part only, not by "
                                     f"{reader['op']} {reader['name']!r}")
                keys_only = all(r["op"] == "attention" and r["inputs"][1] == reader["name"] and
                                reader["name"] not in (r["inputs"][0], r["inputs"][2]) and
                                not r.get("cosine") and not r.get("halo_blocks")
                                for r in readers.get(reader["name"], []))
                if span == (start, stop) and not keys_only:
                    raise UsageError(f"{where}: slice {reader['name']!r} of it must be read only as attentions' "
                                     "keys (where a bias changes no output: not a cosine or haloed attention's)")


def check_part_keys(arch: dict[str, Any], taken: set[str]) -> None:
    """A part's key is no other tensor's (nor another part's): one module tensor cannot be two."""
    for name, parts in packed(arch).items():
        for key, _, _ in parts:
            if key is not None and key in taken:
                raise UsageError(f"architecture tensor {name!r}: its bias part {key!r} is another tensor's key too "
                                 "(one weight cannot be two)")
            if key is not None:
                taken.add(key)


def gather(arch: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`values` by state-dict key, with each packed bias put together under its spec key (`state_key`, the conv's
    ``.bias``) from its parts, zeros for a null part; unchanged where a part is missing (the caller names it)."""
    out = dict(values)
    for name, parts in packed(arch).items():
        node_path = name.rpartition(".")[0]
        if not all(key in values for key, _, _ in parts if key is not None):
            continue
        arrays = []
        for key, start, stop in parts:
            array = np.zeros(stop - start, np.float32) if key is None else _array(values[key])
            if array.shape != (stop - start,):
                raise UsageError(f"tensor {key!r}: shape {array.shape}, the bias part {start}:{stop} of "
                                 f"{node_path!r} needs ({stop - start},)")
            arrays.append(array)
        out[name] = np.concatenate(arrays)
    return out


def split(arch: dict[str, Any], state: dict[str, np.ndarray], keys: dict[str, str]) -> dict[str, np.ndarray]:
    """The inverse of `gather` on a state dict (`keys`: spec name → its state key): each packed bias as its parts,
    a null part left out (the module's fixed zero)."""
    out = dict(state)
    for name, parts in packed(arch).items():
        if keys[name] in out:
            whole = out.pop(keys[name]).reshape(-1)
            out.update({key: whole[start:stop].copy() for key, start, stop in parts if key is not None})
    return out


def stored_shapes(arch: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                  keys: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """State key → stored shape (`shapes`, by spec name), a packed bias replaced by its parts'."""
    out = {keys[name]: shape for name, shape in shapes.items()}
    for name, parts in packed(arch).items():
        out.pop(keys[name], None)
        out.update({key: (stop - start,) for key, start, stop in parts if key is not None})
    return out


def _array(value: Any) -> np.ndarray:
    """A part's values as float32 numpy (a torch tensor from a state dict, or an array)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)
