"""The fuzz families that found issue 17's items, run by tests/test_artifact_fuzz.py on its corpus of real artifacts.

Each family is `family(corpus, which, data) -> loaded` (hypothesis draws through `data`). A resealed forgery must
raise ArtifactError (a forged model handed over in memory: UsageError) — or load, and then every task must give, in
the runtime (in place with every delta factored, and per-task sessions, folded from `materialize`), the same logits,
or both must refuse them as not finite. Anything else fails the test:

- `masked_values` (item 1): NaN, ±inf and extreme finite values written into base weights, preferably where a task
  masks them out (LPS keep masks, AGS-CL node masks, a zeroed low-rank row);
- `long_names` (items 3 and 5): permutation groups, task, tensor and node names of every length around the bounds,
  index-like and repeated task names;
- `hostile_specs` (item 6): random architecture graphs with hostile fields; a spec `validate` refuses must be
  refused by `save` as well, one it accepts must save, load and run like torch's forward pass of the same weights;
- `size_bombs` (item 9): many classes, nodes, edges, JSON containers and multiplied activations, each near its
  bound; the reader must never allocate beyond the decode bound.
"""
from __future__ import annotations

import os
import tracemalloc
import warnings

import numpy as np
from hypothesis import strategies as st

import artifact_models as am
from edgecl import artifact
from edgecl.arch.ops import ACTIVATIONS
from edgecl.arch.spec import param_shapes, validate
from edgecl.artifact.limits import decode_bound
from edgecl.deltas import PackedModel, TaskInfo, lps_keep, node_factor
from edgecl.errors import EdgeclWarning, UsageError

_PACKED: dict[int, PackedModel] = {}


def _packed(which: int) -> PackedModel:
    """The model corpus file `which` was saved from."""
    if which not in _PACKED:
        _PACKED[which] = am.original_packed(am.FUZZ_KINDS[which], which, 3)
    return _PACKED[which]


def _path(corpus, name: str = "family.edgecl") -> str:
    return os.path.join(corpus.folder, name)


def _runtime_agrees(path: str, tasks: range) -> None:
    """Per-task sessions (folded from `materialize`) and the in-place runtime with every delta factored give the
    same logits, or the factored path refuses them as not finite: it computes W·x before a dead unit's zero scale,
    and a forged activation near float32's limit overflows there (docs/RUNTIME.md, "Inputs") — refused, never a
    silently different answer. Logits the folded path refuses, the factored one must refuse too."""
    from edgecl.runtime import TaskRuntime
    from edgecl.runtime import plan

    saved, plan.FACTOR_MIN_ELEMENTS = plan.FACTOR_MIN_ELEMENTS, 0
    try:
        factored, folded = TaskRuntime(path, strategy="inplace"), TaskRuntime(path, strategy="sessions")
    finally:
        plan.FACTOR_MIN_ELEMENTS = saved
    x = np.random.default_rng(7).standard_normal((3, *factored.input_shape)).astype(np.float32)
    for t in tasks:
        outputs = []
        for rt in (factored, folded):
            try:
                outputs.append(rt.infer(x, task=t))
            except UsageError as exc:
                assert "not finite" in str(exc), exc
                outputs.append(None)
        a, b = outputs
        assert a is None or b is not None, f"task {t}: the factored path returned logits materialize makes NaN/inf"
        if a is not None:
            scale = max(1.0, float(np.abs(b).max()))
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=f"task {t}")


def _loads(corpus, raw: bytes) -> bool:
    got = am.load_everything(raw, _path(corpus))
    if got is not None:
        assert am.runnable(*got), "a forged file loaded into tensors its arch cannot run"
    return got is not None


# ---------------------------------------------------------------- item 1

_VALUES = [np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-45, -0.0, 65504.0, 1e30]


def _masked_positions(packed: PackedModel, t: int, name: str) -> np.ndarray:
    """Flat indices of `name`'s elements task t does not use (empty when its kind masks nothing)."""
    spec, base = packed.params[name], packed.base[name]
    if spec["kind"] == "lps":
        return np.flatnonzero(~lps_keep(packed, t, name))
    if spec["kind"] == "node":
        return np.flatnonzero(~np.broadcast_to(node_factor(packed, t, spec, base.shape), base.shape))
    return np.array([], np.int64)


def masked_values(corpus, which: int, data) -> bool:
    packed = _packed(which)
    raw = corpus.originals[which][0]
    names = [n for n, spec in packed.params.items() if spec["kind"] != "task" and packed.base[n].size]
    if not names:
        return _loads(corpus, raw)
    name = data.draw(st.sampled_from(names))
    t = data.draw(st.integers(0, packed.n_tasks - 1))
    base = np.array(packed.base[name], np.float32)
    if packed.params[name]["kind"] == "lowrank" and f"{name}:r" in packed.task_tensors[t]:
        r = np.array(packed.task_tensors[t][f"{name}:r"])
        r[0] = 0.0  # a zeroed low-rank row masks row 0 of the base for this task
        raw = am.forge_tensor(raw, f"task{t}::{name}:r", r)
    masked = _masked_positions(packed, t, name)
    flat = base.reshape(-1)
    for _ in range(data.draw(st.integers(1, 3))):
        pool = masked if masked.size and data.draw(st.booleans()) else np.arange(flat.size)
        flat[int(pool[data.draw(st.integers(0, pool.size - 1))])] = data.draw(st.sampled_from(_VALUES))
    raw = am.forge_tensor(raw, f"base::{name}", base)
    loaded = _loads(corpus, raw)
    assert loaded == bool(np.isfinite(base).all()), "non-finite weights loaded, or finite ones were refused"
    if loaded:
        _runtime_agrees(_path(corpus), range(packed.n_tasks))
    return loaded


