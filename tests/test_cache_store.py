"""onnxlrp.runtime.cache on its own: a cache folder that cannot be written (one warning, then no cache),
entries that cannot be read (misses), processes that store the same entry at once, and
pruning that leaves alone what another process is reading.

Each test gets its own cache folder; other processes are real ones (subprocesses running
this file's `_child`), since flock locks and renames only show their worth across processes.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

if __name__ == "__main__":  # a child process of these tests: this checkout's onnxlrp
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlrp.runtime import cache
from onnxlrp.errors import OnnxLrpWarning

pytestmark = pytest.mark.skipif(cache.fcntl is None, reason="entries are locked with flock (fcntl)")

SUMMARY = json.dumps({"preset": "tiny", "merges": []})
ENTRY = "0123456789abcdef0123456789abcdef"


def tiny_model(seed: int = 0, channels: int = 16) -> onnx.ModelProto:
    """Conv + Relu; a Conv weight over 1024 bytes (16 channels: 1728) goes to external data,
    the bias stays inline."""
    rng = np.random.RandomState(seed)
    weight = numpy_helper.from_array(rng.randn(channels, 3, 3, 3).astype(np.float32), "weight")
    bias = numpy_helper.from_array(rng.randn(channels).astype(np.float32), "bias")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "weight", "bias"], ["z"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["z"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


INPUT = np.random.RandomState(1).randn(1, 3, 8, 8).astype(np.float32)


def run(model: str | Path | bytes) -> np.ndarray:
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": INPUT})[0]


def check_entry(graph: Path, reference: onnx.ModelProto) -> None:
    """The entry at `graph` loads (onnx and onnxruntime) and is the model that was stored."""
    loaded = onnx.load(str(graph))
    assert list(loaded.graph.node) == list(reference.graph.node)
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in loaded.graph.initializer} == \
        {t.name: numpy_helper.to_array(t).tobytes() for t in reference.graph.initializer}
    np.testing.assert_array_equal(run(graph), run(reference.SerializeToString()))


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """A cache folder of this test's own, and the once-per-process warning not yet given."""
    monkeypatch.setenv("ONNXLRP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_warned", False)
    return tmp_path / "cache"


def stores(count: int, entry: str = ENTRY) -> tuple[list, list[warnings.WarningMessage]]:
    """`count` stores of the tiny model: their results and the warnings they gave."""
    model = tiny_model()
    before = model.SerializeToString()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [cache.store(entry, model, SUMMARY) for _ in range(count)]
    assert model.SerializeToString() == before  # the caller can still run it from memory
    return results, [w for w in caught if issubclass(w.category, OnnxLrpWarning)]


def assert_one_unwritable_warning(caught, folder: Path) -> None:
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert message.startswith(f"cache folder {folder} is not writable (")
    assert message.endswith("); running without the cache") and "\n" not in message


# -- entries ------------------------------------------------------------------------------

def test_store_then_lookup(folder):
    model = tiny_model()
    (graph,), caught = stores(1)
    assert not caught and graph == folder / f"{ENTRY}.onnx"
    assert sorted(p.name for p in folder.iterdir()) == [f"{ENTRY}.{s}" for s in ("data", "json", "lock", "onnx")]
    assert (folder / f"{ENTRY}.data").stat().st_size == 16 * 3 * 3 * 3 * 4  # the weight, apart
    assert cache.lookup(ENTRY) == (graph, SUMMARY)
    with cache.reading(graph):
        check_entry(graph, model)
    assert cache.lookup("f" * 32) is None


def test_tiny_model_entry_is_complete(folder):
    """A model whose weights all stay inline still gets a (empty) weights file: an entry is
    complete when all its files are there."""
    model = tiny_model(channels=4)  # a 432-byte weight
    graph = cache.store(ENTRY, model, SUMMARY)
    assert (folder / f"{ENTRY}.data").stat().st_size == 0
    assert cache.lookup(ENTRY) == (graph, SUMMARY)
    check_entry(graph, model)


