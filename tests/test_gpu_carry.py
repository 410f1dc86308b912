"""tools/gpu_carry.py — how onnxruntime-gpu reaches a GPU machine under a per-call upload cap — on real files: two
small wheels packed, cut against a real git tree's upload, stashed part by part and unpacked to the same bytes;
damaged or missing parts are refused with exit 2 before anything is installed."""
from __future__ import annotations

import json
import os
import subprocess
import zipfile

import pytest
from tools_loader import load_tool


def _carry():
    return load_tool('gpu_carry')


def _wheel(path, files):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            zf.writestr(info, data)
    return path


@pytest.fixture
def prepared(tmp_path, capsys):
    carry = _carry()
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / "tracked.bin").write_bytes(os.urandom(300_000))
    files = {"fakeort/__init__.py": b"VERSION = 1\n", "fakeort/lib.so": os.urandom(900_000),
             "fakeort-1.dist-info/METADATA": b"Name: fakeort\n"}
    wheels = [_wheel(tmp_path / "fakeort-1-cp312-cp312-x.whl", files),
              _wheel(tmp_path / "zstd-1-cp312-cp312-x.whl", {"zstd/__init__.py": b"Z = 2\n"})]
    limit = 300_000 + carry.MARGIN + 400_000  # leaves 400 kB a call: the ~0.9 MB archive needs 3 parts
    args = ["prepare", "--root", str(root), "--cache", str(tmp_path / "cache"), "--limit", str(limit)]
    assert carry.main(args + [a for w in wheels for a in ("--wheel", str(w))]) == 0
    return carry, root, files, limit, capsys.readouterr().out


def test_parts_fit_the_upload_cap_and_join_to_the_same_files(prepared, tmp_path):
    carry, root, files, limit, printed = prepared
    folders = sorted(root.glob(".gpucarry*"))
    manifest = json.loads((folders[-1] / "manifest.json").read_text())
    assert len(folders) == manifest["parts"] == carry.plan_parts(manifest["bytes"], 300_000, limit) > 1
    tree = carry.tree_upload_bytes(root)
    assert tree == 300_000  # the parts are ignored: they do not travel twice
    assert all(tree + sum(p.stat().st_size for p in f.iterdir()) <= limit for f in folders)
    assert f"call {len(folders)}: carry" in printed and "tools/gpu_check.py --out $OUT/gpu_check.json" in printed
    assert all(f"/.gpucarry{k}/" in (root / ".git/info/exclude").read_text() for k in range(1, len(folders) + 1))
    stash, site = tmp_path / "stash", tmp_path / "site"
    for folder in folders:
        assert carry.main(["stash", str(folder), "--into", str(stash)]) == 0
    assert carry.main(["unpack", "--into", str(stash), "--site", str(site)]) == 0
    for name, data in files.items():
        assert (site / name).read_bytes() == data
    assert os.access(site / "fakeort/lib.so", os.X_OK) and (site / "zstd/__init__.py").read_text() == "Z = 2\n"


def test_damaged_or_missing_parts_are_refused(prepared, tmp_path, capsys):
    carry, root, _, _, _ = prepared
    folders = sorted(root.glob(".gpucarry*"))
    stash, site = tmp_path / "stash", tmp_path / "site"
    for folder in folders[1:]:
        carry.main(["stash", str(folder), "--into", str(stash)])
    assert carry.main(["unpack", "--into", str(stash), "--site", str(site)]) == 2
    assert "parts [1] of" in capsys.readouterr().err and not site.exists()
    carry.main(["stash", str(folders[0]), "--into", str(stash)])
    damaged = bytearray((stash / "part2").read_bytes())
    damaged[100] ^= 1
    (stash / "part2").write_bytes(bytes(damaged))
    assert carry.main(["unpack", "--into", str(stash), "--site", str(site)]) == 2
    assert "do not join to the packed wheels" in capsys.readouterr().err and not site.exists()
    assert carry.main(["stash", str(tmp_path / "nowhere")]) == 2
    assert "no part here" in capsys.readouterr().err


def test_a_tree_too_large_for_any_part_is_named():
    carry = _carry()
    with pytest.raises(carry.CarryError, match="leaves no room"):
        carry.plan_parts(10, carry.UPLOAD_LIMIT, carry.UPLOAD_LIMIT)
