"""An on-disk cache of compiled explainers, so that a second run does not rebuild the graph.

An entry is the compiled ONNX model (graph file, weights as external data) plus a JSON
summary, keyed by a hash of the model's content (its file and every external-data file it
names: ir.digest), every option that shapes the relevance graph, onnxlrp's own source and
the onnxruntime version. The folder is $ONNXLRP_CACHE, else
$XDG_CACHE_HOME/onnxlrp, else ~/.cache/onnxlrp; the oldest entries go when it holds more
than 4 GB.

The cache is an optimisation, never a reason to fail: a folder that cannot be written gives
one warning per process and the explainer runs from memory; an entry that cannot be read, or
is incomplete, is a miss.

Several processes may share the folder. An entry ``<key>`` is the files ``<key>.json``,
``<key>.data`` (the weights; empty for a model that keeps them inline) and ``<key>.onnx``
(the graph), and a lock file ``<key>.lock``:

- store() stages the three files in a temporary folder and renames them into place, the graph
  last; two processes storing the same entry write the same bytes, and each rename is atomic,
  so the entry is valid whichever rename lands last. lookup() takes an entry only when its
  graph is there, so it never finds a half-written one.
- _prune() removes an entry only while it holds the entry's lock exclusively, taken without
  waiting, and removes the graph first (lookup() then misses, never finds half an entry), the
  lock file last. reading() holds the lock shared while a caller opens an entry; store() holds
  it shared while it writes one. An entry someone holds is skipped. Where fcntl is missing
  (Windows) nothing is locked: an entry in use there cannot be deleted anyway.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import onnx
import onnxruntime

from ..errors import OnnxLrpWarning
from ..ir.digest import model_digest

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LIMIT_BYTES = 4 * 2**30
SUFFIXES = (".onnx", ".data", ".json", ".lock")  # the graph first: the order of removal
STALE_SECONDS = 24 * 3600  # staging folders left by a killed process go after a day

_warned = False  # the one warning per process about a cache that cannot be written


def directory() -> Path:
    if os.environ.get("ONNXLRP_CACHE"):
        return Path(os.environ["ONNXLRP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onnxlrp"


def _tree_digest(root: Path) -> str:
    """Every .py file under root, subfolders included, with its path relative to root."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        content = path.read_bytes()
        digest.update(f"{path.relative_to(root).as_posix()}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def _code_digest() -> str:
    """onnxlrp's own source: a changed rule must not find an old graph."""
    return hashlib.sha256(f"{onnxruntime.__version__}|{_tree_digest(Path(__file__).parent.parent)}".encode()).hexdigest()


def key(model: str | Path, options: str) -> str:
    """The entry name for a model (by content: its file and external data), an options digest and onnxlrp's code.

    options: a string that names every option shaping the relevance graph (a mapping is
    accepted too, and serialised with sorted keys)."""
    if not isinstance(options, str):
        options = json.dumps(options, sort_keys=True, default=str)
    payload = f"{model_digest(model)}|{options}|{_code_digest()}"
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def lookup(entry: str) -> tuple[Path, str] | None:
    """(graph path, summary JSON) of a complete, readable entry; else None (a miss)."""
    folder = directory()
    graph = folder / f"{entry}.onnx"
    try:
        if not (graph.is_file() and (folder / f"{entry}.data").is_file()):
            return None
        summary = (folder / f"{entry}.json").read_text(encoding="utf-8")
        json.loads(summary)
    except (OSError, ValueError):  # unreadable, half-removed, not JSON, not UTF-8
        return None
    try:
        os.utime(graph)  # recently used: pruned last
    except OSError:
        pass  # a read-only cache still serves its entries
    return graph, summary


def store(entry: str, model: onnx.ModelProto, summary: str) -> Path | None:
    """Save an entry; its graph path, or None (after one warning per process) where the cache
    cannot be written. `model` is left as it was, so the caller can keep it in memory then.

    The weights go to an external-data file next to the graph: onnxruntime reads those
    without keeping a second copy of them, which saves about the weights' size in memory for
    as long as the session lives."""
    folder = directory()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _holding(folder / f"{entry}.lock"):
            graph = _write(folder, entry, model, summary)
            try:
                _prune(folder)  # our own entry is held meanwhile: it stays, however large
            except OSError:
                pass
        return graph
    except OSError as error:
        _warn_unwritable(folder, error)
        return None


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Hold the entry whose graph is `path` (shared), so that no process prunes it meanwhile:
    for creating an onnxruntime session from it. Never fails: where the lock cannot be taken
    (no fcntl, a read-only folder, which nobody prunes either) it holds nothing."""
    fd = None
    if fcntl is not None:
        try:
            fd = _lock(Path(path).with_suffix(".lock"), fcntl.LOCK_SH)
        except OSError:
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _warn_unwritable(folder: Path, error: OSError) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    reason = error.strerror or str(error) or type(error).__name__
    warnings.warn(f"cache folder {folder} is not writable ({reason}); running without the cache",
                  OnnxLrpWarning, stacklevel=3)


def _write(folder: Path, entry: str, model: onnx.ModelProto, summary: str) -> Path:
    """Stage the entry's files in a temporary folder and rename them into place, the graph last."""
    staging = Path(tempfile.mkdtemp(prefix=f".{entry}.", dir=folder))
    try:
        (staging / f"{entry}.json").write_text(summary, encoding="utf-8")
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # onnx.save moves the weights out of the proto it is given
        onnx.save(copy, staging / f"{entry}.onnx", save_as_external_data=True, location=f"{entry}.data",
                  size_threshold=1024)
        del copy
        (staging / f"{entry}.data").touch()  # a tiny model keeps its weights inline: an empty file
        for suffix in (".json", ".data", ".onnx"):
            os.replace(staging / f"{entry}{suffix}", folder / f"{entry}{suffix}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / f"{entry}.onnx"


def _lock(path: Path, operation: int) -> int:
    """A descriptor on the lock file `path` (made if missing) holding flock `operation`.

    A pruner removes an entry's lock file while it holds it, so a lock taken on a file that no
    longer is (or no longer is the one at) `path` is worth nothing: then try again. Raises
    BlockingIOError where LOCK_NB was asked and someone holds it, OSError where the file
    cannot be made."""
    for _ in range(100):
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, operation)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass  # removed after we opened it: take the new one
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OSError(f"{path}: keeps being removed")


@contextmanager
def _holding(path: Path) -> Iterator[None]:
    """The entry's lock, shared, while store() writes it (nothing without fcntl)."""
    fd = _lock(path, fcntl.LOCK_SH) if fcntl is not None else None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _prune(folder: Path) -> None:
    """Remove the least recently used entries beyond LIMIT_BYTES, and leftovers (files of an
    entry without its graph, staging folders of killed processes); skip what others hold."""
    entries: dict[str, dict[str, os.stat_result]] = {}
    for path in folder.iterdir():
        try:
            if path.name.startswith("."):
                if path.is_dir() and time.time() - path.stat().st_mtime > STALE_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
                continue
            if path.suffix in SUFFIXES:
                entries.setdefault(path.stem, {})[path.suffix] = path.stat()
        except OSError:  # gone meanwhile
            continue

    def last_used(name: str) -> float:
        graph = entries[name].get(".onnx")
        return graph.st_mtime if graph else float("-inf")

    total = 0
    for name in sorted(entries, key=last_used, reverse=True):
        files = entries[name]
        if ".onnx" in files:
            total += sum(stat.st_size for stat in files.values())
            if total <= LIMIT_BYTES:
                continue
        elif fcntl is None:
            continue  # without locks a leftover cannot be told from an entry being written
        _remove(folder, name)


def _remove(folder: Path, name: str) -> None:
    """Remove an entry unless someone holds it: the graph first, the lock file last."""
    fd = None
    if fcntl is not None:
        try:
            fd = _lock(folder / f"{name}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held by a reader or a writer
            return
    try:
        for suffix in SUFFIXES:
            if suffix != ".lock" or fd is not None:
                (folder / f"{name}{suffix}").unlink(missing_ok=True)
    except OSError:
        pass  # in use (Windows), or gone
    finally:
        if fd is not None:
            os.close(fd)
