"""How tests/data/swinv2-table-specs.json was made: by `from_torch` of commit edb2fc8, the last to import timm's Swin
V2 position bias as the table its MLP computes (``bias_table`` "swin", a packed qkv bias): tiny SwinTransformerV2 and
SwinTransformerV2Cr specs, architecture only (no weights). Kept to say what the file holds; run it only from a checkout
of that commit, never to refresh the file:

    cd <checkout of edb2fc8> && PYTHONPATH=. python tests/data/make_swinv2_table_specs.py
"""
import json
import sys
sys.path.insert(0, "tests")
from edgecl.arch.factories import ensure_torchvision_imports; ensure_torchvision_imports()
import timm
from edgecl.arch import from_torch
from edgecl.arch.later_fields import stored_form
V2 = timm.models.swin_transformer_v2
CR = timm.models.swin_transformer_v2_cr
v2 = V2.SwinTransformerV2(img_size=16, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=5).eval()
cr = CR.SwinTransformerV2Cr(img_size=(16, 16), patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=5).eval()
out = {"swinv2": stored_form(from_torch(v2, (3, 16, 16))), "swinv2_cr": stored_form(from_torch(cr, (3, 16, 16)))}
json.dump(out, open("tests/data/swinv2-table-specs.json", "w"), separators=(",", ":"))
