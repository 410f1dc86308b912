"""Rules of single ops that `spec.validate` applies across fields or nodes, after each field's own check: where a
"-inf" pad may be read, which of an attention's optional fields go together, and an attention's tensors (and
the bias tables several attentions share by rows)."""
from __future__ import annotations

from typing import Any, Callable

from edgecl.arch.bias_parts import bias_parts_fields
from edgecl.arch.conv_transpose import conv_transpose_fields
from edgecl.arch.gpsa_ops import GATED_POS, gated_pos_shapes
from edgecl.arch.halo import halo_fields
from edgecl.arch.lambda_ops import lambda_fields, lambda_tensor_shapes
from edgecl.arch.mlp_bias import MLP_TENSORS, mlp_fields, mlp_names, mlp_tensor_shapes
from edgecl.arch.rel_pos import MVIT_TENSORS, REL_TENSORS, rel_fields, rel_tensor_shapes
from edgecl.errors import UsageError



def check_minus_inf_pads(nodes: list[dict[str, Any]], shapes: dict[str, list[int]]) -> None:
    """A ``"-inf"`` pad exists for a max pool to read (TensorFlow's "same" pools): anything else reading it (a conv,
    an average, a sum) computes ±inf or NaN in every task, and so would a max-pool window holding only padding. So
    it feeds max pools only, each of whose windows takes a real row and column: the first window does not end before
    the map and the last does not start after it (every window between does too when the map is at least as tall
    and wide as the dilation, which is required)."""
    pads = {n["name"]: n for n in nodes if n["op"] == "pad" and n["value"] == "-inf"}
    for node in nodes:
        for src in set(node["inputs"]) & set(pads):
            where = f"architecture node {node['name']!r} reads pad {src!r} of -inf"
            if node["op"] != "maxpool":
                raise UsageError(f"{where}: only a maxpool may (a {node['op']} computes inf or NaN from it)")
            real = shapes[pads[src]["inputs"][0]][1:]
            before = pads[src]["pads"][:2]
            for a in range(2):
                k, s, p, d = node["k"][a], node["stride"][a], node["pad"][a], node["dilation"][a]
                n = shapes[node["name"]][1 + a]
                if real[a] < d or -p + (k - 1) * d < before[a] or (n - 1) * s - p > before[a] + real[a] - 1:
                    raise UsageError(f"{where}: a window on axis {a + 2} holds only padding (its map {real[a]}, "
                                     f"pad before {before[a]}, k {k}, stride {s}, pad {p}, dilation {d}, {n} windows)")


def attention_fields(out: dict[str, Any], where: str) -> None:
    """An attention's optional fields go together: a shift, a dilation or a bias storage needs what it qualifies (a
    window, a table); a window without a shift is not shifted."""
    for key, needs in (("shift", "window"), ("bias_table", "bias_offsets"), ("bias_rows", "bias_offsets")):
        if out[key] is not None and out[needs] is None:
            raise UsageError(f"{where}: attention {key} {out[key]} needs a {needs}")
    if out["talking_heads"] and (out["window"] is not None or out["kv_heads"] != out["heads"]):
        raise UsageError(f"{where}: attention talking_heads needs kv_heads = heads and no window")
    if out["talking_linear"] and not out["talking_heads"]:
        raise UsageError(f"{where}: attention talking_linear (CaiT's Linear talking heads) needs talking_heads")
    if out["gated_pos"] and (out["window"] is not None or out["kv_heads"] != out["heads"] or out["talking_heads"] or
                             out["bias_offsets"] is not None):
        raise UsageError(f"{where}: attention gated_pos (ConViT's GPSA) needs kv_heads = heads, no window, no "
                         "talking heads and no bias table")
    if out["cosine"] and (out["talking_heads"] or out["kv_heads"] != out["heads"]):
        raise UsageError(f"{where}: attention cosine (Swin V2's) needs kv_heads = heads and no talking heads")
    if out["bias_table"] == "tf" and (out["window"] is None or out["bias_offsets"] !=
                                      (2 * out["window"][0] - 1) * (2 * out["window"][1] - 1)):
        raise UsageError(f"{where}: attention bias_table 'tf' (stored (heads, 2·wh − 1, 2·ww − 1)) needs a window "
                         f"and bias_offsets (2·wh − 1)(2·ww − 1), gets window {out['window']} and bias_offsets "
                         f"{out['bias_offsets']}")
    rows = out["bias_rows"]
    if rows is not None and (out["bias_table"] not in (None, "levit") or rows[0] + out["heads"] > rows[1]):
        raise UsageError(f"{where}: attention bias_rows {rows} (first row, rows of the module's table) must hold "
                         f"its {out['heads']} heads' rows in LeViT's (heads, offsets) layout")
    if out["dilated"] and out["window"] is None:
        raise UsageError(f"{where}: attention dilated needs a window")
    if out["window"] is not None and out["shift"] is None:
        out["shift"] = [0, 0]
    rel_fields(out, where)
    halo_fields(out, where)
    for key, others in (("gated_pos", ("cosine", "rel_pos", "halo_blocks", "bias_mlp")),  # no network has two of
                        ("cosine", ("rel_pos", "halo_blocks"))):  # these; their forms do not compose
        for other in others:
            if out[key] and out[other] not in (None, False):
                raise UsageError(f"{where}: attention {key} and {other} do not go together")
    if (out["bias_table"] == "mlp") != (out["bias_mlp"] is not None):  # (bias_rows is LeViT's layout alone)
        raise UsageError(f"{where}: attention bias_table 'mlp' and bias_mlp (its hidden width) go together; gets "
                         f"bias_table {out['bias_table']} and bias_mlp {out['bias_mlp']}")
    mlp_fields(out, where)


