"""What a measurement ran on: CPU, cores, GPU and package versions. Benchmarks and `edgecl compare` record it next to
their numbers, because a timing without its machine cannot be compared with anything. Imports nothing heavy: versions
come from package metadata, torch details only when torch is already loaded."""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

PACKAGES = ("edgecl", "numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "safetensors",
            "zstandard", "scikit-learn", "matplotlib")


def cpuinfo(field: str) -> str:
    """The first `field` of /proc/cpuinfo ("model name", "vendor_id", …), or "" where Linux does not tell it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def machine_info() -> dict[str, Any]:
    """JSON-able description of this machine and the package versions in use."""
    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_model(),
        "cpu_vendor": cpuinfo("vendor_id"),  # the masked fill's build depends on it (edgecl.runtime.maskfill)
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "versions": _versions()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def format_machine(info: dict[str, Any]) -> str:
    """One line for the top of a benchmark's printout."""
    versions = " ".join(f"{k}={v}" for k, v in info["versions"].items())
    threads = f", torch threads {info['torch_threads']}" if "torch_threads" in info else ""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (f"machine: {info['cpu']} ({info['cpus_usable']}/{info['cpu_count']} CPUs usable{threads}{gpu}), "
            f"Python {info['python']}, {info['platform']}\nversions: {versions}")
