"""Which torchvision and timm models go into edgecl as they are: each is built without pretrained weights, traced by
`from_torch` at 3×64×64 (3×96×96 for inception_v3; models built for one input size, the plain ViTs, LeViT, PiT,
Visformer, EfficientFormerV2, timm's MaxViT and most newer transformers, are built for 64×64 by `BUILD_ARGS`; Swin,
TinyViT and torchvision's MaxViT at sizes whose stage maps their windows tile, EfficientViT-M0, GC ViT and
EfficientFormer (v1) at their native 224, HaloNet at its 256 and CrossViT at 120 (both branches' patches tile it),
`SIZES`), and — with `--parity` — its spec's torch forward and ONNX graph are compared with the module
(`tests/torch_nets.check_parity`). A refusal is recorded with edgecl's message, so the list says what is missing and
where.

    python tools/model_coverage.py [--parity] [--out tools/results/model_coverage.json]   # ~3 min, ~4 with --parity (2-core AMD EPYC)
    python tools/model_coverage.py --parity --only timm:nf_resnet26 …   # re-check these rows, keep the others
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
               "shufflenet_v2_x0_5", "squeezenet1_0", "mnasnet0_5", "densenet121", "regnet_x_400mf", "regnet_y_400mf",
               "googlenet", "vgg11", "vgg11_bn", "alexnet", "convnext_tiny", "resnext50_32x4d", "wide_resnet50_2",
               "efficientnet_v2_s", "vit_b_16", "swin_t", "maxvit_t", "swin_v2_t"]
TIMM = ["resnet10t", "resnet18", "mobilenetv3_small_050", "mobilenetv2_050", "efficientnet_b0", "ghostnet_050",
        "cspresnet50", "dla34", "hrnet_w18_small", "regnetx_002", "rexnet_100", "lcnet_050", "mixnet_s", "tinynet_e",
        "fbnetc_100", "semnasnet_050", "dpn48b", "densenet121", "vgg11", "ese_vovnet19b_dw", "repvgg_a0",
        "mobileone_s0", "efficientvit_b0", "convnext_atto", "levit_128s", "resnest14d", "selecsls42b",
        "tf_mobilenetv3_small_minimal_100", "hardcorenas_a", "mobilevit_xxs", "edgenext_xx_small", "fastvit_t8",
        "ghostnetv2_100", "inception_v3", "xception41", "res2net50_14w_8s", "skresnet18", "cs3darknet_s", "darknet17",
        "nf_resnet26", "gernet_s", "visformer_tiny", "inception_next_atto", "convnextv2_atto",
        # edge families added later: TensorFlow ports ("same" padding), NAS nets, recent mobile nets, and the
        # attention hybrids still refused
        "tf_efficientnet_lite0", "tf_mobilenetv3_large_100", "tf_mixnet_s", "efficientnet_lite0",
        "mobilenetv4_conv_small", "mnasnet_small", "spnasnet_100", "regnety_002", "regnetz_b16", "resnet18d",
        "seresnext26d_32x4d", "starnet_s1", "repghostnet_050", "cspdarknet53", "inception_v4", "hgnetv2_b0",
        "gcresnet33ts", "tresnet_m", "lambda_resnet26t", "efficientformerv2_s0", "tiny_vit_5m_224",
        "mobilenetv4_hybrid_medium", "deit_tiny_patch16_224", "pit_ti_224", "fastvit_sa12", "efficientvit_m0",
        "nasnetalarge", "repvit_m0_9", "ecaresnet26t", "vit_tiny_patch16_224",
        # the rest of the ViT token family: DeiT's distillation token, register tokens (average after the prefix)
        "deit_tiny_distilled_patch16_224", "vit_base_patch16_reg4_gap_256",
        # anti-aliased downsampling (BlurPool2d: reflect pad + binomial filter)
        "resnetblur18", "resnetblur50d", "resnetaa34d",
        # shifted window attention; grid (dilated window) attention; MobileViTv2's context vector over the patches
        "swin_tiny_patch4_window7_224", "maxvit_pico_rw_256", "maxvit_tiny_tf_224", "mobilevitv2_050",
        # weight standardisation without gain and GroupNorm of 32 groups (BiT), NFNet's skipinit gain
        "resnetv2_50x1_bit", "dm_nfnet_f0", "nf_regnet_b0",
        # MetaFormer v2: bias-less norms, StarReLU (relu, square, scalar affine), pooling / SepConv / attention mixers
        "poolformerv2_s12", "convformer_s18", "caformer_s18",
        # found going in by a probe of further timm families (2026-11-30): focal modulation, InceptionNeXt, RDNet
        "focalnet_tiny_srf", "inception_next_tiny", "rdnet_tiny",
        # XCiT: XCA, its Fourier position encoding, local patch interaction, CaiT class attention
        "xcit_nano_12_p16_224", "xcit_tiny_12_p16_224",
        # MLP-Mixer: a Linear over the tokens (token mixing); ResMLP's Affine norms (a factor and an offset per
        # channel); gMLP's spatial gating (a channel split of tokens, token
        # mixing, a gating product); MambaOut's gated conv block (a channel split of a channels-last map)
        "mixer_s16_224", "resmlp_12_224", "gmlp_ti16_224", "mambaout_femto",
        # GhostNetV3 (its re-parameterisable branches, run as they are in eval mode)
        "ghostnetv3_050",
        # Twins: locally grouped (window) attention on zero-padded maps, global sub-sampled attention (PCPVT, SVT)
        "twins_pcpvt_small", "twins_svt_small",
        # DaViT: window attention on zero-padded maps, channel attention (k^T·v applied to q, fixed scale)
        "davit_tiny",
        # NesT: window attention over its blocks, a position embedding stored block by block, ConvPool
        "nest_tiny",
        # PVT v2 (spatial-reduction attention, DWConv MLP), Next-ViT (keys averaged over runs of tokens), SHViT
        # (single-head attention on a channel split), GC ViT (a global query tiled over the windows)
        "pvt_v2_b0", "nextvit_small", "shvit_s1", "gcvit_xxtiny",
        # CaiT (talking heads, class attention), ConViT (gated positional attention), Swin V2 and V2-CR (cosine
        # attention, the MLP position bias as its table), CrossViT (bicubic, cross attention), VOLO (outlook
        # attention; without its token-labelling aux head), TNT (pixels within patches)
        "cait_xxs24_224", "convit_tiny", "swinv2_tiny_window8_256", "swinv2_cr_tiny_224", "crossvit_tiny_240",
        "volo_d1_224", "tnt_s_patch16_224",
        # BEiT (q/v biases, relative position tables), EVA-02 (rotary embedding, SwiGLU, sub-LN), a RoPE ViT
        "beit_base_patch16_224", "eva02_tiny_patch14_224", "vit_small_patch16_rope_224",
        # BotNet and HaloNet (relative position logits; HaloNet's haloed blocks), CoAtNet, relative-position lambdas,
        # RelPosMlp (an MLP's bias table: CoAtNet-rmlp, MaxViT-rmlp)
        "botnet26t_256", "halonet26t", "coatnet_nano_rw_224", "lambda_resnet26rpt_256", "coatnet_rmlp_nano_rw_224",
        "maxvit_rmlp_pico_rw_256",
        # found going in as they are by a probe of every further timm module (2026-12-01): ConvMixer, CSPNeXt,
        # FasterNet (partial convs), PP-LCNetV2, the legacy SE-ResNet and Xception ports, Inception-ResNet-v2,
        # PNASNet, a hybrid ResNet-ViT, ViTamin
        "convmixer_768_32", "cspnext_tiny", "fasternet_t0", "lcnetv2_small", "legacy_seresnet18", "legacy_xception",
        "inception_resnet_v2", "pnasnet5large", "vit_small_r26_s32_224", "vitamin_small_224",
        # SAM's ViT (padded windows, decomposed relative positions), CPUBone's and LowFormer's conv attention (the
        # attention-free LowFormer), iFormer's single-head modulation attention, EfficientFormer (v1), SwiftFormer's
        # additive attention
        "samvit_base_patch16", "cpubone_s0", "lowformer_e1", "iformer_t", "efficientformer_l1", "swiftformer_xs",
        # MobileNetV5 (RMSNorms, multi-query attention, its multi-scale fusion), Hiera (mask units over the unrolled
        # tokens, q-pools), SAM 2's HieraDet (its position embedding resized from a parameter)
        "mobilenetv5_base", "hiera_tiny_224", "hieradet_small",
        # LowFormer's attention, upsampled by a transposed convolution; MViTv2 (pooled q, k, v by one head's conv
        # shared by every head, decomposed relative positions over maps of two sizes, residual pooling)
        "lowformer_b0", "mvitv2_tiny", "mvitv2_small_cls",
        # the relative-position ViT with its default RelPosMlp
        "vit_relpos_small_patch16_224",
        # EfficientViM (its hidden-state mixer: state_pool / state_read; sigmoid gates of one table's rows)
        "efficientvim_m1"]
# models whose position embedding (LeViT: attention-bias index) fixes the input size: built for the 64×64 traced
BUILD_ARGS = {"torchvision.models:vit_b_16": {"image_size": 64}, "timm:vit_tiny_patch16_224": {"img_size": 64},
              "timm:deit_tiny_patch16_224": {"img_size": 64}, "timm:deit_tiny_distilled_patch16_224": {"img_size": 64},
              "timm:vit_base_patch16_reg4_gap_256": {"img_size": 64},
              "timm:levit_128s": {"img_size": 64}, "timm:swin_tiny_patch4_window7_224": {"img_size": 112},
              "timm:pit_ti_224": {"img_size": 64}, "timm:visformer_tiny": {"img_size": 64},
              "timm:efficientformerv2_s0": {"img_size": 64}, "timm:maxvit_pico_rw_256": {"img_size": 64},
              "timm:maxvit_tiny_tf_224": {"img_size": 64}, "timm:xcit_nano_12_p16_224": {"img_size": 64},
              "timm:xcit_tiny_12_p16_224": {"img_size": 64}, "timm:mixer_s16_224": {"img_size": 64},
              "timm:resmlp_12_224": {"img_size": 64}, "timm:gmlp_ti16_224": {"img_size": 64},
              "timm:twins_pcpvt_small": {"img_size": 64}, "timm:twins_svt_small": {"img_size": 64},
              "timm:nest_tiny": {"img_size": 64}, "timm:cait_xxs24_224": {"img_size": 64},
              "timm:convit_tiny": {"img_size": 64}, "timm:swinv2_tiny_window8_256": {"img_size": 64},
              "timm:swinv2_cr_tiny_224": {"img_size": 64}, "timm:crossvit_tiny_240": {"img_size": 120},
              "timm:volo_d1_224": {"img_size": 64, "use_aux_head": False}, "timm:tnt_s_patch16_224": {"img_size": 64},
              "timm:beit_base_patch16_224": {"img_size": 64},
              "timm:eva02_tiny_patch14_224": {"img_size": 64, "num_classes": 10},  # no classifier by default
              "timm:vit_small_patch16_rope_224": {"img_size": 64}, "timm:botnet26t_256": {"img_size": 64},
              "timm:coatnet_nano_rw_224": {"img_size": 64}, "timm:lambda_resnet26rpt_256": {"img_size": 64},
              "timm:coatnet_rmlp_nano_rw_224": {"img_size": 64}, "timm:maxvit_rmlp_pico_rw_256": {"img_size": 64},
              "timm:vit_small_r26_s32_224": {"img_size": 64}, "timm:vitamin_small_224": {"img_size": 64},
              "timm:samvit_base_patch16": {"img_size": 64, "num_classes": 10},  # no classifier by default
              "timm:hiera_tiny_224": {"img_size": 64},
              "timm:mvitv2_tiny": {"img_size": 64}, "timm:vit_relpos_small_patch16_224": {"img_size": 64},
              "timm:mvitv2_small_cls": {"img_size": 64}}
# input sides other than 64: Swin and TinyViT pad a map their windows do not tile with zeros that join the attention
# (refused), so they are traced where the windows tile every stage (timm's Swin: 28, 14, 7, then 4 in one window;
# torchvision's swin_t, whose window is fixed: 56, 28, 14, 7; its swin_v2_t's windows of 8: 64, 32, 16, 8; TinyViT's
# windows 7, 14, 7: 28, 14, 7); torchvision's
# maxvit_t is built for 224 (its partitions of 7 fixed at construction); EfficientViT-M0 at its native 224: stage maps
# 14 (four windows of 7: a windowed conv on q), 7 and 4 (one window each)
# (EfficientFormer v1's attention bias is fixed at a 7×7 grid, the 224 input's, whatever img_size says)
SIZES = {"timm:swin_tiny_patch4_window7_224": 112, "timm:gcvit_xxtiny": 224, "timm:crossvit_tiny_240": 120,
         "timm:halonet26t": 256, "torchvision.models:swin_t": 224, "torchvision.models:swin_v2_t": 256, "timm:tiny_vit_5m_224": 224,
         "torchvision.models:maxvit_t": 224, "timm:efficientvit_m0": 224, "timm:efficientformer_l1": 224}
RESULTS = ROOT / "tools" / "results" / "model_coverage.json"


def check(name: str, parity: bool) -> dict:
    import torch

    from edgecl.arch import from_torch
    from edgecl.arch.factories import build_module
    from edgecl.errors import UsageError

    side = SIZES.get(name, 96 if "inception" in name else 64)
    shape = (3, side, side)
    started = time.perf_counter()
    try:
        torch.manual_seed(0)
        module = build_module(name, BUILD_ARGS.get(name)).eval()
        spec = from_torch(module, shape)
        row = {"ok": True, "nodes": len(spec["nodes"]), "ops": sorted({n["op"] for n in spec["nodes"]})}
        if parity:
            from torch_nets import check_parity, crossvit_head, randomise_batchnorm

            randomise_batchnorm(module)  # CrossViT averages two classifiers: one head on both class tokens
            check_parity(module, spec, shape, batch=2, head=crossvit_head(module) if "crossvit" in name else None)
            row["parity"] = True
    except UsageError as exc:
        row = {"ok": False, "refusal": str(exc).splitlines()[0][:400]}
    except AssertionError as exc:  # parity failed: a defect, recorded as one
        row = {"ok": True, "parity": False, "error": str(exc)[:400]}
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _kept_rows(path: str, names: list[str], only: list[str] | None) -> tuple[dict, bool]:
    """With `only`: (the rows of the results file at `path` that are not re-checked (every listed model must be in
    the model list and every other model must have a row, so the totals stay those of one full list), and whether
    they were checked with --parity."""
    if not only:
        return {}, True
    import json

    unknown = sorted(set(only) - set(names))
    if unknown:
        raise SystemExit(f"--only: {', '.join(unknown)} not in the model list (names look like timm:resnet18)")
    try:
        with open(path) as f:
            kept = json.load(f)
        rows, parity = kept["models"], bool(kept["parity_checked"])
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"--only keeps the other rows of {path}, which cannot be read ({exc}); run the full list")
    missing = [n for n in names if n not in rows and n not in only]
    if missing:
        raise SystemExit(f"--only: {path} has no row for {', '.join(missing[:5])}; run the full list")
    return {n: r for n, r in rows.items() if n in names}, parity


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parity", action="store_true", help="also compare each spec's torch and ONNX outputs with the "
                                                         "module's")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--only", nargs="+", metavar="NAME", help="re-check only these models (as listed in the file, "
                   "e.g. timm:nf_resnet26) and keep the other rows of --out; the totals are recomputed")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    names = [f"torchvision.models:{n}" for n in TORCHVISION] + [f"timm:{n}" for n in TIMM]
    (rows, kept_parity), todo = _kept_rows(args.out, names, args.only), names
    if args.only:
        todo = [n for n in names if n in args.only]
    for name in todo:
        rows[name] = check(name, args.parity)
        row = rows[name]
        print(f"{name:45s} {'OK' if row['ok'] else 'refused'}{'' if 'parity' not in row else ' parity ' + str(row['parity'])}"
              f"  {row.get('refusal', '')[:150]}", flush=True)
    rows = {name: rows[name] for name in names}
    ok = [n for n, r in rows.items() if r["ok"] and r.get("parity", True)]
    reasons = collections.Counter(r["refusal"].split(" (")[0].split(": ", 1)[-1][:60]
                                  for r in rows.values() if not r["ok"])
    out = {"what": __doc__.splitlines()[0], "torch": torch.__version__, "go_in": len(ok), "of": len(names),
           "parity_checked": args.parity and kept_parity, "models": rows, "refusals": dict(reasons.most_common())}
    from edgecl.train.outputs import save_json

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_json(out, args.out)
    print(f"{len(ok)} of {len(names)} go in{' with module parity' if args.parity else ''}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
