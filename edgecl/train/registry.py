"""Method registry: names → method classes, imported lazily so `edgecl` stays light. New methods add one line."""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from edgecl.arch import Arch
from edgecl.errors import UsageError

_METHODS = {
    "lps": "edgecl.train.methods.lps:LPS",
    "agscl": "edgecl.train.methods.agscl:AGSCL",
    "halrp": "edgecl.train.methods.halrp:HALRP",
    "rgo": "edgecl.train.methods.rgo:RGO",
    "finetune": "edgecl.train.methods.finetune:Finetune",
    "stl": "edgecl.train.methods.stl:STL",
}


def known() -> list[str]:
    """Every registered method name, whether or not its module is present in this build."""
    return list(_METHODS)


def available() -> list[str]:
    """Names of the methods whose module is present."""
    return [n for n, target in _METHODS.items() if importlib.util.find_spec(target.split(":")[0]) is not None]


def method_class(name: str):
    if name not in _METHODS:
        raise UsageError(f"unknown method {name!r} (known: {', '.join(_METHODS)})")
    module, cls = _METHODS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise UsageError(f"method {name!r} is not implemented in this build") from None
        raise


def create(name: str, arch: Arch, config: dict[str, Any] | None = None):
    """A method by name with config overrides from a JSON-able dict (unknown fields are an error)."""
    cls = method_class(name)
    return cls(arch, cls.Config.from_json(config or {}))
