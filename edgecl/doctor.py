"""What the runtime will use on this machine, checked before an artifact is deployed to it (`edgecl doctor`).

Reports onnxruntime's execution providers and what `backend="auto"` resolves to on each device (or why it cannot),
whether task switches write masked weights with the compiled loop or the 2× slower numpy fallback (and why), whether
TensorRT is installed, and the package versions, plus a real CPU check. Imports no torch and reads no artifact, so it
runs on a bare device."""
from __future__ import annotations

import json
from importlib import metadata
from typing import Any

from edgecl import __version__
from edgecl.errors import UsageError
from edgecl.machine import format_machine, machine_info


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def report() -> dict[str, Any]:
    """The facts `doctor` prints, as a JSON-able dict."""
    out: dict[str, Any] = {"edgecl": __version__, "machine": machine_info(), "runtime_ready": False}
    try:
        import onnxruntime as ort

        from edgecl.runtime import maskfill
        from edgecl.runtime.providers import DEVICES, resolve_providers
    except ImportError as exc:
        out["onnxruntime"] = {"error": f"cannot import onnxruntime ({exc}); install edgecl[runtime] (CPU) or "
                                       f"edgecl[gpu]"}
        return out
    out["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    devices = {}
    for device in DEVICES:
        try:
            devices[device] = {"providers": resolve_providers("auto", device)}
        except UsageError as exc:
            devices[device] = {"error": str(exc)}
    out["auto"] = devices
    out["masked_fill"] = {"implementation": maskfill.IMPLEMENTATION, **maskfill.STATUS}
    out["tensorrt"] = _version("tensorrt")
    out["torch"] = _version("torch")
    out["cpu_check"] = _cpu_check()
    out["runtime_ready"] = "providers" in devices["cpu"] and out["cpu_check"] == "ok"
    return out


def _cpu_check() -> str:
    """Switch and infer a small two-task LPS model on the CPU and compare with numpy's own forward pass: "ok", or
    what went wrong (a broken onnxruntime install shows here, not on the first real request)."""
    import numpy as np

    from edgecl.arch.presets import preset
    from edgecl.deltas import materialize
    from edgecl.runtime import TaskRuntime
    from edgecl.synthetic import random_packed

    try:
        packed = random_packed(preset("mlp"), n_tasks=2, shape="lps", classes=(10, 4))
        runtime = TaskRuntime(packed, strategy="inplace", cache_tasks=1, threads=1)
        x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
        for t in (1, 0):
            w = materialize(packed, t)
            h = np.maximum(x.reshape(3, -1) @ w["fc1.weight"].T + w["fc1.bias"], 0)
            h = np.maximum(h @ w["fc2.weight"].T + w["fc2.bias"], 0)
            error = float(np.abs(runtime.infer(x, task=t) - (h @ w["head.weight"].T + w["head.bias"])).max())
            if not error < 1e-4:
                return f"task {t} differs from numpy's forward pass by {error:.3g}"
        runtime.close()
    except Exception as exc:  # the point is to report any failure, whatever raised it
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def format_report(r: dict[str, Any]) -> str:
    lines = [f"edgecl {r['edgecl']}", format_machine(r["machine"])]
    ort = r["onnxruntime"]
    if "error" in ort:
        return "\n".join(lines + [f"onnxruntime: {ort['error']}", "runtime NOT ready on this machine"])
    lines.append(f"onnxruntime {ort['version']}: {', '.join(ort['providers'])}")
    for device, entry in r["auto"].items():
        got = ", ".join(entry["providers"]) if "providers" in entry else f"unavailable: {entry['error']}"
        lines.append(f"  device {device:4} backend auto -> {got}")
    fill = r["masked_fill"]
    if fill["implementation"] != "numpy":
        lines.append(f"masked-weight fill: compiled loop, build {fill['implementation']} ({fill['build']}; "
                     f"{fill['library']})")
    else:
        lines.append(f"masked-weight fill: numpy fallback, ~2x slower LPS switches ({fill['why']})")
    lines.append(f"tensorrt: {r['tensorrt'] or 'not installed'}")
    lines.append(f"torch: {r['torch'] or 'not installed'} (the runtime does not need it)")
    lines.append(f"CPU check (two-task LPS model, switch + infer vs numpy): {r['cpu_check']}")
    lines.append("runtime ready on CPU" if r["runtime_ready"] else "runtime NOT ready on this machine")
    return "\n".join(lines)


def print_report(as_json: bool = False) -> int:
    """Print the report (text or JSON); 0 when the CPU runtime works here, 1 when it cannot."""
    r = report()
    print(json.dumps(r, indent=2) if as_json else format_report(r))
    return 0 if r["runtime_ready"] else 1
