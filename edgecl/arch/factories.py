"""`--arch` resolution: a preset name, a saved spec (``.json``), or a model factory — ``module:factory`` (e.g.
``torchvision.models:resnet18``), ``timm:MODEL`` (``timm.create_model``), or ``path/to/file.py:factory`` — turned
into a spec for a given input shape. Factories are called without pretrained weights (``weights=None`` /
``pretrained=False`` where the factory takes them): nothing is downloaded. torch is imported only for factories."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from typing import Any, Iterator

from edgecl.arch.presets import PRESETS, preset
from edgecl.arch.spec import Arch, validate
from edgecl.errors import UsageError


# what every factory that takes them gets: edgecl downloads nothing (torchvision's detection and segmentation
# factories fetch an ImageNet backbone unless weights_backbone=None)
NO_DOWNLOAD_ARGS = {"weights": None, "weights_backbone": None, "pretrained": False}


def check_arch_string(value: str, factory_args: dict[str, Any] | None = None) -> None:
    """Refuse what cannot name an architecture, without torch: an unknown preset, a missing .json file, a malformed
    module:factory, factory arguments for what is not a factory or asking for downloaded weights. (Whether the
    factory exists is known only once its module is imported.)"""
    _check_factory_args(value, factory_args)
    if not isinstance(value, str) or not value:
        raise UsageError(f"--arch must be a preset ({', '.join(PRESETS)}), a .json spec or module:factory")
    if value in PRESETS:
        return
    if value.endswith(".json"):
        if not os.path.isfile(value):
            raise UsageError(f"--arch {value}: file not found")
        return
    target, _, attr = value.rpartition(":")
    if not target or not attr or not attr.isidentifier() and target != "timm":
        raise _unknown(value)


def _check_factory_args(value: str, factory_args: dict[str, Any] | None) -> None:
    if not factory_args:
        return
    why = not_a_factory(value)
    if why:
        raise UsageError(f"--arch-arg {', '.join(factory_args)}: arguments go to a model factory (module:factory, "
                         f"timm:NAME, file.py:factory), and {why}")
    for key in NO_DOWNLOAD_ARGS:
        if factory_args.get(key) not in (None, False):  # null / false: what edgecl passes anyway
            raise UsageError(f"--arch-arg {key}={factory_args[key]!r}: edgecl builds factories without downloaded "
                             "weights; `edgecl train --init-weights` brings your own (README: Starting from your "
                             "weights)")
    bad = [k for k in factory_args if not k.isidentifier()]
    if bad:
        raise UsageError(f"--arch-arg {bad[0]!r}: not a Python keyword argument name")


def resolve_arch(value: str, input_shape: tuple[int, ...], *, classifier: bool | None = None,
                 factory_args: dict[str, Any] | None = None) -> Arch:
    """The spec `value` names, for inputs of `input_shape` (without batch); UsageError naming what is wrong.
    `factory_args`: keyword arguments for a factory (``--arch-arg width_mult=0.5``)."""
    return resolve_arch_and_module(value, input_shape, classifier=classifier, factory_args=factory_args)[0]


def is_factory(value: str) -> bool:
    """True when `value` names a model factory (module:factory, timm:NAME, file.py:factory), not a preset or spec."""
    return value not in PRESETS and not value.endswith(".json") and ":" in value


def not_a_factory(value: str | None) -> str | None:
    """Why `value` (an --arch) builds no module — for options that need one (--arch-arg, --init-weights module) —
    or None when it names a factory."""
    if not value:
        return "no --arch is given"
    return None if isinstance(value, str) and is_factory(value) else f"--arch {value} is a preset or a saved spec"


def resolve_arch_and_module(value: str, input_shape: tuple[int, ...], *, classifier: bool | None = None,
                            factory_args: dict[str, Any] | None = None) -> tuple[Arch, Any]:
    """`resolve_arch`, with the `torch.nn.Module` a factory built (its weights can be the starting point); None for
    a preset or a spec file."""
    _check_factory_args(value, factory_args)
    if not isinstance(value, str) or not value:
        raise UsageError(f"--arch must be a preset ({', '.join(PRESETS)}), a .json spec or module:factory")
    if value in PRESETS:
        return preset(value, tuple(input_shape)), None
    if value.endswith(".json"):
        return _spec_file(value, input_shape), None
    if ":" in value:
        from edgecl.arch.fx_import import from_torch

        module = build_module(value, factory_args)
        return from_torch(module, input_shape, classifier=classifier, name=value.rsplit(":", 1)[1]), module
    raise _unknown(value)


def _unknown(value: str) -> UsageError:
    """The refusal of an --arch that is none of the forms, naming the factory form a file path needs ('net.py'
    alone does not say which callable builds the module)."""
    hint = (f" ({value} is a Python file: add the factory that builds your module, e.g. {value}:build)"
            if value.endswith(".py") else "")
    return UsageError(f"unknown architecture {value!r}{hint}: use a preset ({', '.join(PRESETS)}), a .json spec file, "
                      "path/to/file.py:factory or module:factory (e.g. torchvision.models:resnet18, "
                      "timm:mobilenetv3_small_050)")


def _spec_file(path: str, input_shape: tuple[int, ...]) -> Arch:
    try:
        with open(path) as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError(f"{path}: not a readable JSON spec ({str(exc)[:200]})") from None
    try:
        arch = validate(spec)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None
    if tuple(arch["input_shape"]) != tuple(input_shape):
        raise UsageError(f"{path}: the spec takes inputs of shape {tuple(arch['input_shape'])}, the data has "
                         f"{tuple(input_shape)}")
    return arch


def build_module(value: str, factory_args: dict[str, Any] | None = None) -> Any:
    """The `torch.nn.Module` a ``module:factory`` / ``timm:MODEL`` / ``file.py:factory`` string names, built without
    pretrained weights, with `factory_args` as keyword arguments."""
    _check_factory_args(value, factory_args)
    extra = {k: v for k, v in (factory_args or {}).items() if k not in NO_DOWNLOAD_ARGS}  # those are forced
    target, _, attr = value.rpartition(":")
    if not target or not attr:
        raise UsageError(f"--arch {value!r}: expected module:factory")
    if target == "timm":
        timm = _import("timm", value)
        if attr not in timm.list_models():
            raise UsageError(f"--arch {value!r}: timm has no model {attr!r}")
        return _call(timm.create_model, value, extra, attr, **{**extra, "pretrained": False})
    with _script_folder(target if target.endswith(".py") else None):
        module = _import_file(target, value) if target.endswith(".py") else _import(target, value)
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise UsageError(f"--arch {value!r}: {target} has no callable {attr!r}")
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        kwargs = {**{k: v for k, v in NO_DOWNLOAD_ARGS.items() if k in params}, **extra}
        model = _call(factory, value, extra, **kwargs)
    import torch

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--arch {value!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _call(factory: Any, value: str, user_args: dict[str, Any], /, *args: Any, **kwargs: Any) -> Any:
    """factory(*args, **kwargs); whatever it raises becomes a UsageError naming the factory and the user's
    --arch-arg values (a user's factory may raise anything)."""
    try:
        return factory(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        given = f" with {', '.join(f'{k}={v!r}' for k, v in user_args.items())}" if user_args else ""
        said = (str(exc).strip().splitlines() or [""])[0]  # torch's C++ errors append a stack: the first line says it
        raise UsageError(f"--arch {value!r}: the factory{given} raised {type(exc).__name__}: {said[:300]}"
                         ) from None


def _import(name: str, value: str) -> Any:
    if name == "torchvision" or name.startswith("torchvision.") or name == "timm":
        ensure_torchvision_imports()
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UsageError(f"--arch {value!r}: cannot import {name} ({exc})") from None


def _import_file(path: str, value: str) -> Any:
    if not os.path.isfile(path):
        raise UsageError(f"--arch {value!r}: file not found: {path}")
    ensure_torchvision_imports()  # a user's file imports torchvision as it pleases
    name = f"edgecl_user_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as `import` does: dataclasses, pickling and typing look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise UsageError(f"--arch {value!r}: importing {path} raised {type(exc).__name__}: {str(exc)[:300]}") from None
    return module


@contextlib.contextmanager
def _script_folder(path: str | None) -> Iterator[None]:
    """A user's model file runs as Python runs a script: its own folder first on sys.path while it is imported and
    its factory called, so ``from helper import block`` finds helper.py beside it, at the top of the file or inside
    the factory. sys.path is restored afterwards; modules it imported stay cached by name, as any import."""
    if path is None:
        yield
        return
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        if folder in sys.path:  # the first equal entry: ours, unless the file put the same folder first itself
            sys.path.remove(folder)


def ensure_torchvision_imports() -> None:
    """Make `import torchvision` work where its compiled ops were built for another torch (PyPI's torchvision wheel
    is the CUDA build; on a CPU-only torch its ``_C`` library cannot load, and torchvision 0.28 then fails at import
    on two unconditional fake-kernel registrations). edgecl uses only torchvision's pure-Python model definitions,
    so when the library does not load, the two op schemas are declared (no kernels) and the import goes through.
    A torchvision whose library loads is left untouched."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    import torch

    folder = os.path.dirname(importlib.util.find_spec("torchvision").origin)
    library = next((os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.startswith("_C.")), None)
    if library is not None:
        try:
            torch.ops.load_library(library)
            return
        except (OSError, RuntimeError):
            pass
    fragment = torch.library.Library("torchvision", "FRAGMENT")
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        try:
            fragment.define(schema)
        except RuntimeError:  # already declared
            pass
    _FRAGMENTS.append(fragment)  # a Library deregisters its definitions when collected


_FRAGMENTS: list[Any] = []
