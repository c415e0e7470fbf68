"""Bring onnxruntime-gpu to the GPU machine, which reaches no package index and takes at most
64 MiB per call, the working tree included.

Run here (with internet to PyPI), once:

    python benchmarks/gpu/pack.py

It downloads the wheels the GPU machine lacks (onnxruntime-gpu, built for CUDA 13 like the
machine's torch, and onnx-graphsurgeon and zennit), repacks onnxruntime-gpu as a tar.xz (the
wheel is 255 MB, the archive about 200 MB), cuts it into parts that fit one call each beside
the working tree, and prints the calls to make: each carries one part (files the machine keeps
while it stays warm, 30 s between calls), the last one carries the rest and runs the check
(benchmarks/gpu/run.sh). Everything lands in .gpu/, which git ignores.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from install import sha256  # the GPU machine's side of the parts (this folder)

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / ".gpu"
#: onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9, as the GPU machine's torch 2.11 (cu130)
WHEELS = ("onnxruntime-gpu==1.31.1", "onnx-graphsurgeon==0.6.1", "zennit==1.0.0")
PYTHON = "3.12"  # the GPU machine's python3
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIMIT = 64 * 2**20  # what one call may carry, working tree included
MARGIN = 2 * 2**20  # for files that change before the calls
ARCHIVE = "onnxruntime.tar.xz"


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what travels with every call: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / name.decode()).stat().st_size for name in listed if name and (root / name.decode()).is_file())


def download(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", PYTHON, "--implementation", "cp", *platforms, "-d", str(folder), *WHEELS],
                   check=True)
    return sorted(folder.glob("*.whl"))


def repack(wheel: Path, archive: Path) -> None:
    """The wheel's files as a tar.xz, to unpack straight into a folder on sys.path."""
    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(wheel).extractall(tmp)
        tar = archive.with_suffix("")
        subprocess.run(["tar", "-cf", str(tar), "-C", tmp, "."], check=True)
    if shutil.which("xz"):
        subprocess.run(["xz", "-9", "-T0", "-f", str(tar)], check=True)
    else:  # the standard library's lzma: single-threaded, the same format
        import lzma
        with tar.open("rb") as src, lzma.open(archive, "wb", preset=9) as dst:
            shutil.copyfileobj(src, dst, 2**20)
        tar.unlink()


def split(archive: Path, folder: Path, part_bytes: int) -> list[dict]:
    """Cut `archive` into parts of at most part_bytes: NAME.part-01-of-07, ..."""
    size = archive.stat().st_size
    count = -(-size // part_bytes)
    parts = []
    with archive.open("rb") as f:
        for index in range(count):
            path = folder / f"{archive.name}.part-{index + 1:02d}-of-{count:02d}"
            path.write_bytes(f.read(part_bytes))
            parts.append({"name": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)})
    return parts


def cut(archive: Path, folder: Path, part_bytes: int, wheel: str) -> list[dict]:
    """Split the archive into parts in `folder` and describe them in folder/small/manifest.json
    (what install.py checks them against); the archive itself goes."""
    parts = split(archive, folder, part_bytes)
    manifest = {"archive": archive.name, "sha256": sha256(archive), "parts": parts, "wheel": wheel}
    (folder / "small").mkdir(parents=True, exist_ok=True)
    (folder / "small" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    archive.unlink()
    return parts


def plan(parts: list[dict]) -> str:
    """The device calls to make, in order."""
    lines = ["Device calls, one right after another (the machine keeps the parts while it stays warm):"]
    for index, part in enumerate(parts[:-1], 1):
        lines.append(f"  {index}. carry [\".gpu/{part['name']}\"]  command: bash benchmarks/gpu/run.sh --status")
    lines.append(f"  {len(parts)}. carry [\".gpu/{parts[-1]['name']}\", \".gpu/small\"]  "
                 "command: bash benchmarks/gpu/run.sh --budget 420   (timeout_s 480)")
    lines.append("A later run on the same warm machine needs only .gpu/small (the archive is unpacked then).")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part-mib", type=float, help="part size (default: what fits beside the working tree)")
    args = p.parse_args()
    free = LIMIT - MARGIN - tree_bytes()
    part_bytes = int(args.part_mib * 2**20) if args.part_mib else free
    if part_bytes < 4 * 2**20 or part_bytes > free:
        sys.exit(f"pack: parts of {part_bytes / 2**20:.1f} MiB; {free / 2**20:.1f} MiB fit beside the working tree")
    if FOLDER.exists():
        shutil.rmtree(FOLDER)
    small = FOLDER / "small"
    wheels = download(FOLDER / "download")
    ort_wheel = next(w for w in wheels if w.name.startswith("onnxruntime_gpu-"))
    small.mkdir(parents=True)
    for wheel in wheels:
        if wheel != ort_wheel:
            shutil.copy(wheel, small)
    archive = FOLDER / ARCHIVE
    repack(ort_wheel, archive)
    parts = cut(archive, FOLDER, part_bytes, ort_wheel.name)
    shutil.rmtree(FOLDER / "download")
    calls = plan(parts)
    (FOLDER / "PLAN.txt").write_text(calls + "\n")
    print(f"{len(parts)} parts of at most {part_bytes / 2**20:.1f} MiB in {FOLDER.relative_to(ROOT)}/ "
          f"(the calls below are in {FOLDER.relative_to(ROOT)}/PLAN.txt too)\n")
    print(calls)


if __name__ == "__main__":
    main()
