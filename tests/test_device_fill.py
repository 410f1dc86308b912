"""The device-resident switch's programs, run on the CPU (numpy as the device): for every delta kind — LPS element,
row and column masks, node masks with column segments and flatten repeats, low rank on linear and conv layers with
and without each factor, permutations (and a task without one), shared and per-task tensors — every tensor the
session reads after a switch equals `deltas.materialize` bit for bit, on the presets and a graph with a residual add,
a concatenation, a depthwise conv and an SE gate. The raw CUDA kernel's element function is compiled as C here too
and checked against its numpy twin, so its arithmetic is tested on a machine without a GPU."""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from edgecl.arch import preset
from edgecl.deltas import materialize
from edgecl.errors import BudgetError
from edgecl.runtime import device_kernel
from edgecl.runtime.budget import Ledger
from edgecl.runtime.device_arrays import HostArrays
from edgecl.runtime.device_fill import ALIGN, DeviceProgram
from edgecl.runtime.plan import read_plans
from edgecl.synthetic import group_node_model, random_packed, structured_lps_model

rng = np.random.default_rng(0)


def _program(packed, factored=False, own_in_slot=False, ledger=None):
    switch = read_plans(packed, factored=factored)
    ledger = ledger or Ledger(None)
    return switch, DeviceProgram(switch.plans, HostArrays(), ledger.reserve, packed.n_tasks,
                                 own_in_slot=own_in_slot)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


def check_bit_identical(packed, factored=False, own_in_slot=False, order=None):
    """Fill one slot task after task (in `order`: misses overwriting other tasks) and compare what is bound."""
    switch, program = _program(packed, factored, own_in_slot)
    slot = program.new_slot()
    slot[:] = np.nan  # whatever a slot held before, the fill must overwrite it
    compared = set()
    for t in order or [packed.n_tasks - 1, *range(packed.n_tasks), 0]:
        program.fill(t, slot)
        dense = materialize(packed, t)
        bound = program.tensors(slot, t)
        for name, want in dense.items():
            if name in bound:
                got = bound[name]
                assert got.shape == want.shape and np.array_equal(_bits(got), _bits(want)), (t, name)
                compared.add(name)
    skipped = {p.name for p in switch.plans if p.plan == "const"}
    assert compared | skipped >= set(packed.params), set(packed.params) - compared - skipped
    return switch, program


DEEP = {"name": "deep", "input_shape": [1, 8, 8], "layers": [
    {"op": "flatten"}, {"op": "linear", "name": "l1", "in": 64, "out": 48}, {"op": "relu"},
    {"op": "linear", "name": "l2", "in": 48, "out": 40}, {"op": "relu"},
    {"op": "linear", "name": "l3", "in": 40, "out": 40}, {"op": "relu"},
    {"op": "linear", "name": "l4", "in": 40, "out": 32}, {"op": "relu"},
    {"op": "linear", "name": "l5", "in": 32, "out": 24}, {"op": "relu"}]}


@pytest.mark.parametrize("arch", ["mlp", "lenet", "resnet"])
@pytest.mark.parametrize("shape", ["lps", "finetune", "mixed", "node", "lowrank", "permute"])
def test_every_synthetic_kind_on_the_presets(arch, shape):
    check_bit_identical(random_packed(preset(arch), n_tasks=4, shape=shape, classes=(10, 3, 7)))


def test_mixed_kinds_with_own_tensors_in_the_slot():
    """The CUDA-graph layout (every per-task tensor copied into the slot, heads of different sizes): same bits."""
    from edgecl.arch import validate

    packed = random_packed(validate(DEEP), n_tasks=5, shape="mixed", classes=(10, 3, 7))
    switch, program = check_bit_identical(packed, own_in_slot=True)
    assert {p.plan for p in switch.plans} == {"static", "own", "masked", "generic", "permute"}
    assert any(seg.per_task_shape for seg in program.segments)  # the heads' segment changes shape


@pytest.mark.parametrize("unit", ["row", "column"])
@pytest.mark.parametrize("arch", ["mlp", "lenet"])
def test_structured_lps_units(unit, arch):
    check_bit_identical(structured_lps_model(preset(arch), keep_fraction=0.3, n_tasks=3, unit=unit))


