"""Long-running coverage-guided fuzzing of the artifact reader (issue 10), beyond the CI's hypothesis cases.

With atheris (`pip install atheris`; not a test dependency) libFuzzer drives edit programs (which corpus artifact,
which bit flips, truncations, insertions, deletions, header lengths) over real artifacts of every delta kind:

    python tools/fuzz_artifact_atheris.py -atheris_runs=200000            # any libFuzzer flags after the script
    python tools/fuzz_artifact_atheris.py --plain 100000                   # no atheris: seeded random mutations

Each mutated file is fully loaded (`load`, `verify`, `materialize` of every task). The only allowed failure is
ArtifactError; a file that loads must materialise exactly like the artifact it was mutated from. Anything else —
another exception, a wrong load, or (--plain mode, via tracemalloc) an allocation beyond the decode bound — aborts
with the input saved under out/fuzz_crashes/.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import artifact_models as am  # noqa: E402
from edgecl.artifact.limits import decode_bound  # noqa: E402

WORK = tempfile.mkdtemp(prefix="edgecl-atheris-")
CRASHES = os.path.join("out", "fuzz_crashes")


def corpus() -> list[tuple[bytes, list[dict]]]:
    """Real artifacts of every delta kind: (bytes, each task's weights)."""
    out = []
    for i, kind in enumerate(am.KINDS):
        raw, _, weights = am.saved_original(kind, i, 3, WORK)
        out.append((raw, weights))
    return out


CORPUS = corpus()


def check(data: bytes, origin: list[dict]) -> str:
    """Load `data` fully; 'rejected' or 'loaded'. AssertionError on a wrong load; other errors propagate."""
    got = am.load_everything(data, os.path.join(WORK, "input.edgecl"))
    if got is None:
        return "rejected"
    tasks, weights, arch = got
    assert len(weights) == len(origin) and all(am.same_weights(a, b) for a, b in zip(weights, origin)), \
        "damaged input loaded different weights"
    assert am.runnable(tasks, weights, arch)
    return "loaded"


def _save_crash(data: bytes) -> str:
    os.makedirs(CRASHES, exist_ok=True)
    path = os.path.join(CRASHES, hashlib.sha1(data).hexdigest()[:16] + ".edgecl")
    with open(path, "wb") as f:
        f.write(data)
    return path


def mutate(raw: bytes, pick) -> bytes:
    """Apply 1-8 edits chosen by `pick(lo, hi)` (an int in [lo, hi]): libFuzzer's bytes under atheris, a seeded
    generator in --plain mode. Knowing the original keeps the oracle: a load that succeeds must be exact."""
    b = bytearray(raw)
    for _ in range(pick(1, 8)):
        op, pos = pick(0, 5), pick(0, len(b))
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << pick(0, 7)
        elif op == 1:
            del b[pos:]
        elif op == 2:
            b[pos:pos] = bytes(pick(0, 255) for _ in range(pick(1, 16)))
        elif op == 3:
            del b[pos:pos + pick(1, 256)]
        elif op == 4:
            b[:8] = pick(0, 2 ** 64 - 1).to_bytes(8, "little")
        else:
            b[pos:pos + 4] = bytes(pick(0, 255) for _ in range(4))
    return bytes(b)


def plain(n: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    counts = {"rejected": 0, "loaded": 0}
    tracemalloc.start()
    for i in range(n):
        raw, weights = CORPUS[int(rng.integers(len(CORPUS)))]
        data = mutate(raw, lambda lo, hi: int(rng.integers(lo, hi, endpoint=True, dtype=np.uint64)))
        tracemalloc.reset_peak()
        try:
            counts[check(data, weights)] += 1
        except BaseException:
            print(f"case {i}: crash, input saved to {_save_crash(data)}", file=sys.stderr)
            raise
        peak = tracemalloc.get_traced_memory()[1]
        bound = decode_bound(len(data))
        if peak > bound:
            raise AssertionError(f"case {i}: allocated {peak} bytes for a {len(data)}-byte file "
                                 f"(bound {bound}); input saved to {_save_crash(data)}")
        if (i + 1) % 10000 == 0:
            print(f"{i + 1} cases: {counts}", flush=True)
    print(f"{n} mutated artifacts: {counts['rejected']} rejected with ArtifactError, {counts['loaded']} loaded "
          "intact; no other exception, no wrong load")
    return 0


def test_one_input(data: bytes) -> None:
    """atheris entry point: the input picks a corpus artifact and the edits to apply to it."""
    import atheris

    fdp = atheris.FuzzedDataProvider(data)
    raw, weights = CORPUS[fdp.ConsumeIntInRange(0, len(CORPUS) - 1)]
    mutated = mutate(raw, fdp.ConsumeIntInRange)
    try:
        check(mutated, weights)
    except BaseException:
        print(f"crash, input saved to {_save_crash(mutated)}", file=sys.stderr)
        raise


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "--plain":
        return plain(int(sys.argv[2]) if len(sys.argv) > 2 else 100_000)
    try:
        import atheris
    except ImportError:
        print("atheris is not installed (pip install atheris); use --plain N for seeded random mutations",
              file=sys.stderr)
        return 2
    atheris.instrument_all()  # coverage feedback from edgecl's (already imported) Python code
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
