"""The window families on channels-last maps that still do not go in (README's refused list) are refused by name —
the op, the module path and the user's source line — never traced into a wrong network: GC ViT (one global query
shared by every window). Built small from timm's own classes. (DaViT and NesT went in: tests/test_davit.py,
tests/test_nest.py.)"""
from __future__ import annotations

import re

import pytest

from edgecl.arch import from_torch
from edgecl.arch.factories import ensure_torchvision_imports
from edgecl.errors import UsageError

ensure_torchvision_imports()
from timm.models.gcvit import GlobalContextVit  # noqa: E402

CASES = {
    "gcvit": (lambda: GlobalContextVit(img_size=32, depths=(1, 1), num_heads=(1, 2), window_ratio=(8, 16),
                                       embed_dim=8, num_classes=3), 32, "stages.0.blocks.0", r"gcvit\.py:\d+"),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_refused_by_module_and_source_line(family):
    make, side, path, line = CASES[family]
    with pytest.raises(UsageError) as info:
        from_torch(make().eval(), (3, side, side))
    message = str(info.value)
    assert "unsupported op" in message and f"in {path}," in message and re.search(line, message), message
