"""What `edgecl compare` is asked to do: the spec, and the parsing and checks of its parts. Torch-free except the CUDA
check; every error is a `UsageError` (exit 2) raised before the first run starts."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from edgecl.arch.factories import check_arch_string
from edgecl.checks import MAX_SEEDS, SEED_MAX
from edgecl.config import parse_overrides
from edgecl.errors import UsageError
from edgecl.train import registry
from edgecl.train.compute import check_threads, require_device
from edgecl.train.data import check_stream

DEFAULT_METHODS = ("lps", "agscl", "halrp", "rgo", "finetune", "stl")


@dataclass
class CompareSpec:
    """Everything one comparison needs; built by the CLI, usable from Python."""

    stream: str = "permuted-digits"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    orders: int = 0
    n_tasks: int | None = None
    arch: str = "mlp"  # a preset, a .json spec or module:factory (edgecl.arch.factories)
    input_shape: tuple[int, ...] | None = None  # resizes the digit streams
    classifier: bool | None = None  # False: the factory's module is the trunk
    factory_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments for a factory (--arch-arg)
    epochs_scale: float = 1.0
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads; None leaves torch's setting (the CLI passes its --threads)
    timing_repeats: int = 5
    progress: bool = True
    verbose: bool = False


# ---------------------------------------------------------------- input parsing (all errors are UsageError → exit 2)

def parse_seeds(text: str) -> list[int]:
    """'3' → seeds 0, 1, 2; '0,4,7' → exactly those seeds."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            count = int(text)
            seeds = list(range(count)) if 1 <= count <= MAX_SEEDS else []
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or max(seeds) > SEED_MAX or len(set(seeds)) != len(seeds) \
            or len(seeds) > MAX_SEEDS:
        raise UsageError(f"--seeds expects a count in [1, {MAX_SEEDS}] or a comma-separated list of distinct seeds in "
                         f"[0, {SEED_MAX}], got {text[:60]!r}")
    return seeds


def parse_methods(text: str) -> list[str]:
    """Comma-separated method names; an unknown name is an error (a known one that is not built is skipped later)."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UsageError("--methods is empty")
    unknown = [n for n in names if n not in registry.known()]
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(map(repr, unknown))} (known: {', '.join(registry.known())})")
    if len(set(names)) != len(names):
        raise UsageError(f"--methods names a method twice: {text!r}")
    return names


def parse_config_overrides(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """`METHOD.FIELD=VALUE` items (VALUE as JSON when it parses) → {method: {field: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not (sep and dot and method and name):
            raise UsageError(f"--config expects METHOD.FIELD=VALUE (e.g. lps.epochs=5), got {item!r}")
        if method not in methods:
            raise UsageError(f"--config {item!r}: method {method!r} is not among --methods ({', '.join(methods)})")
        out.setdefault(method, {}).update(parse_overrides([f"{name}={value}"], flag="--config"))
    return out


def split_available(methods: list[str]) -> tuple[list[str], dict[str, str]]:
    """(methods present in this build, {missing method: why it is skipped})."""
    present = set(registry.available())
    skipped = {m: f"method {m!r} is not available in this build (its module is missing)" for m in methods
               if m not in present}
    return [m for m in methods if m in present], skipped


def method_config(name: str, spec: CompareSpec, seed: int) -> dict[str, Any]:
    """The method's default config with `epochs` scaled by --epochs-scale (phases the method derives from `epochs`
    follow it; other explicit epoch fields stay), then the user's overrides and the seed. Validated here, before any
    training, so a bad override fails in the first second rather than after twenty minutes."""
    cls = registry.config_class(name)
    config = cls().to_json()
    overrides = spec.overrides.get(name, {})
    default = config.get("epochs")
    scaled = spec.epochs_scale != 1.0 and isinstance(default, int) and "epochs" not in overrides
    config.update(overrides)
    config["seed"] = seed
    # scaled down, epochs stop at the least the rest of the config allows (HALRP: warmup_epochs + 1), not below
    wanted = max(1, round(default * spec.epochs_scale)) if scaled else None
    tries = [None] if wanted is None else list(range(wanted, default + 1)) if wanted < default else [wanted]
    problem: UsageError | None = None
    for epochs in tries:
        if epochs is not None:
            config["epochs"] = epochs
        try:
            return cls.from_json(config).to_json()
        except UsageError as exc:
            problem = exc
    raise UsageError(f"{name} config (after --epochs-scale {spec.epochs_scale} and --config): {problem}") from None


def check_spec(spec: CompareSpec) -> None:
    """What can be refused before anything is trained (the device's availability imports torch)."""
    if not spec.seeds or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= SEED_MAX
                             for s in spec.seeds):
        raise UsageError(f"seeds must be a non-empty list of integers in [0, {SEED_MAX}], got {spec.seeds[:8]}")
    if spec.orders < 0 or spec.orders == 1:
        raise UsageError(f"--orders must be 0 (off) or ≥ 2 (task orders to compare), got {spec.orders}")
    if not (spec.epochs_scale > 0 and math.isfinite(spec.epochs_scale)):
        raise UsageError(f"--epochs-scale must be a positive number, got {spec.epochs_scale}")
    if spec.timing_repeats < 1:
        raise UsageError(f"--timing-repeats must be ≥ 1, got {spec.timing_repeats}")
    check_arch_string(spec.arch, spec.factory_args)
    check_stream(spec.stream, spec.n_tasks, spec.input_shape)
    check_threads(spec.threads)
    require_device(spec.device)