@pytest.mark.parametrize("arch", ["lenet", "resnet"])
def test_node_masks_with_column_segments_and_repeats(arch):
    """AGS-CL-shaped masks over channel groups: rows and columns, a flatten repeat on lenet's fc1, residual groups
    on the resnet preset (and the factored graph: wide convs' node vectors bound, not filled)."""
    packed = group_node_model(preset(arch), alive_fraction=0.5, n_tasks=3)
    assert any(spec.get("repeat", 1) > 1 for spec in packed.params.values()) or arch == "resnet"
    check_bit_identical(packed)
    check_bit_identical(packed, factored=True)


def test_lowrank_with_and_without_each_factor():
    """Low rank on linear and conv layers: all of r, s, U, V; no residual; no scalings; a rank-0 residual."""
    packed = random_packed(preset("lenet"), n_tasks=4, shape="lowrank")
    for name, spec in packed.params.items():
        if spec["kind"] != "lowrank":
            continue
        del packed.task_tensors[1][f"{name}:u"], packed.task_tensors[1][f"{name}:v"]
        del packed.task_tensors[2][f"{name}:r"], packed.task_tensors[2][f"{name}:s"]
        tt = packed.task_tensors[3]
        tt[f"{name}:u"], tt[f"{name}:v"] = tt[f"{name}:u"][:, :0], tt[f"{name}:v"][:, :0]
    assert {"conv", "linear"} <= {n["op"] for n in packed.arch["nodes"] if packed.params.get(f"{n['name']}.weight",
                                                                                            {}).get("kind")
                                  == "lowrank"}
    check_bit_identical(packed)


def test_permutations_and_a_task_without_one():
    packed = random_packed(preset("lenet"), n_tasks=3, shape="permute")
    packed.tasks[1].seed = None
    check_bit_identical(packed)


def test_graph_with_add_concat_depthwise_and_gate():
    from torch_nets import spec_and_weights

    arch = spec_and_weights("custom residual + concat", (3, 16, 16))[0]
    for shape in ("lps", "mixed", "node", "lowrank", "permute"):
        check_bit_identical(random_packed(arch, n_tasks=3, shape=shape, classes=(5, 3)))


def test_layout_one_masked_range_aligned_and_reserved_first():
    """Masked tensors form one range (one kernel launch), every tensor starts on ALIGN elements, and the device
    ledger refuses before anything is uploaded."""
    packed = random_packed(preset("lenet"), n_tasks=3, shape="lps")
    _, program = _program(packed)
    assert all(seg.offset % ALIGN == 0 for seg in program.segments)
    assert program.masked_elements == program.slot_elements  # every switched tensor is masked here
    ledger = Ledger(None)
    _program(packed, ledger=ledger)
    assert set(ledger.items) == {"device base weights", "device task deltas"}
    assert ledger.items["device task deltas"] == 3 * program.masked_elements // 8 + sum(
        a.nbytes for tt in packed.task_tensors for k, a in tt.items() if k.startswith("head."))
    with pytest.raises(BudgetError, match="device base weights"):
        _program(packed, ledger=Ledger(1000))


