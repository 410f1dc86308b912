"""Method configs: typed dataclasses, checked field by field when built, stored as JSON in the artifact.

Torch-free on purpose: `edgecl train` validates the method's name, `--set KEY=VALUE` values and every field's type and
range before torch is imported or any data is built, so a typo costs a second and an exit code 2, not a traceback
after minutes of training. Types come from the dataclass annotations (int, float (an int is accepted), bool, str,
`Literal[...]` for a fixed set of choices, `X | None`); ranges from each class's `BOUNDS`; rules across fields from
its `check()` hook. Every bad value raises `UsageError` naming the config class, the field and what it expects.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from edgecl.checks import SEED_MAX
from edgecl.errors import UsageError


@dataclass(frozen=True)
class Bounds:
    """A numeric range; `low_open`/`high_open` exclude the end point. None leaves that side unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '≥'} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '≤'} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(value: float | None) -> str:
    """A bound as written: integers in full (a seed's 4294967295, not 4.29497e+09), other numbers compactly."""
    if value is None:
        return ""
    return str(int(value)) if isinstance(value, int) or (isinstance(value, float) and value.is_integer()
                                                         and abs(value) < 1e16) else f"{value:g}"


def at_least(low: float) -> Bounds:
    return Bounds(low)


def above(low: float) -> Bounds:
    return Bounds(low, low_open=True)


# What a method does with BatchNorm (`edgecl.train.batchnorm`): each task learns its own affine pair and statistics,
# or task 0 learns them and later tasks keep them fixed.
BatchNormRule = Literal["task", "frozen"]

FRACTION = Bounds(0.0, 1.0)  # a share of something, both ends allowed
POSITIVE_FRACTION = Bounds(0.0, 1.0, low_open=True)


@dataclass
class MethodConfig:
    """Fields every method has; each method's config dataclass extends this (and may add `BOUNDS` and `check`).

    `batch_size` is the global mini-batch, the figure the papers name: trained on N ranks (`edgecl train --nproc N`,
    torchrun), each rank computes batch_size/N samples of every batch (`edgecl.train.distributed`)."""

    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 10
    seed: int = 0

    BOUNDS: ClassVar[dict[str, Bounds]] = {"lr": above(0), "batch_size": at_least(1), "epochs": at_least(1),
                                           "seed": Bounds(0, SEED_MAX)}  # seed * 1000 + task seeds torch

    def __post_init__(self) -> None:
        problems = _field_problems(self)
        if not problems:
            problems = self.check()
        if problems:
            raise UsageError(f"{type(self).__name__}: " + "; ".join(problems))

    def check(self) -> list[str]:
        """Rules that relate several fields, as problem sentences naming the fields; runs after the type and range
        checks passed. Subclasses with such rules override it."""
        return []

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "MethodConfig":
        """A config from JSON-able overrides of the defaults; unknown fields and bad values are a `UsageError`."""
        if not isinstance(data, dict):
            raise UsageError(f"{cls.__name__}: expected a JSON object of config fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"{cls.__name__}: unknown config fields {sorted(unknown)} (known: {sorted(known)})")
        return cls(**data)


def bounds_of(cls: type) -> dict[str, Bounds]:
    """Every range that applies to `cls`: its own `BOUNDS` over those of its bases."""
    out: dict[str, Bounds] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("BOUNDS", {}))
    return out


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_problems(config: MethodConfig) -> list[str]:
    """Check each field against its annotation and range; a value of the right kind is normalised in place (an int
    given for a float becomes a float, a numpy scalar a Python one) so the stored JSON is typed consistently."""
    hints, bounds, problems = _hints(type(config)), bounds_of(type(config)), []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        ok, normalised, expected = _conform(value, hints[f.name])
        if not ok:
            problems.append(f"{f.name} must be {expected}, got {value!r}")
            continue
        setattr(config, f.name, normalised)
        limit = bounds.get(f.name)
        if limit is not None and normalised is not None and normalised not in limit:
            problems.append(f"{f.name} must be {limit}, got {value!r}")
    return problems


def _conform(value: Any, hint: Any) -> tuple[bool, Any, str]:
    """(value fits the annotation, the value normalised, what the annotation expects in words)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return True, None, ""
        words = []
        for option in options:
            ok, normalised, expected = _conform(value, option)
            if ok:
                return True, normalised, ""
            words.append(expected)
        return False, value, " or ".join(words) + (" or null" if len(options) < len(typing.get_args(hint)) else "")
    if origin is Literal:
        choices = typing.get_args(hint)
        ok = any(type(value) is type(choice) and value == choice for choice in choices)
        return ok, value, "one of " + ", ".join(map(repr, choices))
    if hint is bool:
        return isinstance(value, bool), value, "true or false"
    if hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return ok, int(value) if ok else value, "an integer"
    if hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value, "a finite number"
    if hint is str:
        return isinstance(value, str), value, "a string"
    raise TypeError(f"config field annotation {hint!r} is not supported")  # a programming error, not user input


def parse_overrides(items: list[str], flag: str = "--set") -> dict[str, Any]:
    """`KEY=VALUE` pairs (`--set epochs=5`); VALUE is JSON when it parses, else a string. A key given again takes
    the later value, as scripts that append an override to a base command expect."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        except ValueError:  # valid JSON Python will not convert: an integer of more than 4300 digits
            raise UsageError(f"{flag} {key}: a number of {len(value)} characters is out of any config field's "
                             "range") from None
    return out
