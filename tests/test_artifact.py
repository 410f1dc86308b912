"""The artifact format (issue 3) and its crash-safe writes (issue 10): real files on disk, real training runs."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pytest
import safetensors.numpy

import artifact_models as am
from edgecl import artifact
from edgecl.cli import main as cli_main
from edgecl.deltas import materialize
from edgecl.errors import ArtifactError, UsageError


def _saved(tmp_path, packed, name="model.edgecl", **kw):
    path = tmp_path / name
    artifact.save(packed, path, **kw)
    return path


# ------------------------------------------------------------------------------------------------------ round trip

@pytest.mark.parametrize("kind", am.KINDS)
def test_round_trip_is_bit_exact_for_every_kind_and_task(tmp_path, kind):
    packed = am.make(kind, seed=3, n_tasks=4)
    path = _saved(tmp_path, packed)
    art = artifact.load(path)
    assert art.n_tasks == 4 and art.method == packed.method and art.arch == packed.arch
    assert [t.to_json() for t in art.tasks] == [t.to_json() for t in packed.tasks]
    for t in range(packed.n_tasks):
        assert am.same_weights(art.materialize(t), materialize(packed, t)), f"task {t}"
    back = art.to_packed()
    assert am.same_weights(back.base, packed.base)
    for a, b in zip(back.task_tensors, packed.task_tensors):
        assert am.same_weights(a, b)
    assert back.params == packed.params and back.config == packed.config and back.extra == packed.extra
    assert art.manifest["format_version"] == artifact.FORMAT_VERSION


def test_file_is_plain_safetensors_with_manifest_metadata(tmp_path):
    packed = am.make("lps", n_tasks=3)
    path = _saved(tmp_path, packed)
    tensors = safetensors.numpy.load_file(str(path))  # any safetensors tool can list it
    art = artifact.load(path)
    assert set(tensors) == set(art.blobs)
    raw = [k for k, e in art.blobs.items() if not e["encoding"]]
    assert raw, "small tensors are stored raw, readable as themselves"
    for key in raw:
        e = art.blobs[key]
        src = packed.base if e["scope"] == "base" else packed.task_tensors[e["scope"]]
        np.testing.assert_array_equal(tensors[key], src[e["name"]])


def test_task_lookup_by_name_and_errors(tmp_path):
    art = artifact.load(_saved(tmp_path, am.make("shared", n_tasks=3)))
    assert art.task_index("task-2") == 2 and art.task_index(1) == 1
    for bad in ("nope", 3, -1):
        with pytest.raises(UsageError, match="task"):
            art.materialize(bad)


@pytest.fixture(scope="module")
def trained():
    """Short real training runs of the baselines and LPS on permuted digits."""
    import torch

    from edgecl.arch import preset
    from edgecl.train import engine, registry
    from edgecl.train.data import Stream, make_stream
    from edgecl.train.protocol import TrainContext

    torch.set_num_threads(1)
    stream = make_stream("permuted-digits", 3, seed=0)
    arch = preset("mlp", stream.input_shape)
    runs = {}
    methods = {"finetune": {"epochs": 1}, "stl": {"epochs": 1}, "lps": {"epochs": 1, "admm_epochs": 1,
                                                                       "final_epochs": 1}}
    first_two = Stream(stream.name, stream.input_shape, stream.tasks[:2])
    quiet = dict(ctx=TrainContext(progress=False), log=lambda *_: None)
    for name, cfg in methods.items():
        method = registry.create(name, arch, cfg)
        after_two = engine.run(method, first_two, **quiet).packed
        runs[name] = (after_two, engine.run(method, stream, first_task=2, **quiet).packed)
    return stream, runs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["finetune", "stl", "lps"])
def test_trained_model_rebuilt_from_file_predicts_identically(tmp_path, trained, name):
    from edgecl.train import engine

    stream, runs = trained
    packed = runs[name][1]
    art = artifact.load(_saved(tmp_path, packed))
    for t in range(packed.n_tasks):
        assert am.same_weights(art.materialize(t), materialize(packed, t))
    loaded = art.to_packed()
    for t, task in enumerate(stream.tasks):
        np.testing.assert_array_equal(engine.predict(loaded, t, task.x_test), engine.predict(packed, t, task.x_test))


def test_fp16_halves_the_base_and_is_documented_lossy(tmp_path):
    packed = am.make("shared", n_tasks=2)
    exact = _saved(tmp_path, packed, "a.edgecl")
    half = _saved(tmp_path, packed, "b.edgecl", fp16=True)
    art = artifact.load(half)
    assert art.fp16 and os.path.getsize(half) < os.path.getsize(exact)
    w, ref = art.materialize(0), materialize(packed, 0)
    assert all(v.dtype == np.float32 for v in w.values())
    np.testing.assert_array_equal(w["fc1.weight"], packed.base["fc1.weight"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(w["head.weight"], ref["head.weight"])  # heads stay fp32
    assert not am.same_weights(w, ref)
    big = am.make("shared", n_tasks=1)
    big.base["fc1.weight"][0, 0] = 1e6
    with pytest.raises(UsageError, match="fp16"):
        artifact.save(big, tmp_path / "c.edgecl", fp16=True)


# ------------------------------------------------------------------------------------------------ encodings, size

def test_lps_masks_are_coded_near_their_entropy_and_xor_pays_when_correlated(tmp_path):
    rng = np.random.default_rng(0)
    wide = am.validate({"name": "w", "input_shape": [64], "layers": [
        {"op": "linear", "name": "fc1", "in": 64, "out": 256}, {"op": "relu"}]})
    plain = am.lps_packed(rng, n_tasks=6, alpha=0.15, beta=0.2, arch=wide)
    corr = am.lps_packed(rng, n_tasks=6, alpha=0.15, beta=0.2, arch=wide, correlated=True)
    info = artifact.inspect(_saved(tmp_path, plain, "plain.edgecl"))
    assert info["masks"]["stored_over_entropy"] < 1.1, info["masks"]
    art = artifact.load(_saved(tmp_path, corr, "corr.edgecl"))
    xor = [k for k, e in art.blobs.items() if "xor" in e["encoding"]]
    assert xor, "correlated sharing masks should be coded against the previous task's"
    for t in range(corr.n_tasks):
        assert am.same_weights(art.materialize(t), materialize(corr, t))
    assert "support" in art.blobs["base::fc1.weight"]["encoding"]  # W̄'s free zeros cost nothing


def test_inspect_cli_reports_components_tasks_and_entropy(tmp_path, capsys):
    path = _saved(tmp_path, am.make("lps", n_tasks=3))
    assert cli_main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert sum(c["bytes"] for c in info["components"]) == info["file_bytes"] == os.path.getsize(path)
    assert {c["component"] for c in info["components"]} >= {"base weights", "owner maps", "sharing masks", "heads",
                                                           "manifest"}
    assert len(info["tasks"]) == 3 and all(t["bits_per_param"] > 0 for t in info["tasks"])
    assert cli_main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "bits/param" in text and "order-0 entropy" in text
    path.write_bytes(path.read_bytes()[:-5])
    assert cli_main(["inspect", str(path)]) == 2
    assert "file size" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------- lazy

def test_materialising_one_task_reads_only_base_and_that_task(tmp_path):
    packed = am.make("lps", n_tasks=4)
    path = _saved(tmp_path, packed)
    art = artifact.load(path)
    assert art.reads == []  # load reads header and manifest only
    raw = bytearray(path.read_bytes())
    for key in [k for k in art.blobs if k.startswith("task2::")]:  # damage every byte task 2 owns
        a, b = art.blob_range(key)
        raw[a:b] = bytes(255 - x for x in raw[a:b])
    path.write_bytes(bytes(raw))
    art = artifact.load(path)
    assert am.same_weights(art.materialize(0), materialize(packed, 0))
    assert all(k.startswith(("base::", "task0::")) for k in art.reads), art.reads
    assert am.same_weights(art.materialize(3), materialize(packed, 3))
    with pytest.raises(ArtifactError, match="task2::.*checksum"):
        art.materialize(2)


def test_stored_blobs_are_readable_through_public_accessors(tmp_path):
    packed = am.make("lps", n_tasks=3)
    path = _saved(tmp_path, packed)
    art = artifact.load(path)
    ranges = sorted(art.blob_range(key) for key in art.blobs)
    assert ranges[0][0] == art.header_bytes and ranges[-1][1] == art.size == os.path.getsize(path)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # the blobs tile the data area
    back = art.to_packed()
    for key, e in art.blobs.items():
        want = back.base[e["name"]] if e["scope"] == "base" else back.task_tensors[e["scope"]][e["name"]]
        np.testing.assert_array_equal(art.read_blob(key), want)
    for bad in (art.blob_range, art.read_blob):
        with pytest.raises(UsageError, match="no blob"):
            bad("base::nope")


# -------------------------------------------------------------------------------------------------------- append

def test_append_keeps_earlier_tasks_bit_identical(tmp_path):
    full = am.make("lps", seed=5, n_tasks=5)
    path = _saved(tmp_path, am.lps_prefix(full, 3))
    before = [artifact.load(path).materialize(t) for t in range(3)]
    artifact.append_task(path, full)
    art = artifact.load(path)
    assert art.n_tasks == 5
    for t in range(3):
        assert am.same_weights(art.materialize(t), before[t])
    for t in range(5):
        assert am.same_weights(art.materialize(t), materialize(full, t))


def test_append_keeps_heads_only_when_asked(tmp_path):
    """keeps="heads" (Method.append_keeps of RGO) lets the shared trunk move; "all" does not."""
    before = am.make("shared", seed=1, n_tasks=2)
    after = am.make("shared", seed=1, n_tasks=3)  # same first two tasks' heads, a different trunk
    after.tasks[:2], after.task_tensors[:2] = before.tasks, before.task_tensors
    path = _saved(tmp_path, before)
    original = path.read_bytes()
    with pytest.raises(UsageError, match="task 0.*fc1"):
        artifact.append_task(path, after)
    with pytest.raises(UsageError, match="keeps"):
        artifact.append_task(path, after, keeps="trunk")
    assert path.read_bytes() == original
    artifact.append_task(path, after, keeps="heads")
    art = artifact.load(path)
    for t in range(3):
        assert am.same_weights(art.materialize(t), materialize(after, t))


@pytest.mark.slow
def test_append_of_real_training_keeps_or_refuses(tmp_path, trained):
    _, runs = trained
    for name in ("lps", "stl"):  # both keep every earlier task's weights: appending must succeed
        after_two, after_three = runs[name]
        path = _saved(tmp_path, after_two, f"{name}.edgecl")
        artifact.append_task(path, after_three)
        art = artifact.load(path)
        assert art.n_tasks == 3
        for t in range(3):
            assert am.same_weights(art.materialize(t), materialize(after_three, t))
        for t in range(2):
            assert am.same_weights(art.materialize(t), materialize(after_two, t))
    after_two, after_three = runs["finetune"]  # finetune moved the shared trunk: refused, file untouched
    path = _saved(tmp_path, after_two, "finetune.edgecl")
    original = path.read_bytes()
    with pytest.raises(UsageError, match="task 0.*bit-identical"):
        artifact.append_task(path, after_three)
    assert path.read_bytes() == original
    with pytest.raises(UsageError, match="method"):
        artifact.append_task(path, runs["stl"][1])
    renamed = copy.deepcopy(after_three)
    renamed.tasks[0].name = "other"
    with pytest.raises(UsageError, match="must start with"):
        artifact.append_task(path, renamed)
    assert path.read_bytes() == original
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


# -------------------------------------------------------------------------------------------------- bad save input

def test_save_refuses_unstorable_models(tmp_path):
    packed = am.make("shared", n_tasks=2)
    packed.tasks[1].name = "../../etc/passwd"
    with pytest.raises(UsageError, match="task name"):
        artifact.save(packed, tmp_path / "x.edgecl")
    packed = am.make("shared", n_tasks=2)
    packed.extra = {"bad": object()}
    with pytest.raises(UsageError, match="JSON"):
        artifact.save(packed, tmp_path / "x.edgecl")
    packed = am.make("shared", n_tasks=2)
    del packed.base["fc1.weight"]
    with pytest.raises(UsageError, match="fc1.weight"):
        artifact.save(packed, tmp_path / "x.edgecl")
    with pytest.raises(UsageError, match="cannot write"):
        artifact.save(am.make("shared", n_tasks=1), tmp_path / "missing-dir" / "x.edgecl")
    assert not os.path.exists(tmp_path / "x.edgecl")


# ------------------------------------------------------------------------------------------------ damaged files

def _damaged_cases(raw: bytes) -> dict[str, bytes]:
    manifest, table, data = am.split_file(raw)
    cases = {"empty": b"", "short": raw[:5], "truncated": raw[:-1], "truncated-header": raw[:40],
             "extended": raw + b"\0", "not-json": raw[:8] + b"x" * (len(raw) - 8),
             "length-too-big": (len(raw)).to_bytes(8, "little") + raw[8:],
             "length-huge": (2 ** 64 - 1).to_bytes(8, "little") + raw[8:]}
    n = int.from_bytes(raw[:8], "little")
    flipped = bytearray(raw)
    flipped[8 + n + len(data) // 2] ^= 0x10
    cases["data-bit-flip"] = bytes(flipped)
    flipped = bytearray(raw)
    flipped[8 + n // 2] ^= 0x01
    cases["header-bit-flip"] = bytes(flipped)
    key = next(iter(table))
    t2 = json.loads(json.dumps(table))
    t2[key]["dtype"] = "F64"
    cases["wrong-dtype-unsealed"] = am.build_file(manifest, t2, data, seal=False)

    def sealed(edit):
        m, t = json.loads(json.dumps(manifest)), json.loads(json.dumps(table))
        edit(m, t)
        return am.build_file(m, t, data)

    cases["wrong-version"] = sealed(lambda m, t: m.update(format_version=artifact.FORMAT_VERSION + 1))
    cases["wrong-format"] = sealed(lambda m, t: m.update(format="pickle"))
    head = next(k for k in table if k.endswith("head.weight"))
    cases["wrong-checksum"] = sealed(lambda m, t: m["blobs"][head].update(blake2b="0" * 32))
    cases["shape-inconsistent"] = sealed(lambda m, t: m["tasks"][0].update(n_classes=7))
    cases["huge-shape"] = sealed(lambda m, t: m["blobs"][head].update(shape=[1 << 40, 1 << 20]))
    cases["negative-shape"] = sealed(lambda m, t: m["blobs"][head].update(shape=[-3, 8]))
    cases["negative-offset"] = sealed(lambda m, t: t[head].update(data_offsets=[-8, 0]))
    cases["wrong-dtype"] = sealed(lambda m, t: m["blobs"][head].update(dtype="int64"))
    cases["unknown-encoding"] = sealed(lambda m, t: m["blobs"][head].update(encoding=["pickle"]))
    cases["path-like-name"] = sealed(lambda m, t: (m["blobs"].__setitem__("task0::../../x", m["blobs"].pop(head)),
                                                   t.__setitem__("task0::../../x", t.pop(head))))
    cases["path-like-task"] = sealed(lambda m, t: m["tasks"][0].update(name="/etc/passwd"))
    cases["task-out-of-range"] = sealed(lambda m, t: (m["blobs"].__setitem__("task99::head.weight",
                                                                             m["blobs"].pop(head)),
                                                      t.__setitem__("task99::head.weight", t.pop(head))))
    trunk = next(k for k in manifest["params"] if k.endswith(".weight") and not k.startswith("head"))
    layer = next(i for i, lay in enumerate(manifest["arch"]["nodes"]) if "in" in lay)
    cases["missing-param"] = sealed(lambda m, t: m["params"].pop(trunk))
    cases["unknown-kind"] = sealed(lambda m, t: m["params"][trunk].update(kind="exec"))
    cases["bad-arch"] = sealed(lambda m, t: m["arch"]["nodes"][layer].update({"in": "64"}))
    cases["manifest-not-object"] = am.build_file([1, 2], table, data)
    return cases


@pytest.mark.parametrize("kind", ["lps", "lowrank"])
def test_every_kind_of_damage_raises_artifact_error_naming_file_and_field(tmp_path, kind):
    raw = _saved(tmp_path, am.make(kind, n_tasks=3)).read_bytes()
    for name, bad in _damaged_cases(raw).items():
        path = tmp_path / f"{name}.edgecl"
        path.write_bytes(bad)
        with pytest.raises(ArtifactError) as info:
            artifact.load(path).verify()
        assert str(path) in str(info.value) and info.value.field, name
    with pytest.raises(ArtifactError, match="cannot open"):
        artifact.load(tmp_path / "does-not-exist.edgecl")


def test_hostile_blobs_with_valid_checksums_are_refused(tmp_path):
    import zstandard

    path = _saved(tmp_path, am.make("lps", n_tasks=3))
    raw = path.read_bytes()
    art = artifact.load(path)
    zkey = next(k for k, e in art.blobs.items() if e["encoding"][-1:] == ["zstd"])
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))  # 64 MiB of zeros in a few KB
    bits = next(k for k, e in art.blobs.items() if e["encoding"] == ["bits"] and e["shape"] != [0])
    for key, stored in ((zkey, bomb), (zkey, b"not zstd"), (zkey, bomb[:-3]), (bits, b"\1" * 500)):
        path.write_bytes(am.replace_blob(raw, key, stored))
        tracemalloc.start()
        with pytest.raises(ArtifactError, match="decode"):
            artifact.load(path).verify()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 8 << 20, f"{key}: {peak} bytes allocated"


def test_huge_declared_shapes_never_allocate(tmp_path):
    raw = _saved(tmp_path, am.make("task", n_tasks=2)).read_bytes()
    manifest, table, data = am.split_file(raw)
    manifest["arch"]["nodes"][1].update({"out": 1 << 31})  # fc1 2^31 wide: terabytes if believed
    manifest["arch"]["nodes"][3].update({"in": 1 << 31})
    path = tmp_path / "huge.edgecl"
    path.write_bytes(am.build_file(manifest, table, data))
    tracemalloc.start()
    with pytest.raises(ArtifactError):
        artifact.load(path)
    assert tracemalloc.get_traced_memory()[1] < 8 << 20
    tracemalloc.stop()


# ------------------------------------------------------------------------------------------ crash-safe writes (10)

_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import artifact_models as am
    from edgecl import artifact
    packed = am.make("task", seed=int(sys.argv[2]), n_tasks=40)
    from edgecl import io
    real = io.write_parts
    def slow(f, parts):
        def trickle():
            for part in parts:
                for i in range(0, len(part), 4096):
                    yield part[i:i + 4096]
        for i, chunk in enumerate(trickle()):
            real(f, [chunk])
            if i == 0:
                f.flush()
                print("writing", flush=True)
            time.sleep(0.01)
    io.write_parts = slow
    artifact.save(packed, sys.argv[1])
    print("done", flush=True)
""")