# an attention's talking-head tensors → their names in its module (EfficientFormerV2's two 1×1 convs over the heads)
TALKING = {"talk1_weight": "talking_head1.weight", "talk1_bias": "talking_head1.bias",
            "talk2_weight": "talking_head2.weight", "talk2_bias": "talking_head2.bias"}
# with ``talking_linear``: CaiT's two nn.Linear over the heads
TALKING_LINEAR = {"talk1_weight": "proj_l.weight", "talk1_bias": "proj_l.bias",
                  "talk2_weight": "proj_w.weight", "talk2_bias": "proj_w.bias"}


def attention_tensor_shapes(node: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """An attention's tensors: its bias table (heads, offsets), and the talking heads' (heads, heads) mixes and their
    (heads,) biases, Swin V2's (heads,) logit scale; XCA's per-head temperature (`edgecl.arch.sdta_ops`); a lambda
    layer's position filters and their bias (`edgecl.arch.lambda_ops`)."""
    h = node["heads"]
    if node["op"] == "channel_attention":  # none where its scale is fixed (DaViT's)
        return {"temperature": (h,)} if node.get("scale") is None else {}
    if node["op"] == "lambda_layer":
        return lambda_tensor_shapes(node)
    shapes = {"bias": (h, node["bias_offsets"])} if node.get("bias_offsets") else {}
    if node.get("bias_mlp"):  # RelPosMlp: the table is an MLP's output, its weights are the tensors
        shapes = mlp_tensor_shapes(node)
    if node.get("talking_heads"):
        shapes.update({k: (h, h) if k.endswith("weight") else (h,) for k in TALKING})
    if node.get("gated_pos"):
        shapes.update(gated_pos_shapes(h))
    if node.get("cosine"):  # Swin V2's per-head logit scale
        shapes["logit_scale"] = (h,)
    return {**shapes, **rel_tensor_shapes(node)}


def row_table(node: dict[str, Any], tensor: str) -> tuple[range, tuple[int, ...]] | None:
    """Where a node's tensor is rows of a bigger module tensor: (its rows, that tensor's shape), or None. An attention
    bias with ``bias_rows`` [first, of] (rows of a table of ``of`` heads' offsets); a conv weight with ``weight_rows``
    [part, parts] (part ``part`` of ``parts`` equal row blocks: EVA's q, k, v, each its own conv, read from one fused
    qkv weight), its rows as the module stores them (``module_shape``); a layer scale's weight with ``weight_rows``
    [part, parts]: row ``part`` of a (parts, ch) tensor (EfficientViM's α, one row per gate of a block)."""
    if node["op"] == "attention" and tensor == "bias" and node.get("bias_rows"):
        first, of = node["bias_rows"]
        return range(first, first + node["heads"]), (of, node["bias_offsets"])
    if node["op"] == "conv" and tensor == "weight" and node.get("weight_rows"):
        (part, parts), out = node["weight_rows"], node["out"]
        row = node["module_shape"][1:] if "module_shape" in node else [node["in"] // node["groups"], *node["k"]]
        return range(part * out, (part + 1) * out), (parts * out, *row)
    if node["op"] == "conv" and tensor == "bias" and node.get("fused_bias"):  # the same rows of the fused bias
        (part, parts), out = node["weight_rows"], node["out"]
        return range(part * out, (part + 1) * out), (parts * out,)
    if node["op"] == "layer_scale" and node.get("weight_rows"):  # row `part` of a (parts, ch) table: EfficientViM's α
        part, parts = node["weight_rows"]
        return range(part, part + 1), (parts, node["ch"])
    return None


def zero_rows(nodes: list[dict[str, Any]],
              key_of: Callable[[dict[str, Any], str], str]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """A fused bias's rows that a bias-less part holds (torchvision's Swin V2: k's part of qkv.bias, which its
    forward zeroes): module key → (a name, the part's node as if it held them), for every part without a bias beside
    a ``fused_bias`` one of the same module tensor (`key_of`: a node's tensor's state key). They are a fixed zero:
    the spec's part computes no bias, and the module is given zeros there."""
    fused = {key_of(n, "bias") for n in nodes if n["op"] == "conv" and n.get("fused_bias")}
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for node in nodes:
        key = key_of(node, "bias")
        if node["op"] == "conv" and node.get("weight_rows") and not node["bias"] and key in fused:
            out.setdefault(key, []).append((f"{node['name']}.bias", {**node, "bias": True, "fused_bias": True}))
    return out


def stored_rows(node: dict[str, Any], tensor: str) -> range | None:
    """The rows of its module's tensor that a node's tensor is (`row_table`), or None: the whole tensor."""
    table = row_table(node, tensor)
    return None if table is None else table[0]


def weight_rows_fields(out: dict[str, Any], where: str) -> None:
    """A conv's or layer scale's ``weight_rows`` [part, parts]: a part of the parts; a conv's bias, if any, named on
    its own (``bias_parts``: the module's fused weight has no bias of these rows) or, ``fused_bias``, the same rows of
    the fused bias."""
    rows, fused = out.get("weight_rows"), out.get("fused_bias")
    if rows is not None and (rows[0] >= rows[1] or out.get("bias") and (out.get("bias_parts") is None) == (not fused)):
        raise UsageError(f"{where}: weight_rows {rows} (part, parts) needs part < parts and, with a bias, its "
                         "bias_parts or fused_bias")
    if fused and (rows is None or not out["bias"] or out.get("bias_parts") is not None):
        raise UsageError(f"{where}: fused_bias (its bias the same rows of the module's fused bias) needs "
                         "weight_rows and a bias, without bias_parts")


def check_table_rows(tables: dict[str, list[tuple[str, dict[str, Any]]]]) -> None:
    """Each module tensor (key) whose rows several nodes' tensors are (`stored_rows`) is one table."""
    for key, parts in tables.items():
        _check_table(key, parts)


def _check_table(key: str, parts: list[tuple[str, dict[str, Any]]]) -> None:
    """The tensors stored as rows of one module tensor `key` (`row_table`; each part: tensor name, node) are one
    table: each says it has the same shape (an attention's rows ``of`` and offsets), and together they hold each of its
    rows once. A row no node reads would be made up (zeros) when the rows are written back to the module, and a table
    no node set agrees on fits no module (nor does ``of`` beyond the nodes that read it: a hostile artifact's size
    bomb)."""
    spans = [(name, *row_table(node, name.rpartition(".")[2])) for name, node in parts]
    tables = {shape for _, _, shape in spans}
    if len(tables) > 1:
        what = "(rows, offsets)" if parts[0][1]["op"] == "attention" else "shapes"
        raise UsageError(f"architecture tensors {', '.join(repr(t) for t, _ in parts[:4])} are rows of the module's "
                         f"{key!r} but give it different {what}: {sorted(tables)[:4]}; one table has one shape")
    (rows, *_), = tables
    end, ordered = 0, sorted(spans, key=lambda span: span[1].start)
    for (name, span, _), before in zip(ordered, [None, *ordered]):
        if span.start < end:
            raise UsageError(f"architecture tensors {before[0]!r} and {name!r} both name the module's {key!r} (a "
                             "node's 'module' field, or its bias_rows / weight_rows): one weight cannot be two")
        if span.start > end:
            break
        end = span.stop
    if end != rows:
        raise UsageError(f"architecture tensors {', '.join(repr(t) for t, *_ in ordered[:4])} are rows of the "
                         f"module's {key!r} of {rows} rows, but row {end} of it is no node's (bias_rows [first, of], "
                         "weight_rows [part, parts]: the nodes of one table hold each of its rows once)")


def attention_state_name(node: dict[str, Any], tensor: str) -> str:
    """The module's name of an attention's tensor: the bias table's ``attention_biases`` (timm's LeViT,
    EfficientFormerV2) or, ``bias_table`` "swin" or "tf", ``relative_position_bias_table``; the talking heads'
    convs, or CaiT's Linears (``talking_linear``); Swin V2's ``logit_scale``; BotNet's relative position embeddings
    (`rel_pos`), SAM's and MViTv2's with ``rel_mvit``."""
    if tensor in TALKING:
        return (TALKING_LINEAR if node.get("talking_linear") else TALKING)[tensor]
    if tensor in GATED_POS:
        return GATED_POS[tensor]
    if tensor in REL_TENSORS and node.get("rel_mvit"):
        return MVIT_TENSORS[tensor]
    if tensor in REL_TENSORS:
        return REL_TENSORS[tensor]
    if tensor in MLP_TENSORS:
        return mlp_names(node)[tensor]
    if tensor == "logit_scale":
        return tensor
    return "relative_position_bias_table" if node.get("bias_table") in ("swin", "tf") else "attention_biases"


def standardized_fields(out: dict[str, Any], where: str) -> None:
    """A conv's weight-standardisation fields: ``gain_scale`` and ``std_gain`` only with ``standardize``, whose
    ``gain_scale`` defaults to 1 (stored: it came with the field); ``std_gain`` false is timm's StdConv2d (no learned
    gain). (The eps, as every eps, is at least `ops.MIN_EPS`: float32 adds it, where a smaller one is 0 and a zero
    filter 0/0.)"""
    if out["standardize"] is None:
        for key in ("gain_scale", "std_gain"):
            if out[key] is not None:
                raise UsageError(f"{where}: {key} needs standardize (the eps of a weight-standardised conv)")
    elif out["gain_scale"] is None:
        out["gain_scale"] = 1.0


def scalar_affine_fields(out: dict[str, Any], where: str) -> None:
    """Without a ``bias`` (a learned number times x alone, NFNet's skipinit gain), no bias to start."""
    if not out["bias"] and out["init_bias"] != 0.0:
        raise UsageError(f"{where}: init_bias {out['init_bias']:g} needs bias (a scalar_affine without one adds 0)")


def is_standardized(node: dict[str, Any]) -> bool:
    """Whether a node is a weight-standardised conv (``standardize``: its eps)."""
    return node["op"] == "conv" and bool(node.get("standardize"))


def has_gain(node: dict[str, Any]) -> bool:
    """Whether a conv node has a learned ``gain`` tensor: a standardised one unless ``std_gain`` is false."""
    return is_standardized(node) and node.get("std_gain", True)


def layer_norm_fields(out: dict[str, Any], where: str) -> None:
    """A GroupNorm's ``groups`` G: over the map, G dividing the channels. ``bias`` false (MetaFormer v2's norms: a
    weight, no bias) needs ``affine``: a norm without affine tensors has no bias to leave out. ``rms`` (an RMSNorm)
    is over the channels, with no bias (its weight alone, or no affine tensors)."""
    if not out["bias"] and not out["affine"]:
        raise UsageError(f"{where}: layer_norm bias false needs affine (a layer_norm without affine has no bias)")
    if out["rms"] and (out["over"] == "map" or (out["groups"] or 1) > 1 or out["affine"] and out["bias"]):
        raise UsageError(f"{where}: layer_norm rms (an RMSNorm) is over the channels, one group, without a bias "
                         "(affine with bias false, or no affine)")
    groups = out["groups"] or 1
    if groups > 1 and (out["over"] != "map" or out["ch"] % groups):
        raise UsageError(f"{where}: layer_norm groups {groups} needs over 'map' and {out['ch']} channels that the "
                         "groups divide")


def conv_fields(out: dict[str, Any], where: str) -> None:
    """A conv's weight standardisation and its tensors' storage: its bias in parts (`bias_parts`), its weight as rows
    of a fused one (``weight_rows``)."""
    standardized_fields(out, where)
    bias_parts_fields(out, where)
    weight_rows_fields(out, where)


# op → its fields' joint rule (checks, and defaults that depend on other fields), run by `spec.validate` after each
# field is read alone and before the later fields at their default are left out (`later_fields.drop_defaults`)
FIELD_RULES = {"attention": attention_fields, "conv": conv_fields, "scalar_affine": scalar_affine_fields,
               "layer_norm": layer_norm_fields, "lambda_layer": lambda_fields, "conv_transpose": conv_transpose_fields,
               "layer_scale": weight_rows_fields}
