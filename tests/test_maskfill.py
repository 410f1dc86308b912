"""The masked weight write behind every element-wise LPS switch: compiled loop and numpy fallback, both bit for bit
`where(keep, base, +0.0)`, over whole tensors and thread ranges, with NaN, inf and -0.0 in the base."""
import os
import subprocess
import sys

import numpy as np
import pytest

from edgecl.runtime import maskfill

IMPLS = sorted(maskfill.IMPLEMENTATIONS)


def _case(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(n).astype(np.float32)
    base[:: 7] = -0.0
    base[3:: 11] = np.inf
    base[5:: 13] = np.nan
    keep = rng.random(n) < 0.4
    expected = np.where(keep, base, np.float32(0.0))
    return base, np.packbits(keep), expected


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 1000, 300_001])
def test_whole_tensor_is_bit_identical(impl, n):
    base, bits, expected = _case(n)
    out = np.full(n, 7.0, np.float32)
    maskfill.masked_copy(base, bits, out, implementation=impl)
    assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("impl", IMPLS)
def test_ranges_write_only_their_elements(impl):
    """Threads fill disjoint ranges starting on mask bytes; each call touches its range and nothing else."""
    n = 10_005
    base, bits, expected = _case(n, seed=1)
    out = np.full(n, 7.0, np.float32)
    maskfill.masked_copy(base, bits, out, 8, 4000, implementation=impl)
    assert np.array_equal(out[8:4000].view(np.uint32), expected[8:4000].view(np.uint32))
    assert (out[:8] == 7).all() and (out[4000:] == 7).all()
    maskfill.masked_copy(base, bits, out, 4000, n, implementation=impl)
    maskfill.masked_copy(base, bits, out, 0, 8, implementation=impl)
    assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("bad, match", [
    (dict(base=np.zeros(16, np.float64)), "base must be a C-contiguous float32"),
    (dict(out=np.zeros(32, np.float32)[::2]), "out must be a C-contiguous float32"),
    (dict(out=np.zeros(15, np.float32)), "out must be a writable array of 16"),
    (dict(bits=np.zeros(1, np.uint8)), "1 mask bytes cover 8 elements, base has 16"),
    (dict(lo=4), "start on a multiple of 8"),
    (dict(hi=17), r"must lie in \[0, 16\]"),
    (dict(out="base"), "must not overlap base"),
])
def test_bad_arguments_are_refused_before_the_loop(bad, match):
    """The compiled loop trusts its pointers, so a wrong dtype, layout, size or range is a ValueError first."""
    args = dict(base=np.ones(16, np.float32), bits=np.full(2, 255, np.uint8), out=np.zeros(16, np.float32),
                lo=0, hi=16)
    args.update(bad)
    if isinstance(args["out"], str):
        args["out"] = args["base"]
    with pytest.raises(ValueError, match=match):
        maskfill.masked_copy(**args)


def test_environment_forces_the_numpy_fallback():
    code = "from edgecl.runtime import maskfill; print(maskfill.IMPLEMENTATION)"
    env = dict(os.environ, EDGECL_MASKFILL="numpy")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "numpy"


def test_without_the_compiled_loop_the_runtime_uses_numpy_and_says_why():
    """An install with no C compiler has no `_maskfill` library: the fallback is chosen, and `doctor` says why."""
    code = (
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'edgecl.runtime._maskfill':\n"
        "            raise ImportError('hidden')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from edgecl.runtime import maskfill\n"
        "print(maskfill.IMPLEMENTATION, sorted(maskfill.IMPLEMENTATIONS), maskfill.STATUS['why'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("numpy ['numpy'] not built")


def test_both_compiled_builds_exist_where_the_loop_is_built():
    """`c` (no prefetch) and `c-stream` (non-temporal prefetch) come from one library; a build with only one of them
    is stale and must not be half used."""
    if maskfill.STATUS["library"] is None:
        assert IMPLS == ["numpy"]
    else:
        assert IMPLS == ["c", "c-stream", "numpy"], maskfill.STATUS


def test_the_default_build_follows_the_cpu_vendor():
    """The stream build where it was measured to help (an AMD EPYC), the plain one elsewhere (it halved the loop's
    speed on an Intel Xeon); a forced choice wins."""
    if "c-stream" not in maskfill.IMPLEMENTATIONS:
        pytest.skip("no compiled loop in this install (a C compiler was missing): the numpy fallback is tested above")
    vendor = maskfill.CPU_VENDOR
    expected = os.environ.get("EDGECL_MASKFILL") or ("c-stream" if vendor == "AuthenticAMD" else "c")
    assert maskfill.IMPLEMENTATION == expected
    assert vendor in maskfill.STATUS["build"]


@pytest.mark.parametrize("value,expect", [("c-stream", "c-stream"), ("numpy", "numpy"), ("fast", None)])
def test_environment_picks_a_build_or_is_ignored_with_a_reason(value, expect):
    code = "from edgecl.runtime import maskfill; print(maskfill.IMPLEMENTATION, '|', maskfill.STATUS['why'])"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, EDGECL_MASKFILL=value),
                         capture_output=True, text=True, check=True).stdout
    if expect is None:
        assert "'fast' is not one of" in out
    elif expect != "numpy" and "c-stream" not in maskfill.IMPLEMENTATIONS:
        pytest.skip("no compiled loop in this install")
    else:
        assert out.startswith(f"{expect} |")


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("block,o_blocks,inner", [(8, 3, 8 * 9), (16, 2, 16 * 5), (16, 4, 16 * 64 * 9)])
def test_masked_scale_is_where_keep_base_times_channel_scale(monkeypatch, compiled, block, o_blocks, inner):
    """A blocked conv weight (o_blocks, inner/block, block) masked and scaled per output channel, whole and in
    ranges of whole bytes (the parallel split); the compiled pass and the numpy fallback agree with the reference
    bit for bit: a dropped weight is +0.0 under a negative scale too, a kept -0.0 stays -0.0."""
    if compiled and not maskfill.SCALED:
        pytest.skip("the compiled scaled fill is not built here")
    if not compiled:
        monkeypatch.setattr(maskfill, "SCALED", [])
    rng = np.random.default_rng(block + inner)
    n = o_blocks * inner
    base = rng.standard_normal(n).astype(np.float32)
    base[::7] = -0.0
    keep = rng.random(n) < 0.6
    scale = rng.standard_normal(o_blocks * block).astype(np.float32)
    channel = (np.arange(n) // inner) * block + np.arange(n) % block
    expected = np.where(keep, base * scale[channel], np.float32(0.0))
    out = np.full(n, 7.0, np.float32)
    maskfill.masked_scale(base, np.packbits(keep), scale, out, block)
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))
    out[:] = 7.0
    cuts = [0, 8 * (n // 24), 8 * (n // 12), n]
    for lo, hi in zip(cuts, cuts[1:]):
        maskfill.masked_scale(base, np.packbits(keep), scale, out, block, lo, hi)
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))
    with pytest.raises(ValueError, match="does not cover"):
        maskfill.masked_scale(base, np.packbits(keep), scale[:-1], out, block)