# ---------------------------------------------------------------- items 3 and 5

_names = st.one_of(st.text(max_size=12), st.integers(0, 1200).map(lambda n: "g" * n),
                   st.sampled_from([199, 200, 201, 254, 255, 256, 257]).map(lambda n: "x" * n),
                   st.sampled_from(["3", "00", "-1", "٣", " 7", "1_0", "2-5", "all", "a,b", "task-0", "fc1"]))


def long_names(corpus, which: int, data) -> bool:
    manifest, table, blobs = am.split_file(corpus.originals[which][0])
    target = data.draw(st.sampled_from(["group", "task", "tensor", "node"]))
    name = data.draw(_names)
    if target == "group":
        permuted = [n for n, spec in manifest["params"].items() if spec["kind"] == "permute"] or list(manifest["params"])
        manifest["params"][data.draw(st.sampled_from(permuted))]["group"] = name
    elif target == "task":
        manifest["tasks"][data.draw(st.integers(0, len(manifest["tasks"]) - 1))]["name"] = name
    elif target == "tensor":
        key = data.draw(st.sampled_from(sorted(table)))
        new = f"{key.split('::')[0]}::{name}"
        table[new], manifest["blobs"][new] = table.pop(key), manifest["blobs"].pop(key)
    else:
        node = data.draw(st.sampled_from(manifest["arch"]["nodes"]))
        node["name"] = name
    try:
        raw = am.build_file(manifest, table, blobs)
    except (TypeError, ValueError):
        return False
    with warnings.catch_warnings():  # an index-like or repeated task name loads with a warning, as it should
        warnings.simplefilter("ignore", EdgeclWarning)
        loaded = _loads(corpus, raw)
    if loaded and target == "group":
        _runtime_agrees(_path(corpus), range(len(manifest["tasks"])))
    return loaded


# ---------------------------------------------------------------- item 6

_sizes = st.one_of(st.integers(1, 6), st.sampled_from([0, -1, 1000, 2 ** 31, True, 2.0, None, "3"]))


def _shapes(shape: list, nodes: list[dict]) -> dict[str, list[int]]:
    """Output shapes of the nodes of a spec prefix that validates (empty when it does not)."""
    from edgecl.arch.spec import node_shapes

    try:
        return node_shapes(validate({"name": "p", "input_shape": shape,
                                     "nodes": nodes + [{"name": "_f", "op": "flatten", "inputs": [
                                         nodes[-1]["name"] if nodes else "input"]}]}))
    except UsageError:
        return {}


