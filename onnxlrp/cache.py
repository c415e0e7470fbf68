"""An on-disk cache of compiled explainers, so that a second run does not rebuild the graph.

An entry is the compiled ONNX model (graph file, weights as external data) plus a JSON
summary, keyed by a hash of the model file's content, every option that shapes the relevance
graph, onnxlrp's own source and the onnxruntime version. The folder is $ONNXLRP_CACHE, else
$XDG_CACHE_HOME/onnxlrp, else ~/.cache/onnxlrp; the oldest entries go when it holds more
than 4 GB.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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
    """Save an entry. The weights go to an external-data file next to the graph: onnxruntime
    reads those without keeping a second copy of them, which saves about the weights' size in
    memory for as long as the session lives. Both files are staged in a temporary folder and
    renamed into place, the graph last, so lookup() never finds a half-written entry."""
    folder = directory()
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"{entry}.json", lambda tmp: Path(tmp).write_text(summary))
    staging = Path(tempfile.mkdtemp(prefix=f".{entry}.", dir=folder))
    try:
        onnx.save(model, staging / f"{entry}.onnx", save_as_external_data=True, location=f"{entry}.data",
                  size_threshold=1024)
        if (staging / f"{entry}.data").exists():  # a tiny model keeps all its weights inline
            os.replace(staging / f"{entry}.data", folder / f"{entry}.data")
        os.replace(staging / f"{entry}.onnx", folder / f"{entry}.onnx")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _prune(folder)
    return folder / f"{entry}.onnx"


def _prune(folder: Path) -> None:
    entries = sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
    total = 0
    for path in entries:
        data = path.with_suffix(".data")
        total += path.stat().st_size + (data.stat().st_size if data.exists() else 0)
        if total > LIMIT_BYTES:
            path.unlink(missing_ok=True)
            data.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
