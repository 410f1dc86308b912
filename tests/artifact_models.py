"""Synthetic PackedModels for artifact tests: every delta kind, built in numpy with the shapes deltas.py expects."""
from __future__ import annotations

import numpy as np

from edgecl.arch import gemm_shape, param_shapes, validate
from edgecl.deltas import PackedModel, TaskInfo, check_consistent

MLP = validate({"name": "tiny-mlp", "input_shape": [1, 4, 4], "layers": [
    {"op": "flatten"}, {"op": "linear", "name": "fc1", "in": 16, "out": 12}, {"op": "relu"},
    {"op": "linear", "name": "fc2", "in": 12, "out": 8}, {"op": "relu"}]})
CNN = validate({"name": "tiny-cnn", "input_shape": [1, 4, 4], "layers": [
    {"op": "conv", "name": "c1", "in": 1, "out": 4, "k": 3, "pad": 1}, {"op": "bn", "name": "bn1", "ch": 4},
    {"op": "relu"}, {"op": "maxpool", "k": 2}, {"op": "flatten"},
    {"op": "linear", "name": "fc", "in": 16, "out": 6}, {"op": "relu"}]})
KINDS = ("lps", "lps-row", "lps-column", "node", "lowrank", "permute", "shared", "task")


def _floats(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def _heads(arch, n_tasks, rng, classes=(3, 5)):
    infos, tts = [], []
    for t in range(n_tasks):
        n = classes[t % len(classes)]
        infos.append(TaskInfo(f"task-{t}", n, None))
        shapes = param_shapes(arch, n)
        tts.append({k: _floats(rng, shapes[k]) for k in ("head.weight", "head.bias")})
    return infos, tts


def lps_owner(rng, n_units: int, n_tasks: int, alpha: float) -> np.ndarray:
    """Owner per unit: each task takes a fraction alpha of the units, from those still free."""
    owner = np.zeros(n_units, np.uint8)
    for t in range(n_tasks):
        free = np.flatnonzero(owner == 0)
        take = rng.choice(free, size=min(len(free), max(1, round(alpha * n_units))), replace=False)
        owner[take] = t + 1
    return owner


def lps_packed(rng, n_tasks: int = 4, unit: str = "element", alpha: float = 0.2, beta: float = 0.3,
               arch=MLP, correlated: bool = False) -> PackedModel:
    """LPS-shaped model: superposed W̄ (zero where free), owner maps, sharing masks over the earlier support."""
    infos, tts = _heads(arch, n_tasks, rng)
    shapes = param_shapes(arch)
    params, base = {}, {}
    for name, shape in shapes.items():
        if len(shape) < 2:
            params[name], base[name] = {"kind": "shared"}, _floats(rng, shape)
            continue
        p, q = gemm_shape(shape)
        n_units = {"element": p * q, "row": p, "column": q}[unit]
        owner = lps_owner(rng, n_units, n_tasks, alpha)
        el = {"element": owner, "row": np.repeat(owner, q), "column": np.tile(owner, p)}[unit].reshape(shape)
        params[name] = {"kind": "lps", "unit": unit}
        base[name] = np.where(el > 0, _floats(rng, shape), np.float32(0))
        base[f"{name}:owner"] = owner.reshape(shape) if unit == "element" else owner
        prev = None
        for t in range(n_tasks):
            dom = el[(el >= 1) & (el <= t)]
            share = rng.random(dom.size) < beta
            if correlated and prev is not None:  # keep most of the previous task's choices
                common = dom <= t - 1
                keep = rng.random(int(common.sum())) < 0.9
                share[common] = np.where(keep, prev, share[common])
            tts[t][f"{name}:share"] = share
            prev = share
    return _packed(arch, "lps", params, base, infos, tts, {"alpha": alpha, "beta": beta}, {"capacity": [0.1] * n_tasks})


def _dense(arch, n_tasks, rng):
    """Heads per task, a random base for every trunk tensor (positive BN variances), all specs 'shared'."""
    infos, tts = _heads(arch, n_tasks, rng)
    shapes = param_shapes(arch)
    base = {k: _floats(rng, s) for k, s in shapes.items()}
    for k in base:
        if k.endswith("running_var"):
            base[k] = np.abs(base[k]) + np.float32(0.1)
    return infos, tts, shapes, base, {k: {"kind": "shared"} for k in shapes}


def _packed(arch, method, params, base, infos, tts, config=None, extra=None) -> PackedModel:
    heads = {"head.weight": {"kind": "task"}, "head.bias": {"kind": "task"}}
    return PackedModel(arch, method, config or {}, {**params, **heads}, base, infos, tts, extra or {})


def node_packed(rng, n_tasks: int = 3) -> PackedModel:
    infos, tts, _, base, params = _dense(CNN, n_tasks, rng)
    params["c1.weight"] = {"kind": "node", "rows": "c1"}
    params["c1.bias"] = {"kind": "node", "rows": "c1"}
    params["fc.weight"] = {"kind": "node", "rows": "fc", "cols": "c1", "repeat": 4}
    for t in range(n_tasks):
        tts[t]["nodes:c1"] = rng.random(4) < 0.7
        tts[t]["nodes:fc"] = rng.random(6) < 0.6
    return _packed(CNN, "agscl", params, base, infos, tts)


def lowrank_packed(rng, n_tasks: int = 3) -> PackedModel:
    infos, tts, shapes, base, params = _dense(CNN, n_tasks, rng)
    for name in ("c1.weight", "fc.weight"):
        params[name] = {"kind": "lowrank"}
        p, cin = shapes[name][:2]
        for t in range(1, n_tasks):  # task 0 is the base itself; rank t for task t
            tts[t].update({f"{name}:r": _floats(rng, (p,)), f"{name}:s": _floats(rng, (cin,)),
                           f"{name}:u": _floats(rng, (p, t)), f"{name}:v": _floats(rng, (cin, t))})
    params["c1.bias"] = {"kind": "task"}
    for t in range(n_tasks):
        tts[t]["c1.bias"] = _floats(rng, shapes["c1.bias"])
    return _packed(CNN, "halrp", params, base, infos, tts, {"alpha": 0.9}, {"ranks": [[0], [1], [2]]})


def permute_packed(rng, n_tasks: int = 3) -> PackedModel:
    infos, tts, _, base, params = _dense(MLP, n_tasks, rng)
    for t, info in enumerate(infos):
        info.seed = None if t == 0 else 1000 + t
    params["fc1.weight"] = {"kind": "permute", "group": "fc1"}
    params["fc1.bias"] = {"kind": "permute", "group": "fc1"}
    return _packed(MLP, "rgo", params, base, infos, tts)


def shared_packed(rng, n_tasks: int = 3) -> PackedModel:
    infos, tts, _, base, params = _dense(MLP, n_tasks, rng)
    return _packed(MLP, "finetune", params, base, infos, tts, {"lr": 1e-3})


def task_packed(rng, n_tasks: int = 3) -> PackedModel:
    infos, tts, shapes, _, params = _dense(MLP, n_tasks, rng)
    for tt in tts:
        tt.update({k: _floats(rng, s) for k, s in shapes.items()})
    return _packed(MLP, "stl", {k: {"kind": "task"} for k in params}, {}, infos, tts)


def make(kind: str, seed: int = 0, n_tasks: int = 4) -> PackedModel:
    rng = np.random.default_rng(seed)
    builders = {"lps": lambda: lps_packed(rng, n_tasks), "lps-row": lambda: lps_packed(rng, n_tasks, "row", 0.25),
                "lps-column": lambda: lps_packed(rng, n_tasks, "column", 0.25),
                "node": lambda: node_packed(rng, n_tasks), "lowrank": lambda: lowrank_packed(rng, n_tasks),
                "permute": lambda: permute_packed(rng, n_tasks), "shared": lambda: shared_packed(rng, n_tasks),
                "task": lambda: task_packed(rng, n_tasks)}
    packed = builders[kind]()
    check_consistent(packed)
    return packed


# ------------------------------------------------------------------ file surgery (for damage and hostile-file tests)

def split_file(raw: bytes) -> tuple[dict, dict, bytes]:
    """(manifest, tensor table, data area) of an artifact's bytes."""
    import json

    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    return json.loads(meta["edgecl.manifest"]), header, raw[8 + n:]


def build_file(manifest: dict, table: dict, data: bytes, seal: bool = True) -> bytes:
    """Artifact bytes from parts; `seal` recomputes the header digest (a forger's file, not a damaged one)."""
    import json

    from edgecl.artifact.container import encode_header

    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return encode_header(text, table, None if seal else "0" * 64) + data


def replace_blob(raw: bytes, key: str, stored: bytes, fix_checksum: bool = True) -> bytes:
    """Swap one blob's stored bytes (re-tiling offsets, optionally with a matching checksum), resealed."""
    from edgecl.artifact.container import checksum

    manifest, table, data = split_file(raw)
    parts, offset = [], 0
    for k, e in sorted(table.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = e["data_offsets"]
        blob = stored if k == key else data[a:b]
        if k == key:
            e["dtype"], e["shape"] = "U8", [len(stored)]
            if fix_checksum:
                manifest["blobs"][k]["blake2b"] = checksum(stored)
        e["data_offsets"] = [offset, offset + len(blob)]
        parts.append(blob)
        offset += len(blob)
    return build_file(manifest, table, b"".join(parts))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and a[k].tobytes() == b[k].tobytes() for k in a)


def lps_prefix(packed: PackedModel, k: int) -> PackedModel:
    """The LPS model as it was after its first k tasks: later owners freed, their W̄ entries zero."""
    import copy

    out = copy.deepcopy(packed)
    for name, spec in packed.params.items():
        if spec["kind"] != "lps":
            continue
        owner = out.base[f"{name}:owner"]
        owner[owner > k] = 0
        from edgecl.deltas import lps_owner_elements

        out.base[name] = np.where(lps_owner_elements(out, name) > 0, out.base[name], np.float32(0))
    out.tasks, out.task_tensors = out.tasks[:k], out.task_tensors[:k]
    return out


FUZZ_KINDS = ["lps-xor", "lps-row", "node", "lowrank", "permute", "task"]
"""The fuzz corpus: one original artifact of each (tests/test_artifact_fuzz.py, tools/fuzz_artifact_atheris.py)."""


def original_packed(kind: str, seed: int, n_tasks: int) -> PackedModel:
    """The model a fuzz original is saved from: one of `KINDS`, or "lps-xor" (correlated masks: XOR coding)."""
    return (lps_packed(np.random.default_rng(seed), n_tasks, correlated=True) if kind == "lps-xor"
            else make(kind, seed, n_tasks))


def saved_original(kind: str, seed: int, n_tasks: int, folder: str) -> tuple[bytes, list[dict], list[dict]]:
    """A real artifact to mutate (fuzzing), saved from `original_packed(kind, seed, n_tasks)`. Returns (file bytes,
    task infos as JSON, each task's dense weights)."""
    import os

    from edgecl import artifact
    from edgecl.deltas import materialize

    packed = original_packed(kind, seed, n_tasks)
    path = os.path.join(folder, f"orig-{kind}.edgecl")
    artifact.save(packed, path)
    with open(path, "rb") as f:
        raw = f.read()
    return raw, [t.to_json() for t in packed.tasks], [materialize(packed, t) for t in range(packed.n_tasks)]


def load_everything(raw: bytes, path: str):
    """Write `raw` to `path`, then load, verify and materialise every task: (task infos as JSON, weights per task,
    arch), or None when the reader rejected the file with ArtifactError (which must name the file and a field)."""
    from edgecl import artifact
    from edgecl.errors import ArtifactError

    with open(path, "wb") as f:
        f.write(raw)
    try:
        with artifact.load(path) as art:
            art.verify()
            return [t.to_json() for t in art.tasks], [art.materialize(t) for t in range(art.n_tasks)], art.arch
    except ArtifactError as exc:
        assert exc.path == path and exc.field and exc.problem
        return None


def runnable(tasks: list[dict], weights: list[dict], arch) -> bool:
    """Every task's weights are float32 tensors of the shapes the arch (and its head size) implies."""
    for info, w in zip(tasks, weights):
        shapes = param_shapes(arch, info["n_classes"])
        if not all(v.dtype == np.float32 and v.shape == tuple(shapes.get(k, v.shape)) for k, v in w.items()):
            return False
    return True


def forge_tensor(raw: bytes, key: str, arr: np.ndarray) -> bytes:
    """A resealed forgery: blob `key` replaced by `arr` stored raw (encoding []), with a matching checksum and digest,
    so the file passes every container and manifest check and only the decoded values can give it away."""
    from edgecl.artifact.container import ST_CODE, checksum

    arr = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False)
    manifest, table, data = split_file(raw)
    stored = arr.tobytes()
    manifest["blobs"][key] = {"dtype": arr.dtype.name, "shape": list(arr.shape), "encoding": [],
                              "blake2b": checksum(stored)}
    parts, offset = [], 0
    for k, e in sorted(table.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = e["data_offsets"]
        blob = stored if k == key else data[a:b]
        if k == key:
            e["dtype"], e["shape"] = ST_CODE[arr.dtype.name], list(arr.shape)
        e["data_offsets"] = [offset, offset + len(blob)]
        parts.append(blob)
        offset += len(blob)
    return build_file(manifest, table, b"".join(parts))


def forge_manifest(raw: bytes, edit) -> bytes:
    """A resealed forgery: `edit(manifest)` changes the manifest in place; blobs and checksums stay as they were."""
    manifest, table, data = split_file(raw)
    edit(manifest)
    return build_file(manifest, table, data)
