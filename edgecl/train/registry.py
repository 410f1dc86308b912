"""Method registry: names → method classes and their config classes, imported lazily so `edgecl` stays light.

A method's config lives in a torch-free module beside it (`methods/<name>_config.py`), so a name or a config value is
refused before torch is imported; only `method_class`/`create` import the method itself. New methods add one line.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any, NamedTuple

from edgecl.arch import Arch
from edgecl.config import MethodConfig
from edgecl.errors import UsageError


class Entry(NamedTuple):
    method: str  # "module:Class" of the method (imports torch)
    config: str  # "module:Class" of its config dataclass (torch-free)


_BASE_CONFIG = "edgecl.config:MethodConfig"
_METHODS = {
    "lps": Entry("edgecl.train.methods.lps:LPS", "edgecl.train.methods.lps_config:LPSConfig"),
    "agscl": Entry("edgecl.train.methods.agscl:AGSCL", "edgecl.train.methods.agscl_config:AGSCLConfig"),
    "halrp": Entry("edgecl.train.methods.halrp:HALRP", "edgecl.train.methods.halrp_config:HALRPConfig"),
    "rgo": Entry("edgecl.train.methods.rgo:RGO", "edgecl.train.methods.rgo_config:RGOConfig"),
    "finetune": Entry("edgecl.train.methods.finetune:Finetune", _BASE_CONFIG),
    "stl": Entry("edgecl.train.methods.stl:STL", _BASE_CONFIG),
}


def known() -> list[str]:
    """Every registered method name, whether or not its module is present in this build."""
    return list(_METHODS)


def available() -> list[str]:
    """Names of the methods whose module is present."""
    return [n for n, entry in _METHODS.items() if importlib.util.find_spec(entry.method.split(":")[0]) is not None]


def entry(name: str) -> Entry:
    """Where the method and its config live; UsageError for an unknown name (nothing is imported)."""
    if name not in _METHODS:
        raise UsageError(f"unknown method {name!r} (known: {', '.join(_METHODS)})")
    return _METHODS[name]


def _import(name: str, target: str) -> Any:
    module, attr = target.split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise UsageError(f"method {name!r} is not implemented in this build") from None
        raise


def config_class(name: str) -> type[MethodConfig]:
    """The method's config dataclass, without importing torch."""
    return _import(name, entry(name).config)


def check_config(name: str, data: dict[str, Any] | None = None) -> MethodConfig:
    """The method's config from JSON-able overrides of its defaults, validated (UsageError naming the field)."""
    return config_class(name).from_json(data or {})


def method_class(name: str):
    return _import(name, entry(name).method)


def create(name: str, arch: Arch, config: dict[str, Any] | None = None, start: Any = None):
    """A method by name with config overrides from a JSON-able dict (unknown fields are an error). `start`: starting
    weights for the trunk instead of a fresh draw — a torch.nn.Module (a pretrained or trained one), a mapping of
    arrays by state-dict name, an .npz/.safetensors path, or `edgecl.train.initial.StartingWeights`."""
    cls = method_class(name)
    config_obj = cls.Config.from_json(config or {})
    if start is None:
        return cls(arch, config_obj)
    from edgecl.train.initial import StartingWeights, starting_weights, warn_unused_batchnorm

    checked = start if isinstance(start, StartingWeights) else starting_weights(start, arch)
    warn_unused_batchnorm(checked, arch, name, getattr(config_obj, "batchnorm", None))
    return cls(arch, config_obj, checked)
