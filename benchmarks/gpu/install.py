"""On the GPU machine: join the parts pack.py made, check them, and install into a folder.

    python3 benchmarks/gpu/install.py .gpu /tmp/site       # join, verify, unpack, install
    python3 benchmarks/gpu/install.py .gpu --status        # which parts are there

Exit 3 when parts are missing or damaged (it names them), 0 when the folder is ready.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

PART = re.compile(r"(?P<archive>.+)\.part-(?P<index>\d+)-of-(?P<count>\d+)$")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def status(folder: Path) -> str:
    """One line: the parts present, and those missing as far as the names tell."""
    found = {int(m["index"]): int(m["count"]) for p in folder.glob("*.part-*") if (m := PART.match(p.name))}
    if not found:
        return f"{folder}: no parts"
    count = max(found.values())
    missing = [i for i in range(1, count + 1) if i not in found]
    return f"{folder}: parts {sorted(found)} of {count}" + (f"; missing {missing}" if missing else "; all there")


def problems(folder: Path, manifest: dict) -> list[str]:
    out = []
    for part in manifest["parts"]:
        path = folder / part["name"]
        if not path.exists():
            out.append(f"{part['name']} missing")
        elif path.stat().st_size != part["bytes"] or sha256(path) != part["sha256"]:
            out.append(f"{part['name']} damaged")
    return out


def install(folder: Path, target: Path) -> None:
    """Join and check the archive, unpack it into target, install the small wheels there."""
    manifest = json.loads((folder / "small" / "manifest.json").read_text())
    done = target / ".installed"
    if done.exists() and done.read_text() == manifest["sha256"]:
        print(f"{manifest['wheel']}: already in {target}")
    else:
        bad = problems(folder, manifest)
        if bad:
            print(f"install: {'; '.join(bad)} (carry them again)", file=sys.stderr)
            raise SystemExit(3)
        archive = folder / manifest["archive"]
        with archive.open("wb") as out:
            for part in manifest["parts"]:
                out.write((folder / part["name"]).read_bytes())
        if sha256(archive) != manifest["sha256"]:
            print("install: the joined archive does not match its checksum", file=sys.stderr)
            raise SystemExit(3)
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(target, filter="data")
        archive.unlink()
        done.write_text(manifest["sha256"])
        print(f"{manifest['wheel']}: unpacked into {target}")
    wheels = sorted(str(w) for w in (folder / "small").glob("*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--ignore-requires-python", "--upgrade", "--target", str(target), *wheels], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("target", type=Path, nargs="?")
    p.add_argument("--status", action="store_true")
    args = p.parse_args()
    if args.status or args.target is None:
        print(status(args.folder))
        return
    install(args.folder, args.target)


if __name__ == "__main__":
    main()