@st.composite
def _spec(draw) -> dict:
    """A random graph over a small input: mostly plausible ops and fields (sizes read from the prefix), some hostile."""
    shape = draw(st.sampled_from([[1, 6, 6], [3, 5, 7], [2, 4, 4], [8], [4, 3], [2, 1, 9], [0, 4, 4], [1, 1, 1],
                                       [4, 5, 1]]))  # a token column (MViTv2 with a class token)
    names, nodes = ["input"], []
    hostile = st.sampled_from([0, -1, 1000, 2 ** 31, True, 2.0, None, "3"])
    for i in range(draw(st.integers(1, 6))):
        known = _shapes(shape, nodes)
        op = draw(st.sampled_from(["conv", "linear", "bn", "maxpool", "avgpool", "gap", "add", "mul", "cat", "flatten",
                                   "reshape", "pad", "blur", "adaptive_avgpool", "scalar_affine", "channel_conv",
                                   "branch_softmax", "class_token", "pos_embed", "token", "attention", "space_to_depth",
                                   "upsample", "linear_attention", "layer_norm", "attention_pool",
                                   "channel_attention", "fourier_pos", "lambda_layer", "token_mix", "affine",
                                   "bicubic", "outlook_attention", "rotary", "normalize",
                                   "conv_transpose", "state_pool", "state_read", "layer_scale",
                                   *ACTIVATIONS]))
        src = draw(st.sampled_from(names))
        node = {"name": f"n{i}", "op": op, "inputs": [src]}
        dims = known.get(src, [1])
        fits = draw(st.integers(0, 9)) > 0  # mostly the size the input has
        if op in ("add", "mul", "cat"):
            node["inputs"].append(draw(st.sampled_from([n for n in names if known.get(n) == dims] or names)))
        if op == "conv":
            c = dims[0] if fits else draw(hostile)
            g = draw(st.sampled_from([1, 1, c if isinstance(c, int) and c > 0 else 1]))
            node.update({"in": c, "out": g * draw(st.integers(1, 3)), "k": draw(st.sampled_from([1, 2, 3, [1, 3]])),
                         "stride": draw(st.sampled_from([1, 2, 3])), "pad": draw(st.sampled_from([0, 1, 2])),
                         "dilation": draw(st.sampled_from([1, 2])), "groups": g})
            if draw(st.integers(0, 3)) == 0:  # weight-standardised (NF-ResNet), with a hostile eps or scale
                node["standardize"] = draw(st.sampled_from([1e-5, 1e-6, 0.5, 0, 1, -1e-5, 1e-50, "x"]))
                if draw(st.booleans()):
                    node["gain_scale"] = draw(st.sampled_from([0.3, -2.0, 1.0, float("nan"), None]))
                if draw(st.booleans()):  # BiT's StdConv2d: no gain (a hostile non-bool too)
                    node["std_gain"] = draw(st.sampled_from([False, True, 0, "no"]))
            if draw(st.integers(0, 3)) == 0:  # run in each window (EfficientViT-MSRA's conv on q), or a bad window
                node["window"] = draw(st.sampled_from([[2, 2], [1, 3], 3, [3, 2], [4, 4], [0, 2], [2, 2, 2], None]))
            if draw(st.integers(0, 4)) == 0:  # its bias stored in parts (BEiT's q_bias, v_bias) or hostile parts; a
                # null part (a fixed zero) read by anything but slices read as attentions' keys is refused
                node["bias_parts"] = draw(st.sampled_from([["a", "b"], ["a", None, "b"], [None, "a"], ["a"], ["a", "a"],
                                                          ["a.b", "c"], [None, None], "a", None, [1, 2], ["a"] * 9]))
                if draw(st.integers(0, 3)) == 0:
                    node["bias"] = False
            if draw(st.integers(0, 5)) == 0:  # its weight a bare parameter (SwiftFormer's w_g: a key ending in "="),
                # which needs a node of one tensor (no bias) and a path; or another module path
                node["module"] = draw(st.sampled_from(["attn.w_g=", "=", "attn.w_g", "a=b", ""]))
            if draw(st.integers(0, 5)) == 0:  # its weight a row block of a fused one (EVA's q, k, v): alone it holds
                # a part only, refused unless it is the whole ([0, 1]); or hostile rows
                node["weight_rows"] = draw(st.sampled_from([[0, 1], [0, 3], [2, 2], [-1, 2], [0], "x", [0, 1 << 31]]))
                if draw(st.booleans()):  # its bias the same rows of the fused bias (torchvision's Swin V2), or not
                    node["fused_bias"] = draw(st.sampled_from([True, False, 1, "yes", None]))
        elif op == "conv_transpose":  # a transposed conv: hostile output_padding (≥ the stride, negative), groups
            # not dividing, a pad cutting the whole output, a huge stride (refused by the activation bound)
            c = dims[0] if fits else draw(hostile)
            g = draw(st.sampled_from([1, 1, c if isinstance(c, int) and c > 0 else 1, 2]))
            stride = draw(st.sampled_from([1, 2, 3, [2, 1]]))
            below = [[p, q] for p in range(max(stride if isinstance(stride, int) else stride[0], 1))
                     for q in range(stride if isinstance(stride, int) else stride[1])]
            node.update({"in": c, "out": g * draw(st.integers(1, 3)), "k": draw(st.sampled_from([1, 2, 3, [3, 1]])),
                         "stride": stride if fits else draw(st.sampled_from([1 << 20, 0, [2, 2, 2]])),
                         "pad": draw(st.sampled_from([0, 0, 1] if fits else [2, 9, -1])), "groups": g,
                         "output_padding": draw(st.sampled_from(below)) if fits else
                         draw(st.sampled_from([[0, 3], 2, -1, "1", 1])),
                         "dilation": draw(st.sampled_from([1, 2])), "bias": draw(st.booleans())})
        elif op == "linear":
            node.update({"in": int(np.prod(dims)) if fits else draw(hostile), "out": draw(st.integers(1, 8))})
        elif op == "bn":
            node.update({"ch": dims[0] if fits else draw(hostile), "eps": draw(st.sampled_from([1e-5, 0.5, 0, 2]))})
        elif op == "affine":  # ResMLP's per-channel factor and offset
            node["ch"] = dims[0] if fits else draw(hostile)
        elif op == "layer_scale":  # a layer scale, or EfficientViM's σ gate reading a row of a shared (parts, ch)
            # table: rows no node set holds once, hostile flags and rows refused
            node["ch"] = dims[0] if fits else draw(hostile)
            if draw(st.booleans()):
                node["sigmoid"] = draw(st.booleans()) if fits else draw(st.sampled_from([1, "yes", None]))
            if draw(st.booleans()):
                node["weight_rows"] = draw(st.sampled_from([[0, 1], [0, 2], [1, 2]] if fits else
                                                           [[2, 2], [-1, 2], [0], "x", [0, 1 << 31]]))
                node["module"] = draw(st.sampled_from(["blk.alpha", "blk.alpha", "other"]))
        elif op in ("maxpool", "avgpool"):
            node.update({"k": draw(st.sampled_from([1, 2, 3, [2, 3], 1000])), "pad": draw(st.sampled_from([0, 1, 2])),
                         "ceil_mode": draw(st.booleans())})
            if draw(st.booleans()):
                node["stride"] = draw(st.sampled_from([1, 2, 3]))
            if op == "maxpool" and draw(st.booleans()):
                node["dilation"] = draw(st.sampled_from([1, 2, 3]))
        elif op == "pad":
            node["pads"] = draw(st.sampled_from([[0, 0, 1, 1], [2, 0, 1, 3], [0, 0, 0, 0], [-1, 0, 1, 1], [1, 1],
                                                 [-1, -1, 1, 1], [0, -2, -1, 0], [-3, 0, -3, 0], [0, -9, 0, 0]]))
            node["value"] = draw(st.sampled_from([0.0, -2.5, "-inf", "inf", None, 3]))
            if draw(st.booleans()):
                node["mode"] = draw(st.sampled_from(["reflect", "replicate", "constant", "circular", None, 1]))
        elif op == "adaptive_avgpool":
            node["size"] = draw(st.sampled_from([3, [2, 5], [7, 1], 64, 65, 0, [1, 2, 3]]))
        elif op == "normalize":  # L2 over the channels or the map (SwiftFormer): hostile eps and over refused
            if draw(st.booleans()):
                node["over"] = draw(st.sampled_from(["channels", "map", "map", "tokens", None, 1]))
            if draw(st.booleans()):
                node["eps"] = draw(st.sampled_from([1e-12, 1e-6, 0, -1e-12, 1e-50, "x", float("nan")]))
        elif op == "bicubic":  # CrossViT's resampling to any size: sides past 4096 or none refused
            node["size"] = draw(st.sampled_from([3, [2, 5], [7, 1], 4097, 0, -2, [1, 2, 3], "4", 2.5]))
        elif op == "blur":
            node.update({"k": draw(st.sampled_from([2, 3, 5, 1, 17, 1000, "3"])),
                         "stride": draw(st.sampled_from([1, 2, 3, 0]))})
        elif op == "scalar_affine":
            node.update({"init": draw(st.sampled_from([1.0, -0.5, 3])), "init_bias": draw(st.sampled_from([0.0, 0.2]))})
        elif op == "channel_conv":
            node.update({"ch": dims[0] if fits else draw(hostile), "k": draw(st.sampled_from([1, 3, 5, 2, 0])),
                         "circular": draw(st.booleans())})
        elif op == "token_mix":  # MLP-Mixer's Linear over the tokens of a (C, T, 1) map
            node.update({"in": (dims[1] if len(dims) == 3 else 1) if fits else draw(hostile),
                         "out": draw(st.sampled_from([1, 3, 5])), "bias": draw(st.booleans())})
        elif op == "branch_softmax":
            node["branches"] = draw(st.sampled_from([1, 2, 3, 0]))
        elif op in ("class_token", "pos_embed"):
            node["ch"] = dims[0] if fits else draw(hostile)
            if op == "pos_embed":
                # tokens (C, T, 1) or a feature map's H·W positions (PiT, Visformer)
                node["tokens"] = (int(np.prod(dims[1:])) if len(dims) == 3 else 1) if fits else draw(hostile)
                storage = draw(st.sampled_from(["map", "tile", "last", "resize", None])) if len(dims) == 3 else None
                if storage == "map":  # the map's module storage, (1, C, H, W), or a wrong one
                    node["module_shape"] = [1, *dims] if fits else draw(st.sampled_from(
                        [[1, dims[0], dims[1] * dims[2] + 1, 1], [dims[0], *dims[1:]], [1, *dims, 1], "x", 7]))
                elif storage == "tile":  # TNT's: one embedding for each window of the map
                    tile = [draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0])) for n in dims[1:]]
                    node["tile"] = tile if fits else draw(st.sampled_from([[dims[1] + 1, 1], 0, "2", [2, 2, 2]]))
                    node["tokens"] = tile[0] * tile[1]
                    if fits or draw(st.booleans()):  # its storage (1, C, wh, ww), or none (tile needs one), or
                        # another layout of as many positions, or no list (validate sliced it: a TypeError)
                        node["module_shape"] = [1, dims[0], *tile] if fits else draw(st.sampled_from(
                            [[1, dims[0], *tile], [1, dims[0], tile[0] * tile[1], 1], [1, dims[0], *tile[::-1]], 3]))
                elif storage == "resize":  # HieraDet's: a grid of its own, resized to the map (bicubic)
                    grid = [draw(st.integers(1, 5)), draw(st.integers(1, 5))]
                    node["resize"] = grid if fits else draw(st.sampled_from([[0, 2], "2", [2, 2, 2], [5000, 1], 2.5]))
                    node["tokens"] = grid[0] * grid[1] if fits or draw(st.booleans()) else grid[0] * grid[1] + 1
                    if fits or draw(st.booleans()):  # its storage (1, C, gh, gw), or none (resize needs one)
                        node["module_shape"] = [1, dims[0], *grid]
                elif storage == "last":  # VOLO's channels-last storage (1, H, W, C)
                    node["channels_last"] = True if fits else draw(st.sampled_from(["yes", 1, None, False]))
                    if fits or draw(st.booleans()):  # a wrong storage, or none (channels_last needs one)
                        node["module_shape"] = [1, *dims[1:], dims[0]] if fits else draw(st.sampled_from(
                            [[1, *dims], [1, dims[1], dims[2] + 1, dims[0]], [dims[1], dims[2], dims[0]]]))
                if draw(st.booleans()):  # a constant (MAE's fixed embedding), or a hostile flag
                    node["frozen"] = draw(st.sampled_from([True, False])) if fits else draw(hostile)
                if len(dims) == 3 and "module_shape" not in node and draw(st.booleans()):  # NesT's, block by block
                    sides = [b for b in (1, 2, 3) if dims[1] == dims[2] and dims[1] % b == 0]
                    node["block"] = draw(st.sampled_from(sides)) if fits and sides else \
                        draw(st.sampled_from([0, -2, "2", 2.5, True, dims[1] + 1]))
            elif draw(st.booleans()):  # several tokens (register tokens), or none said (one)
                node["tokens"] = draw(st.sampled_from([1, 2, 4])) if fits else draw(hostile)
        elif op == "token":
            node["index"] = draw(st.sampled_from([0, 1, 5, -1]))
            if draw(st.booleans()):  # a range of tokens (after a prefix)
                node["count"] = draw(st.sampled_from([1, 2, 3, 0]))
        elif op == "attention":  # self-attention of one map, maybe windowed (Swin) and with a bias table + index
            node["inputs"] += [src, src]
            t = int(np.prod(dims[1:])) if len(dims) == 3 else 1
            node.update({"heads": 1 if fits else draw(st.sampled_from([2, 3, 0])),
                         "scale": 0.5 if fits else draw(st.sampled_from([2, 0, -1]))})
            if draw(st.booleans()):  # windows that tile the map (sides dividing its sides), maybe shifted, or not
                sides = dims[1:] if len(dims) == 3 else [1, 1]
                window = [draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0])) for n in sides]
                node["window"] = window if fits else draw(st.sampled_from([0, [s + 1 for s in sides], "2"]))
                if draw(st.booleans()):
                    node["shift"] = [draw(st.integers(0, w - 1)) for w in window] if fits else \
                        draw(st.sampled_from([-1, window]))
                elif draw(st.booleans()):  # a grid (dilated windows: MaxViT, MobileViT), or a hostile flag
                    node["dilated"] = True if fits else draw(st.sampled_from(["yes", 1]))
                t = int(np.prod(window))  # the bias is per window
            if draw(st.booleans()):
                b = draw(st.sampled_from([1, t, t * t])) if fits else draw(st.sampled_from([t * t + 1, 0]))
                node["bias_offsets"] = b
                fitting = [[(i * 7 + j) % max(b, 1) for j in range(t)] for i in range(t)]
                node["bias_index"] = fitting if draw(st.integers(0, 3)) else draw(st.sampled_from([
                    [[0] * (t + 1)] * t, [[b] * t] * t, [], [[-1]], "x", None]))
                if draw(st.booleans()):  # stored as Swin stores it (or a hostile layout name)
                    node["bias_table"] = draw(st.sampled_from(["swin", "tf"])) if fits else \
                        draw(st.sampled_from(["levit", "other", 1]))  # 'tf' holds where B = (2wh − 1)(2ww − 1)
                if draw(st.integers(0, 5)) == 0:  # RelPosMlp's MLP-generated table (or a hostile hidden width)
                    node.update({"bias_table": "mlp", "bias_mlp": draw(st.sampled_from([1, 4])) if fits else
                                 draw(st.sampled_from([0, 1 << 31, "8", None]))})
                    # Swin V2's / V2-CR's MLP, RelPosMlp's mode 'swin'
                    form = draw(st.sampled_from([None, "swin_v2", "swin_v2_cr", "rel_pos_swin"]))
                    if form and fits:  # with the offsets of its window or map (the MLP's extent), read in range
                        extent = node.get("window") or (dims[1:] if len(dims) == 3 else [1, 1])
                        offsets = (2 * extent[0] - 1) * (2 * extent[1] - 1)
                        node.update({"bias_mlp_form": form, "bias_offsets": offsets, "bias_index": [
                            [(i * 5 + j) % offsets for j in range(t)] for i in range(t)]}, **({"bias_mlp_span": draw(
                                st.sampled_from([[1, 1], [2, 8]]))} if form != "swin_v2_cr" else {}))
                    elif form:  # an unknown form, a span without its form, a form without its span, a bad span
                        node.update(draw(st.sampled_from([{"bias_mlp_form": "swin"}, {"bias_mlp_form": 2},
                                                          {"bias_mlp_span": [2, 2]}, {"bias_mlp_form": "swin_v2"},
                                                          {"bias_mlp_form": "swin_v2", "bias_mlp_span": [0, 2]},
                                                          {"bias_mlp_form": "rel_pos_swin"},
                                                          {"bias_mlp_form": "swin_v2_cr",
                                                           "bias_mlp_span": [2, 2]}])))
                if draw(st.integers(0, 3)) == 0:  # its row of a table of more heads (EfficientViT-MSRA's cascade)
                    node["bias_rows"] = [0, 1] if fits else draw(st.sampled_from(  # a lone node holds its table
                        [[1, 3], [0, 1 << 31], [3, 3], [-1, 2], [0], "x", None]))  # rows no node holds, a bomb
            if draw(st.integers(0, 3)) == 0:  # EfficientFormerV2's talking heads (refused with a window)
                node["talking_heads"] = draw(st.booleans()) if fits else draw(st.sampled_from(["yes", 1, None]))
                if draw(st.booleans()):  # stored as CaiT's Linears (needs talking heads), or a hostile flag
                    node["talking_linear"] = node["talking_heads"] is True if fits else \
                        draw(st.sampled_from(["yes", 1, None]))
            if draw(st.integers(0, 3)) == 0:  # ConViT's gated positions (a square grid, no window, bias or mix)
                node["gated_pos"] = draw(st.booleans()) if fits else draw(st.sampled_from(["yes", 1, None]))
            if draw(st.integers(0, 3)) == 0:  # Swin V2's cosine attention (refused with talking heads)
                node["cosine"] = draw(st.booleans()) if fits else draw(st.sampled_from(["yes", 1, None, 0.0]))
            if draw(st.integers(0, 3)) == 0:  # BotNet's relative position logits over the map or SAM's window
                extent = node["window"] if isinstance(node.get("window"), list) and draw(st.booleans()) else dims[1:]
                node["rel_pos"] = extent if fits and len(dims) == 3 else draw(st.sampled_from([0, [1, 2, 3], "x"]))
                node["rel_dim"] = dims[0] if fits else draw(st.sampled_from([0, dims[0] + 1, 1 << 31, None]))
                if draw(st.booleans()):
                    node["rel_scaled"] = draw(st.booleans()) if fits else draw(st.sampled_from([1, "yes", None]))
                if draw(st.booleans()):  # read at query − key (MViTv2's, SAM's), or a hostile flag
                    node["rel_mvit"] = draw(st.booleans()) if fits else draw(st.sampled_from([1, "yes", None, 0.0]))
            if draw(st.integers(0, 3)) == 0:  # HaloNet's blocks of the map, haloed key windows (refused with a window)
                side = min(dims[1:]) if len(dims) == 3 else 1
                node["halo_blocks"] = [side, side] if fits else draw(st.sampled_from([0, [side + 1, side], "x"]))
                node["halo"] = draw(st.integers(0, 2)) if fits else draw(st.sampled_from([-1, 65, 1 << 31, None]))
            if "rel_pos" in node and draw(st.integers(0, 2)) == 0:  # MViTv2's class token: a prefix token, then the
                tokens = dims[1] if len(dims) == 3 and dims[1] > 1 and dims[2] == 1 else 0  # token column's map
                if fits and tokens:  # over the whole column (none of the forms rel_pos does not go with)
                    for key in ("window", "shift", "dilated", "halo_blocks", "halo", "talking_heads", "talking_linear",
                                "gated_pos", "cosine", "bias_offsets", "bias_index", "bias_table", "bias_rows",
                                "bias_mlp", "bias_mlp_form", "bias_mlp_span"):
                        node.pop(key, None)
                    node.update(rel_pos=[tokens - 1, 1], rel_mvit=True, rel_prefix=1, rel_query=[tokens - 1, 1],
                                rel_key=[tokens - 1, 1])
                else:  # a prefix the tokens do not hold, a bad value, or a partial set
                    node.update(rel_prefix=draw(st.sampled_from([1, 0, 1 << 31, "1"])),
                                rel_query=draw(st.sampled_from([[1, 1], [0, 1], "x", None])),
                                rel_key=draw(st.sampled_from([[1, 1], [2, 2, 2], None])))
        elif op == "linear_attention":  # EfficientViT's ReLU linear attention of one map (q = k = v), its heads
            node["inputs"] += [src, src]
            node["heads"] = draw(st.sampled_from([d for d in (1, 2, 3) if dims[0] % d == 0])) if fits else \
                draw(st.sampled_from([0, dims[0] + 1, "2"]))
            if draw(st.booleans()):
                node["eps"] = draw(st.sampled_from([1e-5, 0.5])) if fits else draw(st.sampled_from([0, 1, -1e-5]))
            if draw(st.booleans()):
                node["kernel"] = draw(st.sampled_from(["relu", "softmax"])) if fits else \
                    draw(st.sampled_from(["exp", 1, None]))
        elif op == "channel_attention":  # EdgeNeXt's XCA of one map (q = k = v), its heads, F.normalize's eps
            node["inputs"] += [src, src]
            node["heads"] = draw(st.sampled_from([d for d in (1, 2, 3) if dims[0] % d == 0])) if fits else \
                draw(st.sampled_from([0, dims[0] + 1, "2"]))
            if draw(st.booleans()):
                node["eps"] = draw(st.sampled_from([1e-12, 0.5])) if fits else draw(st.sampled_from([0, 1, "1e-6", 1e-300]))
            if draw(st.booleans()):  # DaViT's: no L2 norms and a fixed scale (no temperature tensor)
                node["normalize"] = draw(st.booleans()) if fits else draw(st.sampled_from([0, "false", None]))
                node["scale"] = draw(st.sampled_from([0.25, 2.0])) if fits else draw(st.sampled_from([1e300, "0.5", True]))
        elif op == "lambda_layer":  # a lambda layer of one map (q = k = v: one head of dim = its channels), r
            node["inputs"] += [src, src]
            node["heads"] = 1 if fits else draw(st.sampled_from([0, 2, "1"]))
            node["dim"] = dims[0] if fits else draw(st.sampled_from([0, dims[0] + 1, 2.0]))
            if draw(st.integers(0, 3)) == 0:  # the relative embedding of the map (r left out), or both, or neither
                node["rel_pos"] = dims[1:] if fits and len(dims) == 3 else draw(st.sampled_from([0, [2, 2, 2], "x"]))
                if not fits:
                    node["r"] = draw(st.sampled_from([3, None]))
            else:
                node["r"] = draw(st.sampled_from([1, 3, 5])) if fits else draw(st.sampled_from([0, 2, 33, None]))
        elif op == "outlook_attention":  # VOLO's: v and logits one map, so heads = C and 1 × 1 windows fit
            node["inputs"].append(src)
            node.update({"heads": dims[0] if fits else draw(st.sampled_from([0, dims[0] + 1, "2"])),
                         "k": 1 if fits else draw(st.sampled_from([2, 3, 16, 0])),
                         "scale": draw(st.sampled_from([0.5, 2.0])) if fits else draw(st.sampled_from([0, -1, "1"]))})
            if draw(st.booleans()):
                node["stride"] = 1 if fits else draw(st.sampled_from([2, 0]))
            if draw(st.booleans()):
                node["pad"] = 0 if fits else draw(st.sampled_from([1, -1, 2.0]))
        elif op == "state_pool":  # EfficientViM's states: logits and b of the map's positions (src's own channels
            # as the states), or of another tensor (refused unless its positions match), or missing
            same = [n for n in names if len(known.get(n, [])) == 3 and known[n][1:] == dims[1:]] or names
            other = draw(st.sampled_from(same if fits else names))
            node["inputs"] += draw(st.sampled_from([[other, other], [src, other], [other]] if fits else
                                                   [[other, other], [other], [other, src, src]]))
        elif op == "state_read":  # the states read back: a (C, S, 1) state_pool output and a map of S channels
            states = dims[1] if len(dims) == 3 and dims[2] == 1 else 0
            maps = [n for n in names if len(known.get(n, [])) == 3 and known[n][0] == states] or names
            node["inputs"].append(draw(st.sampled_from(maps if fits else names)))
            if not fits and draw(st.booleans()):
                node["extra"] = draw(hostile)  # a field the op has not
        elif op == "rotary":  # RoPE on a (C, T, 1) token map: heads of an even size, a table row per token after
            # the prefix (d sines, d cosines), or hostile heads, prefix and tables
            t = dims[1] if len(dims) == 3 else 1
            heads = draw(st.sampled_from([h for h in (1, 2) if dims[0] % (2 * h) == 0] or [1])) if fits else \
                draw(st.sampled_from([0, 3, "1"]))
            d = dims[0] // heads if type(heads) is int and heads > 0 else 2
            prefix = draw(st.sampled_from([p for p in (0, 1) if p < t] or [0])) if fits else \
                draw(st.sampled_from([-1, t, t + 1]))
            rows = np.random.default_rng(draw(st.integers(0, 9))).uniform(-1, 1, (max(t - prefix, 1), 2 * d))
            node.update({"heads": heads, "prefix": prefix, "half": draw(st.booleans()),
                         "table": rows.tolist() if fits else draw(st.sampled_from(
                             [[], [[float("nan")] * 2 * d], [[1e5] * 2 * d], "x", [[1.0, 2.0], [3.0]],
                              rows[:, :-1].tolist(), [[True] * 2 * d]]))})
            if draw(st.integers(0, 3)) == 0:  # the table another node stores (a file's later blocks), or a bad name
                node.pop("table")
                node["table_from"] = draw(st.sampled_from([*names[1:], "nope", 3]))
        elif op == "fourier_pos":  # EdgeNeXt's sine-cosine grid of the map's shape: no tensors
            node["hidden"] = draw(st.sampled_from([1, 2, 4])) if fits else draw(st.sampled_from([0, 513, 2.0]))
            if draw(st.booleans()):
                node["temperature"] = draw(st.sampled_from([10000.0, 0.5])) if fits else \
                    draw(st.sampled_from([float("inf"), "1", None, 0.0, -2.0, 1e-300]))  # no finite grid
        elif op == "layer_norm":  # over the channels, or over the whole map (GroupNorm1, or of G groups: BiT)
            node["ch"] = dims[0] if fits else draw(hostile)
            if draw(st.booleans()):
                node["over"] = draw(st.sampled_from(["channels", "map"] if fits else ["groups", 1, None]))
            if draw(st.booleans()):  # fitting: groups dividing the channels (over the channels only 1 fits)
                node["groups"] = draw(st.sampled_from([g for g in (1, 2, 4) if dims[0] % g == 0])) if fits else \
                    draw(st.sampled_from([0, dims[0] + 1, "2", 2.0, None]))
            if draw(st.booleans()):  # MetaFormer v2's bias-less norm (refused without affine), or a hostile value
                node["bias"] = draw(st.booleans()) if fits else draw(st.sampled_from([0, "no", None, 1]))
            if draw(st.integers(0, 3)) == 0:
                node["affine"] = draw(st.booleans())
            if draw(st.integers(0, 3)) == 0:  # an RMSNorm (MobileNetV5: over the channels, no bias), or hostile
                node["rms"] = draw(st.booleans()) if fits else draw(st.sampled_from([1, "yes", None, 0]))
        elif op == "attention_pool":  # GCNet's pool over the map, or MobileViTv2's per patch offset (patch)
            node["inputs"].append(draw(st.sampled_from([n for n in names if known.get(n, [0])[:1] == [1] and
                                                        known.get(n)[1:] == dims[1:]] or names)))
            if draw(st.booleans()):
                sides = dims[1:] if len(dims) == 3 else [1, 1]
                node["patch"] = [draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0])) for n in sides] \
                    if fits else draw(st.sampled_from([0, [s + 1 for s in sides], "2"]))
        elif op == "upsample":  # nearest or bilinear (EfficientFormerV2's strided attention), by integer factors
            node["scale"] = draw(st.sampled_from([1, 2, [2, 1]])) if fits else draw(st.sampled_from([0, [1, 2, 3]]))
            if draw(st.booleans()):
                node["mode"] = draw(st.sampled_from(["nearest", "bilinear", "tile"] if fits else ["bicubic", 1, None]))
            if draw(st.booleans()):  # bilinear only (refused with nearest), or a hostile value
                node["align_corners"] = draw(st.booleans()) if fits else draw(st.sampled_from([1, "true", None]))
        elif op == "space_to_depth":  # ONNX's order or Swin's patch merging's
            node["block"] = draw(st.sampled_from([1, 2, 3]))
            if draw(st.booleans()):
                node["order"] = draw(st.sampled_from(["hw", "wh"] if fits else ["xy", 2, None]))
        elif op == "reshape":
            node["shape"] = [int(np.prod(dims)), 1, 1] if fits else draw(st.lists(st.integers(1, 64), max_size=3))
        nodes.append(node)
        names.append(node["name"])
    nodes.append({"name": "out", "op": "flatten", "inputs": [names[-1]]})
    return {"name": "fuzzed", "input_shape": shape, "nodes": nodes}


