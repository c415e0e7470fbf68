"""Writing output files: never half-written, and all of a command's outputs or none.

Each file goes to a temporary name beside its destination and is renamed into place:
no reader ever sees half a file. A command that writes many files (a folder of heatmaps)
stages them all and renames them together at the end (:class:`Outputs`); if anything
fails on the way, the staged files and the folders made for them are removed. Before any
work starts, :func:`check_writable` makes sure every destination can be written.
"""
from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable

from ..errors import OutputError


_UMASK_LOCK = threading.Lock()


def _publish(tmp: str, path: Path) -> None:
    with _UMASK_LOCK:  # reading the umask means setting it: one thread at a time
        umask = os.umask(0)
        os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; outputs get the usual mode
    os.replace(tmp, path)


def write_atomic(path: Path, write: Callable[[str], object]) -> None:
    """Write one file through a temporary file and rename: no half-written output, ever."""
    with Outputs() as outputs:
        outputs.write(path, write)


def check_writable(paths: Iterable[Path]) -> None:
    """A one-line error for the first destination that cannot be written, before any work.

    The folder (or its nearest existing ancestor, where folders are still to be made) must
    take a new file; the probe is a real file, since permission bits do not tell a read-only
    file system, an immutable folder or a full disk (and root ignores them)."""
    probed: set[Path] = set()
    for path in map(Path, paths):
        if path.is_dir():
            raise OutputError(f"{path}: is a folder; expected a file name here")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        folder = folder.resolve()
        if folder in probed:
            continue
        if not folder.is_dir():
            raise OutputError(f"{path}: cannot write there ({folder} is not a folder)")
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise OutputError(f"{path}: cannot write there ({exc.strerror or type(exc).__name__})") from None
        probed.add(folder)


class Outputs:
    """A command's output files, staged and then published together.

    >>> with Outputs() as outputs:
    ...     outputs.write(Path("out/a.png"), lambda tmp: picture.save(tmp, format="PNG"))
    ...     outputs.write(Path("out/a.npy"), save_npy)
    (both files appear at the end of the block; neither if it raises)

    write() may be called from several threads."""

    def __init__(self) -> None:
        self._staged: list[tuple[str, Path]] = []
        self._made: list[Path] = []  # folders made for the outputs, to remove on failure
        self._lock = threading.Lock()

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()

    def _folder(self, folder: Path) -> None:
        with self._lock:
            missing = []
            while not folder.exists():
                missing.append(folder)
                folder = folder.parent
            for made in reversed(missing):
                made.mkdir(exist_ok=True)
                self._made.append(made)

    def write(self, path: Path, write: Callable[[str], object]) -> None:
        path = Path(path)
        self._folder(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        with self._lock:
            self._staged.append((tmp, path))
        write(tmp)

    def commit(self) -> None:
        try:
            for tmp, path in self._staged:
                _publish(tmp, path)
        except BaseException:
            self.discard()
            raise
        self._staged.clear()

    def discard(self) -> None:
        for tmp, _ in self._staged:
            Path(tmp).unlink(missing_ok=True)
        self._staged.clear()
        for folder in reversed(self._made):
            try:
                folder.rmdir()  # only if empty: never what the user had there
            except OSError:
                pass
        self._made.clear()
