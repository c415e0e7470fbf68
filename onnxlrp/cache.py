"""An on-disk cache of compiled explainers, so that a second run does not rebuild the graph.

An entry is the compiled ONNX model plus a JSON summary, keyed by a hash of the model file's
content, every option that shapes the relevance graph, onnxlrp's own source and the
onnxruntime version. The folder is $ONNXLRP_CACHE, else $XDG_CACHE_HOME/onnxlrp, else
~/.cache/onnxlrp; the oldest entries go when it holds more than 4 GB.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import onnx
import onnxruntime

from .files import write_atomic

LIMIT_BYTES = 4 * 2**30


def directory() -> Path:
    if os.environ.get("ONNXLRP_CACHE"):
        return Path(os.environ["ONNXLRP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onnxlrp"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def _code_digest() -> str:
    """onnxlrp's own source: a changed rule must not find an old graph."""
    digest = hashlib.sha256(onnxruntime.__version__.encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def key(model: str | Path, options: dict) -> str:
    payload = json.dumps(options, sort_keys=True, default=str)
    return hashlib.sha256(f"{_file_digest(Path(model))}|{payload}|{_code_digest()}".encode()).hexdigest()[:32]


def lookup(entry: str) -> tuple[Path, str] | None:
    """(model path, summary JSON) of a cached entry, or None."""
    model, summary = directory() / f"{entry}.onnx", directory() / f"{entry}.json"
    if model.is_file() and summary.is_file():
        os.utime(model)  # recently used: pruned last
        return model, summary.read_text()
    return None


def store(entry: str, model: onnx.ModelProto, summary: str) -> Path:
    folder = directory()
    path = folder / f"{entry}.onnx"
    write_atomic(path, lambda tmp: onnx.save(model, tmp))
    write_atomic(folder / f"{entry}.json", lambda tmp: Path(tmp).write_text(summary))
    _prune(folder)
    return path


def _prune(folder: Path) -> None:
    entries = sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
    total = 0
    for path in entries:
        total += path.stat().st_size
        if total > LIMIT_BYTES:
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