def _random_model(arch: dict, seed: int) -> PackedModel:
    rng = np.random.default_rng(seed)
    base = {}
    for name, shape in param_shapes(arch).items():
        w = rng.standard_normal(shape).astype(np.float32) / np.float32(np.sqrt(max(1, np.prod(shape[1:]))))
        base[name] = np.abs(w) + np.float32(0.5) if name.endswith("running_var") else w
    heads = [{"head.weight": rng.standard_normal((3, arch["feature_dim"])).astype(np.float32),
              "head.bias": rng.standard_normal(3).astype(np.float32)} for _ in range(2)]
    params = {**{n: {"kind": "shared"} for n in base}, "head.weight": {"kind": "task"}, "head.bias": {"kind": "task"}}
    return PackedModel(arch, "finetune", {}, params, base, [TaskInfo("a", 3), TaskInfo("b", 3)], heads)


def hostile_specs(corpus, which: int, data) -> bool:
    import torch

    from edgecl.runtime import TaskRuntime
    from edgecl.train.models import forward

    spec = data.draw(_spec())
    path = _path(corpus, "spec.edgecl")
    try:
        arch = validate(spec)
    except UsageError:
        unchecked = PackedModel(spec, "finetune", {}, {"head.weight": {"kind": "task"}, "head.bias": {"kind": "task"}},
                                {}, [TaskInfo("a", 3)], [{}])
        try:
            artifact.save(unchecked, path)
        except UsageError:
            return False
        raise AssertionError("save stored an architecture validate refuses")
    packed = _random_model(arch, which)
    artifact.save(packed, path)
    with artifact.load(path) as art:
        art.verify()
        weights = art.materialize(1)
    x = np.random.default_rng(which).standard_normal((2, *arch["input_shape"])).astype(np.float32)
    want = forward(arch, {k: torch.from_numpy(v) for k, v in weights.items()}, torch.from_numpy(x)).numpy()
    for strategy in ("inplace", "sessions"):
        try:
            got = TaskRuntime(path, strategy=strategy).infer(x, task=1)
        except UsageError as exc:
            assert "not finite" in str(exc) and not np.isfinite(want).all(), exc
            continue
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(want).max())),
                                   err_msg=f"{strategy}: {arch['nodes']}")
    return True