def _compiled(tmp_path, source: str, name: str, argtypes: list):
    """A device kernel's C twin built by the host's C compiler and loaded by ctypes."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the kernel's element function")
    src, lib = tmp_path / f"{name}.c", tmp_path / f"{name}.so"
    src.write_text(source)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    fn = getattr(ctypes.CDLL(str(lib)), name)
    fn.argtypes = argtypes
    return fn


def _compiled_kernel(tmp_path):
    return _compiled(tmp_path, device_kernel.c_source(), device_kernel.KERNEL_NAME,
                     [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulonglong])


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 65_537])
def test_cuda_kernel_element_function_compiled_as_c_is_bit_identical(tmp_path, n):
    """The text of the CUDA kernel's element function, compiled by the host's C compiler: bit for bit the numpy
    twin and `where(keep, base, +0.0)`, with NaN, inf and -0.0 in the base."""
    fn = _compiled_kernel(tmp_path)
    base = rng.standard_normal(n).astype(np.float32)
    base[::7], base[3::11], base[5::13] = -0.0, np.inf, np.nan
    keep = rng.random(n) < 0.4
    bits = np.packbits(keep)
    want = np.where(keep, base, np.float32(0.0))
    out_c, out_np = np.full(n, 7.0, np.float32), np.full(n, 7.0, np.float32)
    fn(base.ctypes.data, bits.ctypes.data, out_c.ctypes.data, n)
    device_kernel.masked_select_numpy(base, bits, out_np)
    assert np.array_equal(_bits(out_c), _bits(want)) and np.array_equal(_bits(out_np), _bits(want))


def test_cuda_source_holds_the_same_element_function():
    cuda = device_kernel.cuda_source()
    assert device_kernel.ELEMENT in cuda and device_kernel.ELEMENT in device_kernel.c_source()
    assert f'extern "C" __global__ void {device_kernel.KERNEL_NAME}(' in cuda


def _nvrtc():
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
        return nvrtc
    except Exception as exc:  # noqa: BLE001 - CuPy (the gpu extra) or its NVRTC library absent: CPU installs
        pytest.skip(f"NVRTC through CuPy unavailable: {type(exc).__name__}")


@pytest.mark.parametrize("source, name", [(device_kernel.cuda_source, device_kernel.KERNEL_NAME),
                                          (device_kernel.scale_cuda_source, device_kernel.SCALE_NAME),
                                          (device_kernel.flag_cuda_source, device_kernel.FLAG_NAME)])
def test_cuda_kernel_compiles_with_nvrtc_for_hopper(source, name):
    """Where the gpu extra is installed (no GPU needed): NVRTC, what CuPy compiles the kernels with, accepts each
    source for sm_90 and emits the entry point the runtime launches."""
    nvrtc = _nvrtc()
    program = nvrtc.createProgram(source(), f"{name}.cu", [], [])
    try:
        nvrtc.compileProgram(program, ["--gpu-architecture=compute_90"])
    except Exception:  # noqa: BLE001 - the compiler's log says why
        pytest.fail(nvrtc.getProgramLog(program))
    ptx = nvrtc.getPTX(program)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    assert f".visible .entry {name}(" in ptx and ".target sm_90" in ptx


@pytest.mark.parametrize("source, name", [(device_kernel.cuda_source, device_kernel.KERNEL_NAME),
                                          (device_kernel.scale_cuda_source, device_kernel.SCALE_NAME),
                                          (device_kernel.flag_cuda_source, device_kernel.FLAG_NAME)])
def test_cuda_kernel_compiles_with_nvcc_for_hopper(tmp_path, source, name):
    """Where the CUDA toolkit is installed (no GPU needed; CI's machines have it): nvcc accepts each source for
    sm_90 and emits the entry point with the parameters the runtime passes (a second compiler beside NVRTC)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    src, ptx = tmp_path / f"{name}.cu", tmp_path / f"{name}.ptx"
    src.write_text(source())
    done = subprocess.run([nvcc, "-arch=sm_90", "-ptx", str(src), "-o", str(ptx)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    entry = ptx.read_text().split(f".visible .entry {name}(", 1)[1].split(")", 1)[0]
    params = [line.split()[1] for line in entry.strip().splitlines()]
    assert params == {device_kernel.KERNEL_NAME: [".u64"] * 4, device_kernel.SCALE_NAME: [".u64"] * 5,
                      device_kernel.FLAG_NAME: [".u64"] * 3 + [".u32"]}[name]


def _compiled_flag_kernel(tmp_path):
    return _compiled(tmp_path, device_kernel.flag_c_source(), device_kernel.FLAG_NAME,
                     [ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_void_p, ctypes.c_uint])


@pytest.mark.parametrize("bad", [None, np.inf, -np.inf, np.nan, -np.nan])
@pytest.mark.parametrize("where", [0, 11, -1])
def test_finiteness_kernel_compiled_as_c_flags_what_numpy_flags(tmp_path, bad, where):
    """`infer`'s one-launch finiteness check of a batch or the logits, compiled by the host's C compiler: flags
    exactly when numpy's isfinite does (not for -0.0, subnormals or float32's largest value), wherever the element
    is (first, middle, last), and leaves an earlier token in the flag when it finds nothing."""
    fn = _compiled_flag_kernel(tmp_path)
    a = rng.standard_normal((4, 10)).astype(np.float32)
    a.reshape(-1)[1:5] = -0.0, np.float32(1e-45), np.finfo(np.float32).max, -np.finfo(np.float32).max
    if bad is not None:
        a.reshape(-1)[where] = bad
    flag = np.array([5], np.uint32)
    fn(a.ctypes.data, a.size, flag.ctypes.data, 9)
    assert (flag[0] == 9) == device_kernel.any_nonfinite_numpy(a) == (bad is not None)
    assert flag[0] in (5, 9)


def test_finiteness_kernel_source_shares_its_element_function():
    cuda = device_kernel.flag_cuda_source()
    assert device_kernel.NONFINITE in cuda and device_kernel.NONFINITE in device_kernel.flag_c_source()
    assert f'extern "C" KERNEL void {device_kernel.FLAG_NAME}(' in cuda and "#define KERNEL __global__" in cuda
