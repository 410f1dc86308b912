"""Starting weights: train from a network's own (pretrained or earlier trained) values instead of a fresh draw.

Every method draws its trunk through `Method.initial_params`; given starting weights, those draws take the given
values in place of the random ones (the heads stay fresh: each task has its own classes). Where a method draws
again later — LPS's free weights and STL's model for every task, AGS-CL's re-initialised nodes — it draws the
starting values again, so every task starts from what the user brought. The values are checked here once: every
trunk tensor of the spec present by its state-dict name, with its shape, float, finite, BatchNorm variances ≥ 0.

They come from a `torch.nn.Module` (its `state_dict()`), a mapping of arrays, or a file: ``.npz`` or
``.safetensors`` keyed by state-dict names. Neither format can execute code; torch's pickled ``.pt`` is refused (a
model factory that loads it, with ``--init-weights module``, is the user's own code running). A file's arrays are
judged by their headers before any data is read, and arrays the spec does not name are never read. The values'
SHA-256 is recorded in the artifact (``extra["initial_weights"]``), so `--resume` can insist on the same start.
"""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from edgecl.arch.bias_parts import gather, stored_shapes
from edgecl.arch.module_state import from_module, state_keys, state_shapes, to_module_state
from edgecl.arch.ops import CHANNEL_AFFINE_OPS
from edgecl.arch.spec import Arch, param_shapes
from edgecl.artifact.report import INITIAL_WEIGHTS, initial_weights
from edgecl.errors import EdgeclWarning, UsageError
from edgecl.npy import read_npy_header

SUFFIXES = (".npz", ".safetensors")


@dataclass(frozen=True)
class StartingWeights:
    """Checked float32 values of every trunk tensor, by spec name, with where they came from and their digest."""

    values: dict[str, np.ndarray]
    source: str
    sha256: str

    def record(self) -> dict[str, Any]:
        """What the artifact keeps: enough to recognise the same start, not the values themselves."""
        return {"sha256": self.sha256, "source": self.source, "tensors": len(self.values)}


