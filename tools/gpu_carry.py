"""Carry onnxruntime-gpu (and zstandard) to a lent GPU machine that reaches no package registry, in as few calls as
the upload cap allows, then run `tools/gpu_check.py` there.

Each call to the device uploads the working tree plus what it carries, at most 64 MiB. onnxruntime-gpu 1.31.1 is a
255.6 MB wheel: cut in four it leaves 3.5 MB for a tree of 3.7 MB, so a plain four-way split is refused. Here the two
wheels are unpacked into one site-packages tree, packed as tar.xz (about 205 MB) and cut into parts sized against this
tree's real upload, with a margin.

    python tools/gpu_carry.py prepare           # here: writes .gpucarry1/ … .gpucarryN/ (git-ignored), prints the calls
    python3 tools/gpu_carry.py stash .gpucarryK # there, one call per part (stdlib only): the part into /tmp/edgecl-gpu
    python3 tools/gpu_carry.py unpack           # there, in the last call: join, check sha256, extract to
                                                # /tmp/edgecl-site, link the image's nvidia libraries beside it
The machine stays warm ~30 s after a call: make the calls back to back. `prepare` prints them, the last one ending in
the check with its JSON and log under $OUT.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import math
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPLOAD_LIMIT = 64 * 2 ** 20  # bytes per call: the working tree + what it carries
MARGIN = 2 * 2 ** 20  # files added to the tree between `prepare` and the calls
STASH = Path("/tmp/edgecl-gpu")
SITE = Path("/tmp/edgecl-site")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CHECK = ("PYTHONPATH={site}:$PWD PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --out $OUT/gpu_check.json "
         "2>&1 | tee $OUT/gpu_check.log")


class CarryError(Exception):
    """A part missing or damaged, or a wheel that cannot be had: said in one line, exit 2."""


def download(requirement: str, cache: Path) -> Path:
    """The cp312 manylinux wheel of `requirement` (the GPU image's Python is 3.12), from pip's configured index."""
    cache.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(cache),
               requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(name + "-")
                   and ("==" not in requirement or f"-{requirement.split('==')[1]}-" in p.name))
    if not found:
        raise CarryError(f"no wheel for {requirement}: pip said {done.stderr.strip()[-400:]}")
    return found[-1]


def pack(wheels: list[Path], archive: Path) -> None:
    """One tar.xz of the wheels' files in site-packages layout (a wheel is a zip of exactly that); permissions kept,
    so the extension modules stay executable."""
    with lzma.open(archive, "wb", preset=6) as raw, tarfile.open(fileobj=raw, mode="w|") as tar:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    data = zf.read(info)
                    entry = tarfile.TarInfo(info.filename)
                    entry.size, entry.mode = len(data), (info.external_attr >> 16) & 0o777 or 0o644
                    tar.addfile(entry, io.BytesIO(data))


def tree_upload_bytes(root: Path) -> int:
    """What every call uploads besides its carry: tracked and untracked-not-ignored files, and shared/."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.split(b"\0")
    files = {root / os.fsdecode(name) for name in listed if name}
    if (root / "shared").is_dir():
        files |= {p for p in (root / "shared").rglob("*") if p.is_file()}
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


def plan_parts(archive_bytes: int, tree_bytes: int, limit: int = UPLOAD_LIMIT) -> int:
    room = limit - tree_bytes - MARGIN
    if room <= 0:
        raise CarryError(f"the working tree uploads {tree_bytes} B, which leaves no room under {limit} B per call")
    return max(1, math.ceil(archive_bytes / room))


def prepare(args: argparse.Namespace) -> None:
    root, cache = Path(args.root), Path(args.cache)
    wheels = [Path(w) for w in args.wheel] or [download(f"onnxruntime-gpu=={args.ort_version}", cache),
                                               download(f"zstandard=={args.zstandard_version}", cache)]
    key = hashlib.sha256("".join(f"{w.name}:{w.stat().st_size}" for w in wheels).encode()).hexdigest()[:12]
    archive, partial = cache / f"site-{key}.tar.xz", cache / f"site-{key}.partial"
    if not archive.exists():
        print(f"packing {', '.join(w.name for w in wheels)} (a few minutes) …", flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        pack(wheels, partial)
        partial.replace(archive)
    data = archive.read_bytes()
    tree = tree_upload_bytes(root)
    n = plan_parts(len(data), tree, args.limit)
    size = math.ceil(len(data) / n)
    for old in root.glob(".gpucarry*"):
        shutil.rmtree(old)
    exclude = Path(subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=root, capture_output=True,
                                  text=True, check=True).stdout.strip())  # .git is a file in a worktree
    exclude = exclude if exclude.is_absolute() else root / exclude
    exclude.parent.mkdir(parents=True, exist_ok=True)
    lines = exclude.read_text().splitlines() if exclude.exists() else []
    for k in range(1, n + 1):
        folder = root / f".gpucarry{k}"
        folder.mkdir()
        (folder / f"part{k}").write_bytes(data[(k - 1) * size:k * size])
        if f"/.gpucarry{k}/" not in lines:
            lines.append(f"/.gpucarry{k}/")
    exclude.write_text("\n".join(lines) + "\n")
    manifest = {"parts": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "wheels": [w.name for w in wheels]}
    (root / f".gpucarry{n}" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"{len(data)} B in {n} parts of ≤ {size} B; the tree uploads {tree} B; each call ≤ {tree + size} B "
          f"(limit {args.limit})")
    for k in range(1, n + 1):
        command = f"python3 tools/gpu_carry.py stash .gpucarry{k}"
        if k == n:
            command += f" && python3 tools/gpu_carry.py unpack && {CHECK.format(site=SITE)}"
        print(f"call {k}: carry [\".gpucarry{k}\"]  command: {command}")


def stash(args: argparse.Namespace) -> None:
    folder, into = Path(args.folder), Path(args.into)
    parts = sorted(folder.glob("part*")) + sorted(folder.glob("manifest.json"))
    if not parts:
        raise CarryError(f"{folder}: no part here (was it named in the call's carry?)")
    into.mkdir(parents=True, exist_ok=True)
    for part in parts:
        shutil.copyfile(part, into / part.name)
    print(f"stashed {', '.join(p.name for p in parts)} in {into}")


def unpack(args: argparse.Namespace) -> None:
    into, site = Path(args.into), Path(args.site)
    try:
        manifest = json.loads((into / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise CarryError(f"{into}/manifest.json unreadable ({exc}): stash the last part first") from None
    missing = [k for k in range(1, manifest["parts"] + 1) if not (into / f"part{k}").is_file()]
    if missing:
        raise CarryError(f"parts {missing} of {manifest['parts']} are not in {into}: the machine went back between "
                         "calls (warm ~30 s) or a call was skipped; stash every part again")
    data = b"".join((into / f"part{k}").read_bytes() for k in range(1, manifest["parts"] + 1))
    if len(data) != manifest["bytes"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise CarryError(f"the parts in {into} do not join to the packed wheels ({len(data)} B, want "
                         f"{manifest['bytes']} B with sha256 {manifest['sha256'][:16]}…)")
    site.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        tar.extractall(site, filter="data")
    linked = link_nvidia(site)
    print(f"unpacked {', '.join(manifest['wheels'])} into {site}"
          + (f"; linked {linked}" if linked else "; no nvidia/ libraries found to link"))
    probe = ("import onnxruntime as o; o.preload_dlls(); print('onnxruntime', o.__version__, "
             "o.get_available_providers())")
    subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(site)}, check=False)


def link_nvidia(site: Path) -> str | None:
    """onnxruntime's `preload_dlls` looks for the CUDA libraries in `nvidia/` beside itself; the image has them
    beside its own packages (torch's), so link that folder into the unpacked site."""
    import site as site_module

    for base in site_module.getsitepackages() + [site_module.getusersitepackages()]:
        nvidia = Path(base) / "nvidia"
        if nvidia.is_dir() and not (site / "nvidia").exists():
            (site / "nvidia").symlink_to(nvidia)
            return str(nvidia)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    prep = sub.add_parser("prepare", help="here: download, pack and cut into parts; print the calls")
    prep.add_argument("--ort-version", default="1.31.1")
    prep.add_argument("--zstandard-version", default="0.25.0")
    prep.add_argument("--wheel", action="append", default=[], help="use these wheels instead of downloading")
    prep.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "edgecl-gpu-carry"))
    prep.add_argument("--root", default=str(ROOT), help="the repository whose tree travels")
    prep.add_argument("--limit", type=int, default=UPLOAD_LIMIT, help="bytes per call (64 MiB)")
    st = sub.add_parser("stash", help="there: copy one carried part into the stash")
    st.add_argument("folder")
    st.add_argument("--into", default=str(STASH))
    un = sub.add_parser("unpack", help="there: join, check and extract the stashed parts")
    un.add_argument("--into", default=str(STASH))
    un.add_argument("--site", default=str(SITE))
    args = p.parse_args(argv)
    try:
        {"prepare": prepare, "stash": stash, "unpack": unpack}[args.step](args)
    except CarryError as exc:
        print(f"gpu_carry {args.step}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