def test_store_renames_the_graph_last(folder, monkeypatch):
    """At every step of a store, lookup() finds nothing or the whole entry."""
    replace, steps = os.replace, []

    def spy(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        steps.append((Path(dst).suffix, cache.lookup(ENTRY) is not None))

    monkeypatch.setattr(os, "replace", spy)
    cache.store(ENTRY, tiny_model(), SUMMARY)
    assert steps == [(".json", False), (".data", False), (".onnx", True)]


@pytest.mark.parametrize("damage", ["no graph", "no weights", "no summary", "summary not JSON",
                                    "summary not UTF-8", "summary is a folder", "graph is a folder"])
def test_damaged_entries_are_misses(folder, damage):
    cache.store(ENTRY, tiny_model(), SUMMARY)
    graph, data, summary = (folder / f"{ENTRY}{s}" for s in (".onnx", ".data", ".json"))
    if damage == "no graph":
        graph.unlink()
    elif damage == "no weights":
        data.unlink()
    elif damage == "no summary":
        summary.unlink()
    elif damage == "summary not JSON":
        summary.write_text('{"preset": ')
    elif damage == "summary not UTF-8":
        summary.write_bytes(b'{"preset": "\xff"}')
    elif damage == "summary is a folder":
        summary.unlink()
        summary.mkdir()
    elif damage == "graph is a folder":
        graph.unlink()
        graph.mkdir()
    assert cache.lookup(ENTRY) is None


def test_key_follows_model_content_options_and_code(tmp_path, monkeypatch):
    model = tmp_path / "m.onnx"
    onnx.save(tiny_model(), str(model))
    first = cache.key(model, "options-a")
    assert cache.key(str(model), "options-a") == first and len(first) == 32
    assert cache.key(model, "options-b") != first
    onnx.save(tiny_model(seed=1), str(model))
    assert cache.key(model, "options-a") != first
    onnx.save(tiny_model(), str(model))
    monkeypatch.setattr(cache, "_code_digest", lambda: "other code")
    assert cache.key(model, "options-a") != first


def test_code_digest_covers_subpackages(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.py").write_text("A = 1\n")
    (root / "sub" / "deeper" / "b.py").write_text("B = 1\n")
    digests = [cache._tree_digest(root)]
    (root / "sub" / "deeper" / "b.py").write_text("B = 2\n")
    digests.append(cache._tree_digest(root))
    (root / "sub" / "c.py").write_text("")
    digests.append(cache._tree_digest(root))
    (root / "sub" / "c.py").rename(root / "sub" / "d.py")
    digests.append(cache._tree_digest(root))
    (root / "sub" / "__pycache__").mkdir()
    (root / "sub" / "__pycache__" / "d.cpython-311.pyc").write_bytes(b"\0")
    (root / "notes.txt").write_text("not code")
    assert cache._tree_digest(root) == digests[-1]
    assert len(set(digests)) == len(digests)
    package = Path(cache.__file__).parent.parent  # the code digest is the whole package's (onnxlrp/), with onnxruntime's version
    expected = hashlib.sha256(f"{ort.__version__}|{cache._tree_digest(package)}".encode()).hexdigest()
    assert cache._code_digest() == expected


# -- a cache folder that cannot be written ----------------------------------------------------

def test_cache_below_a_regular_file(tmp_path, monkeypatch):
    """mkdir fails there, for root too: every store gives None, one warning in all."""
    (tmp_path / "file").write_text("not a folder")
    folder = tmp_path / "file" / "cache"
    monkeypatch.setenv("ONNXLRP_CACHE", str(folder))
    monkeypatch.setattr(cache, "_warned", False)
    results, caught = stores(3)
    assert results == [None, None, None]
    assert_one_unwritable_warning(caught, folder)
    assert cache.lookup(ENTRY) is None
    with cache.reading(folder / f"{ENTRY}.onnx"):
        pass
    _, caught = stores(1, entry="f" * 32)  # another entry: still no second warning
    assert not caught


def test_immutable_cache_folder(folder):
    """A cache made immutable, folder and files (chattr +i: root cannot change it either), as a
    read-only file system would be: entries there are still served, without a lock or a new
    access time; new ones are not stored, with one warning."""
    model = tiny_model()
    graph = cache.store(ENTRY, model, SUMMARY)
    (folder / f"{ENTRY}.lock").unlink()  # reading() cannot make it in an immutable folder
    if shutil.which("chattr") is None or subprocess.run(["chattr", "-R", "+i", str(folder)],
                                                        capture_output=True).returncode:
        pytest.skip("chattr +i does not work here")
    try:
        with pytest.raises(OSError):
            (folder / "probe").write_text("")  # the folder is really unwritable
        with pytest.raises(OSError):
            os.utime(graph)  # and so are its files
        assert cache.lookup(ENTRY) == (graph, SUMMARY)
        with cache.reading(graph):
            check_entry(graph, model)
        results, caught = stores(3, entry="f" * 32)
        assert results == [None, None, None]
        assert_one_unwritable_warning(caught, folder)
        assert "Operation not permitted" in str(caught[0].message)
        assert sorted(p.name for p in folder.iterdir()) == [f"{ENTRY}.{s}" for s in ("data", "json", "onnx")]
        _, caught = stores(1)  # the entry that is there: still no second warning
        assert not caught
    finally:
        subprocess.run(["chattr", "-R", "-i", str(folder)], check=True)


def test_store_failing_late_leaves_model_and_folder_clean(folder, monkeypatch):
    """A disk that fills up while the graph is renamed into place: None, the model the caller
    passed still whole, no entry and no staging folder left."""
    replace = os.replace

    def full(src, dst, *args, **kwargs):
        if str(dst).endswith(".onnx"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full)
    results, caught = stores(2)
    assert results == [None, None]
    assert_one_unwritable_warning(caught, folder)
    assert "No space left on device" in str(caught[0].message)
    assert cache.lookup(ENTRY) is None
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_one_warning_per_process(tmp_path):
    """A fresh process storing many times into an unwritable cache warns once."""
    (tmp_path / "file").write_text("")
    out = _spawn("warn", 5, cache=tmp_path / "file" / "cache").communicate(timeout=120)[0]
    assert json.loads(out.strip().splitlines()[-1]) == {"results": [None] * 5, "warnings": 1}


# -- processes at once -------------------------------------------------------------------------

def _spawn(mode: str, *args, cache: Path) -> subprocess.Popen:
    env = dict(os.environ, ONNXLRP_CACHE=str(cache), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, __file__, mode, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError(path)
        time.sleep(0.01)


def _finish(process: subprocess.Popen, timeout: float = 300) -> str:
    out = process.communicate(timeout=timeout)[0]
    assert process.returncode == 0, out
    return out


def test_concurrent_stores_of_one_entry(folder, tmp_path):
    """Two processes store the same entry at once, many times, while a third keeps loading it
    whenever lookup() finds it: every store succeeds, every load is whole, and so is the end."""
    folder.mkdir()
    go, stop = tmp_path / "go", tmp_path / "stop"
    ready = [tmp_path / f"ready{i}" for i in range(3)]
    writers = [_spawn("store", ready[i], go, 150, cache=folder) for i in range(2)]
    reader = _spawn("read", ready[2], go, stop, cache=folder)
    try:
        for path in ready:
            _wait_for(path)
        go.touch()  # all three start together
        for writer in writers:
            assert _finish(writer).strip().endswith("stored 150")
    finally:
        stop.touch()
    out = _finish(reader)
    assert int(out.strip().split()[-1]) > 0, out  # it did find and load the entry, repeatedly
    graph, summary = cache.lookup(ENTRY)
    assert summary == SUMMARY
    check_entry(graph, tiny_model())
    assert sorted(p.name for p in folder.iterdir()) == [f"{ENTRY}.{s}" for s in ("data", "json", "lock", "onnx")]


# -- pruning ---------------------------------------------------------------------------------------

def _age(folder: Path, entry: str, seconds: float) -> None:
    stamp = time.time() - seconds
    os.utime(folder / f"{entry}.onnx", (stamp, stamp))


def test_prune_spares_an_entry_another_process_reads(folder, tmp_path, monkeypatch):
    held, unheld, new = "a" * 32, "b" * 32, "c" * 32
    for entry, age in ((held, 300), (unheld, 200)):
        cache.store(entry, tiny_model(), SUMMARY)
        _age(folder, entry, age)
    holding, release = tmp_path / "holding", tmp_path / "release"
    holder = _spawn("hold", folder / f"{held}.onnx", holding, release, cache=folder)
    try:
        _wait_for(holding)
        monkeypatch.setattr(cache, "LIMIT_BYTES", 1)  # everything is over the limit
        graph = cache.store(new, tiny_model(), SUMMARY)
        assert cache.lookup(held) is not None  # held elsewhere: kept, and whole
        check_entry(folder / f"{held}.onnx", tiny_model())
        assert not list(folder.glob(f"{unheld}.*"))  # older than `new`, not held: gone
        assert cache.lookup(new) == (graph, SUMMARY)  # its own store held it
    finally:
        release.touch()
    _finish(holder)
    cache.store(new, tiny_model(), SUMMARY)  # now nobody holds `held`
    assert not list(folder.glob(f"{held}.*"))


def test_prune_spares_an_entry_read_in_this_process(folder, monkeypatch):
    """flock locks belong to an open file description: reading() here conflicts with the
    pruner's own open() here as it would in another process."""
    held, unheld = "a" * 32, "b" * 32
    for entry in (held, unheld):
        cache.store(entry, tiny_model(), SUMMARY)
        _age(folder, entry, 100)
    monkeypatch.setattr(cache, "LIMIT_BYTES", 1)
    with cache.reading(folder / f"{held}.onnx"):
        cache._prune(folder)
        assert cache.lookup(held) is not None
        assert cache.lookup(unheld) is None and not list(folder.glob(f"{unheld}.*"))
    cache._prune(folder)
    assert not list(folder.glob(f"{held}.*"))


def test_prune_keeps_the_newest_within_the_limit_and_removes_the_graph_first(folder, monkeypatch):
    entries = [c * 32 for c in "abcd"]
    for age, entry in enumerate(entries):
        cache.store(entry, tiny_model(), SUMMARY)
        _age(folder, entry, 100 - age)  # "d" is the newest
    size = sum(p.stat().st_size for p in folder.glob(f"{entries[0]}.*"))
    removed = []
    unlink = Path.unlink

    def spy(self, *args, **kwargs):
        removed.append(self.name)
        return unlink(self, *args, **kwargs)

    monkeypatch.setattr(cache, "LIMIT_BYTES", 2 * size)
    monkeypatch.setattr(Path, "unlink", spy)
    cache._prune(folder)
    assert [e for e in entries if cache.lookup(e)] == entries[2:]
    assert removed == [f"{e}{s}" for e in entries[1::-1] for s in (".onnx", ".data", ".json", ".lock")]


def test_prune_removes_leftovers_but_not_an_entry_being_written(folder, monkeypatch):
    """Files of an entry without its graph (a killed store or prune) go; so do staging folders
    a day old. An entry whose store holds it is not a leftover, though its graph is missing."""
    cache.store(ENTRY, tiny_model(), SUMMARY)
    (folder / f"{ENTRY}.onnx").unlink()
    writing = "e" * 32
    (folder / f"{writing}.json").write_text(SUMMARY)
    stale, fresh = folder / ".stale.x", folder / ".fresh.y"
    for staging in (stale, fresh):
        staging.mkdir()
        (staging / "x.data").write_bytes(b"\0" * 10)
    os.utime(stale, (time.time() - 2 * cache.STALE_SECONDS,) * 2)
    with cache._holding(folder / f"{writing}.lock"):
        cache._prune(folder)
    assert sorted(p.name for p in folder.iterdir()) == [".fresh.y", f"{writing}.json", f"{writing}.lock"]


def test_a_lock_taken_on_a_removed_lock_file_is_taken_again(folder):
    """A pruner removes an entry's lock file while holding it; whoever was waiting for that lock
    then holds a file that is no longer there, and must lock the one at the path instead."""
    folder.mkdir()
    path = folder / f"{ENTRY}.lock"
    pruner = cache._lock(path, cache.fcntl.LOCK_EX)
    entered, leave = threading.Event(), threading.Event()

    def read():
        with cache.reading(folder / f"{ENTRY}.onnx"):
            entered.set()
            leave.wait(30)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        time.sleep(0.3)  # the reader waits in flock on the file the pruner holds
        assert not entered.is_set()
        path.unlink()
        os.close(pruner)
        assert entered.wait(30)
        with pytest.raises(BlockingIOError):  # the reader holds the lock file that is at the path
            os.close(cache._lock(path, cache.fcntl.LOCK_EX | cache.fcntl.LOCK_NB))
    finally:
        leave.set()
        reader.join()


# -- the other processes ---------------------------------------------------------------------------

def _child(mode: str, *args: str) -> None:
    if mode == "warn":
        count = int(args[0])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = [cache.store(ENTRY, tiny_model(), SUMMARY) for _ in range(count)]
        print(json.dumps({"results": results,
                          "warnings": sum(issubclass(w.category, OnnxLrpWarning) for w in caught)}))
    elif mode == "store":
        ready, go, count = Path(args[0]), Path(args[1]), int(args[2])
        model = tiny_model()
        ready.touch()
        _wait_for(go)
        with warnings.catch_warnings():
            warnings.simplefilter("error", OnnxLrpWarning)
            for _ in range(count):
                graph = cache.store(ENTRY, model, SUMMARY)
                assert graph is not None
        print("stored", count)
    elif mode == "read":
        ready, go, stop = map(Path, args)
        model = tiny_model()
        ready.touch()
        _wait_for(go)
        loads = 0
        while not stop.exists():
            found = cache.lookup(ENTRY)
            if found:
                assert found[1] == SUMMARY
                with cache.reading(found[0]):
                    check_entry(found[0], model)
                loads += 1
        print("loaded", loads)
    elif mode == "hold":
        graph, holding, release = map(Path, args)
        with cache.reading(graph):
            holding.touch()
            _wait_for(release)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    _child(*sys.argv[1:])