def starting_weights(source: Any, arch: Arch, *, label: str | None = None) -> StartingWeights:
    """Check `source` — a torch.nn.Module, a mapping name → array, or a path to an .npz/.safetensors file — against
    `arch`'s trunk tensors; UsageError naming the file and tensor for anything missing, misshapen or non-finite."""
    if isinstance(source, StartingWeights):  # checked for some spec: checked again for this one, as stored
        keys, shapes = state_keys(arch), param_shapes(arch)
        spec_shaped = {k: v for k, v in source.values.items() if v.shape == shapes.get(k)}
        others = {keys.get(k, k): v for k, v in source.values.items() if k not in spec_shaped}
        return _checked({**others, **to_module_state(arch, spec_shaped)}, arch, source.source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        values, held = read_weights_file(path, arch)
        return _checked(values, arch, label or os.path.basename(path), held)
    if isinstance(source, Mapping):
        return _checked(dict(source), arch, label or "<arrays>")
    state_dict = getattr(source, "state_dict", None)
    if callable(state_dict):  # its tensors (and those an earlier Swin V2 spec holds that it computes), converted
        # (`_float32`) only where the spec names them
        from edgecl.arch.module_values import module_values  # torch's: a module was given

        return _checked(module_values(source, arch), arch, label or f"module {type(source).__name__}")
    raise UsageError(f"starting weights must be a torch.nn.Module, a mapping of arrays or an .npz/.safetensors file, "
                     f"not {type(source).__name__}")


MODULE = "module"  # --init-weights module: the weights of the module the --arch factory builds


def check_init_source(value: str, arch_name: str | None, resume: str | None = None) -> None:
    """Refuse an --init-weights that cannot work, before torch or data: `module` without a factory --arch, a file
    that is missing or of a format that would execute code on loading."""
    if value == MODULE:
        from edgecl.arch.factories import not_a_factory

        why = not_a_factory(arch_name)
        if why:
            raise UsageError(f"--init-weights module takes the weights of the module that the --arch factory builds "
                             f"(module:factory, timm:NAME, file.py:factory), and {why}"
                             f"{' (with --resume, give --arch too)' if resume and not arch_name else ''}; or pass "
                             "an .npz/.safetensors file of weights")
        return
    _check_file(value)


def _check_file(path: str) -> None:
    """A weights file by name and kind: a format that cannot execute code, a regular file that exists."""
    if not path:
        raise UsageError("--init-weights: an empty path; give 'module' or an .npz/.safetensors file")
    lower = path.lower()
    if lower.endswith((".pt", ".pth", ".bin", ".ckpt")):
        raise UsageError(f"{path}: torch checkpoints are pickles, which loading would have to execute; save the "
                         "state dict as .npz (np.savez(path, **{k: v.numpy() for k, v in sd.items()})) or "
                         ".safetensors, or load it in your --arch factory and pass --init-weights module")
    if not lower.endswith(SUFFIXES):
        raise UsageError(f"{path}: starting weights are an .npz or .safetensors file keyed by state-dict names "
                         f"(or --init-weights {MODULE})")
    if not os.path.exists(path):
        raise UsageError(f"{path}: file not found")
    if not os.path.isfile(path):  # a folder, a FIFO (whose open would wait for a writer), a device
        raise UsageError(f"{path}: not a regular file")


def warn_unused_batchnorm(start: StartingWeights, arch: Arch, method: str, rule: str | None) -> None:
    """BatchNorm held at the identity (RGO's default rule) discards the starting BatchNorm values, and a pretrained
    network's features without them are not its features: say so rather than train from half a start."""
    held = sorted({n["op"] for n in arch["nodes"] if n["op"] in CHANNEL_AFFINE_OPS})
    if rule == "identity" and held:
        warnings.warn(f"{method} holds BatchNorm at the identity (batchnorm='identity'), so the "
                      f"{'/'.join(held)} values of {start.source} are not used; --set batchnorm=task keeps them as "
                      "every task's start",
                      EdgeclWarning, stacklevel=3)


def record(packed: Any, recorded: dict[str, Any] | None) -> None:
    """Stamp a packed model with the record of the start it was trained from (`INITIAL_WEIGHTS` in its extra)."""
    if recorded is not None:
        packed.extra[INITIAL_WEIGHTS] = dict(recorded)


def check_resumed_start(extra: dict[str, Any], start: StartingWeights | None, resume: str,
                        redraws: bool) -> dict[str, Any] | None:
    """The start a resumed run goes on from, checked against the artifact's record: the same weights (by digest),
    or a fresh draw if it was trained from one. A method whose later tasks draw the trunk again (`redraws`: LPS's
    free weights, STL's models, AGS-CL's re-initialised nodes) needs them given again; the others keep the record
    without them. Returns the record the new artifact carries."""
    try:
        recorded = initial_weights(extra)
    except ValueError as exc:
        raise UsageError(f"{resume}: {exc}") from None
    if recorded is None and start is None:
        return None
    if recorded is None:
        raise UsageError(f"{resume} was trained from a fresh draw, not from starting weights; --resume continues it "
                         "as it was: drop --init-weights")
    where = f"({recorded['source']}, sha256 {recorded['sha256'][:12]}…)"
    if start is None:
        if redraws:
            raise UsageError(f"{resume} was trained from starting weights {where} and its new tasks start from them "
                             "too: pass the same --init-weights")
        return dict(extra[INITIAL_WEIGHTS])
    if start.sha256 != recorded["sha256"]:
        raise UsageError(f"{resume} was trained from other starting weights {where} than {start.source} (sha256 "
                         f"{start.sha256[:12]}…); pass the ones it was trained from")
    return start.record()


def _checked(values: dict[str, Any], arch: Arch, where: str, held: list[str] | None = None) -> StartingWeights:
    """`values` keyed by the module's state-dict keys (`state_keys`), checked; the result keyed by spec names."""
    shapes, keys, stored = param_shapes(arch), state_keys(arch), state_shapes(arch)
    values = gather(arch, values)  # a bias the module stores in parts, put together
    missing = [keys[name] for name in shapes if keys[name] not in values]
    if missing:
        held = sorted(values) if held is None else held
        raise UsageError(f"{where}: no starting value for {len(missing)} of the {len(shapes)} trunk tensors "
                         f"({', '.join(missing[:5])}{', …' if len(missing) > 5 else ''}); tensors are named by the "
                         f"module's state-dict keys (it holds {', '.join(held[:5]) or 'none'}"
                         f"{', …' if len(held) > 5 else ''})")
    out: dict[str, np.ndarray] = {}
    digest = hashlib.sha256()
    for name, shape in shapes.items():
        array = _float32(values[keys[name]], keys[name], where)
        if array.shape != stored[name]:
            raise UsageError(f"{where}: tensor {keys[name]!r} has shape {array.shape}, the architecture needs "
                             f"{stored[name]}")
        array = from_module(arch, name, array)  # a Linear over channels as a 1×1 conv: the same values
        if name.endswith("running_var") and (array < 0).any():
            raise UsageError(f"{where}: tensor {keys[name]!r} holds negative variances")
        digest.update(f"{name}:{shape};".encode())
        digest.update(array.tobytes())
        out[name] = array
    return StartingWeights(out, where, digest.hexdigest())


def _float32(value: Any, name: str, where: str) -> np.ndarray:
    try:
        if hasattr(value, "detach"):  # a torch tensor (a parameter, bfloat16): its float32 values
            value = value.detach().cpu().float().numpy() if value.is_floating_point() else value.cpu().numpy()
        array = np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - whatever the caller passed, the error names the tensor
        raise UsageError(f"{where}: tensor {name!r} is not an array ({type(exc).__name__})") from None
    if array.dtype.kind != "f":
        raise UsageError(f"{where}: tensor {name!r} has dtype {array.dtype}; starting weights are floating point")
    with np.errstate(over="ignore"):
        array = np.array(array, dtype=np.float32, order="C")  # not ascontiguousarray: it makes a () tensor (1,)
    if not np.isfinite(array).all():
        raise UsageError(f"{where}: tensor {name!r} holds {int((~np.isfinite(array)).sum())} NaN, infinite or "
                         "beyond-float32 values")
    return array.copy()


def read_weights_file(path: str, arch: Arch) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays of `path` that `arch`'s trunk names, each judged by its header (shape, dtype) before its data is
    read, the others never read; and the names of every array the file holds (for the error of a missing one)."""
    _check_file(path)
    shapes = stored_shapes(arch, state_shapes(arch), state_keys(arch))  # by the file's names
    if path.lower().endswith(".safetensors"):
        return _read_safetensors(path, shapes)
    return _read_npz(path, shapes)


def _read_npz(path: str, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], list[str]]:
    out: dict[str, np.ndarray] = {}
    held: list[str] = []
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                name = member.filename.removesuffix(".npy")
                if name in held:  # numpy would keep the last one silently
                    raise UsageError(f"{path}: holds {name!r} twice; which one is meant cannot be told")
                held.append(name)
                if name not in shapes:
                    continue
                with archive.open(member) as f:
                    shape, _, dtype = read_npy_header(f)
                    if tuple(shape) != shapes[name]:
                        raise UsageError(f"{path}: tensor {name!r} has shape {tuple(shape)}, the architecture needs "
                                         f"{shapes[name]}")
                    if dtype.kind != "f" or dtype.hasobject or dtype.fields is not None:
                        raise UsageError(f"{path}: tensor {name!r} has dtype {dtype}; starting weights are "
                                         "floating point")
                    f.seek(0)
                    out[name] = np.lib.format.read_array(f, allow_pickle=False)
    except UsageError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, zlib.error, RuntimeError,
            ValueError, OSError) as exc:  # damaged, encrypted or truncated members
        raise UsageError(f"{path}: not a readable .npz file ({str(exc)[:200]})") from None
    return out, held


def _read_safetensors(path: str, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], list[str]]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise UsageError(f"{path}: reading .safetensors needs the safetensors package (pip install safetensors); "
                         "or save the weights as .npz") from None
    out: dict[str, np.ndarray] = {}
    held: list[str] = []
    try:
        with safe_open(path, framework="pt") as f:  # torch reads bfloat16 and float8, which numpy cannot
            held = list(f.keys())
            for name in held:
                if name not in shapes:
                    continue
                sliced = f.get_slice(name)
                if tuple(sliced.get_shape()) != shapes[name]:
                    raise UsageError(f"{path}: tensor {name!r} has shape {tuple(sliced.get_shape())}, the "
                                     f"architecture needs {shapes[name]}")
                if not sliced.get_dtype().startswith(("F", "BF")):  # F16, BF16, F32, F64, F8_E4M3, …
                    raise UsageError(f"{path}: tensor {name!r} has dtype {sliced.get_dtype()}; starting weights "
                                     "are floating point")
                out[name] = f.get_tensor(name).float().numpy()
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise UsageError(f"{path}: not a readable .safetensors file ({type(exc).__name__}: {str(exc)[:200]})"
                         ) from None
    return out, held