@pytest.mark.slow
def test_sigkill_mid_write_leaves_previous_artifact_intact(tmp_path):
    tests = os.path.dirname(__file__)
    path = tmp_path / "live.edgecl"
    old = am.make("task", seed=1, n_tasks=40)
    artifact.save(old, path)
    expected = [materialize(old, t) for t in range(old.n_tasks)]
    script = tmp_path / "writer.py"
    script.write_text(_WRITER.format(tests=tests))
    rng = np.random.default_rng(0)
    survived = 0
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, str(script), str(path), "2"], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(float(rng.uniform(0.0, 0.15)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        art = artifact.load(path)
        art.verify()
        for t in (0, old.n_tasks - 1):
            assert am.same_weights(art.materialize(t), expected[t])
        survived += 1
    assert survived == 8
    leftovers = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert leftovers and all(p.startswith(".live.edgecl.") for p in leftovers)  # killed writers' temp files only
    done = subprocess.run([sys.executable, str(script), str(path), "2"], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().endswith("done"), done.stderr
    new = am.make("task", seed=2, n_tasks=40)
    assert am.same_weights(artifact.load(path).materialize(5), materialize(new, 5))


def test_reader_and_inspect_never_import_torch(tmp_path):
    path = _saved(tmp_path, am.make("lps", n_tasks=2))
    code = ("import sys; from edgecl.cli import main; rc = main(['inspect', sys.argv[1]]); "
            "from edgecl import artifact; artifact.load(sys.argv[1]).materialize(1); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