# ---------------------------------------------------------------- item 9

def _bomb(manifest: dict, table: dict, blobs: bytes, kind: str, n: int) -> tuple[dict, dict, bytes]:
    nodes = manifest["arch"]["nodes"]
    last = nodes[-1]["name"]
    if kind == "classes":
        manifest["tasks"][0]["n_classes"] = n
    elif kind == "nodes":
        nodes += [{"name": f"r{i}", "op": "relu", "inputs": [last if i == 0 else f"r{i - 1}"]} for i in range(n)]
        manifest["arch"]["output"] = nodes[-1]["name"]
    elif kind == "edges":
        nodes += [{"name": f"a{i}", "op": "add", "inputs": [last] * 256} for i in range(n // 256)]
    elif kind == "containers":
        manifest["extra"]["junk"] = [{}] * n
    else:  # activations multiplied by concatenation
        for i in range(n):
            nodes.append({"name": f"c{i}", "op": "cat", "inputs": [nodes[-1]["name"]] * 256})
    return manifest, table, blobs


def size_bombs(corpus, which: int, data) -> bool:
    from edgecl.arch.spec import MAX_EDGES, MAX_NODES
    from edgecl.artifact.limits import MAX_CLASSES, MAX_JSON_CONTAINERS

    kind = data.draw(st.sampled_from(["classes", "nodes", "edges", "containers", "activations"]))
    bound = {"classes": MAX_CLASSES, "nodes": MAX_NODES, "edges": MAX_EDGES, "containers": MAX_JSON_CONTAINERS,
             "activations": 4}[kind]
    n = data.draw(st.sampled_from([bound // 2, bound - 10, bound + 1, bound + 10, 4 * bound]))
    raw = am.build_file(*_bomb(*am.split_file(corpus.originals[which][0]), kind, max(1, n)))
    tracemalloc.start()
    try:
        loaded = _loads(corpus, raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the corpus files decode to a few KB: what a bomb costs is its header's and spec's parsing and checking
    assert peak <= min(decode_bound(len(raw)), BOMB_HEAP), f"{kind} {n}: {peak} bytes for a {len(raw)}-byte file"
    return loaded


BOMB_HEAP = 64 << 20
"""Python heap a size bomb may take to be loaded or refused (an 8 MiB header of 250,000 empty objects: ~40 MB)."""

