"""Where a folder run's images come from: listed up front, decoded batch by batch.

A source is its items (what to explain, in order) and a decoder (key -> pixels). The items
are names and paths only, a few hundred bytes per image; pixels exist for one batch at a
time, decoded when the run reaches it (or on the Ray actor that explains it).

``ImageFiles`` walks files and folders as every command does (io.preprocessing.image_sources:
recursive, sorted, hidden names and the masks folder skipped). ``Pixels`` makes images in
memory from their keys (synthetic data, a camera, a database), decoded as lazily.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Protocol, Sequence, overload

import numpy as np

from ..errors import DataError, ImageError
from ..io.preprocessing import ImageReader, check_images, image_sources


@dataclass(frozen=True)
class Item:
    """One image of a run. key: what the run calls it and decodes it by (a file's path as
    given; the result lines and Parquet's path column hold it). name: where its outputs go,
    relative to the output folder, without a suffix (an argument's subfolders mirrored:
    photos/cats/a.png -> cats/a). copy: how many earlier images of the run share that name
    (their outputs are numbered: a_lrp_1.png), so two images never overwrite each other."""

    key: str
    name: PurePosixPath
    copy: int = 0


class Decoder(Protocol):
    """Keys -> uint8 images [N, H, W, C] as `images` (the model's reader) sees them. Small and
    picklable: Ray actors decode their own batches."""

    def __call__(self, keys: Sequence[str], images: ImageReader) -> np.ndarray: ...


class Source(Protocol):
    items: Sequence[Item]
    decoder: Decoder

    def check(self) -> None:
        """Every image decodes (a one-line error for the first that does not), pixels discarded."""


@dataclass(frozen=True)
class _ReadFiles:
    """Image files, read by the model's own reader (scaled, centre-cropped)."""

    def __call__(self, keys: Sequence[str], images: ImageReader) -> np.ndarray:
        return images.read([Path(k) for k in keys])


@dataclass(frozen=True)
class ImageFiles:
    """Image files and folders (folders searched recursively, sorted). keys: each file's path
    as the argument named it (photos/cats/a.png), or absolute=True its absolute path (what
    Parquet rows hold); dedupe=True drops a file named twice."""

    items: tuple[Item, ...]
    decoder: Decoder = _ReadFiles()

    @classmethod
    def of(cls, paths: str | os.PathLike | Sequence[str | os.PathLike], *, absolute: bool = False,
           dedupe: bool = False) -> ImageFiles:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        found = image_sources(list(paths))  # a missing file, an empty folder: one line
        if absolute:
            found = [(Path(os.path.abspath(path)), rel) for path, rel in found]
        if dedupe:
            found = list({str(path): (path, rel) for path, rel in found}.values())
        seen: Counter[str] = Counter()
        items = []
        for path, rel in found:
            name = rel.parent / rel.stem
            items.append(Item(str(path), name, seen[str(name)]))
            seen[str(name)] += 1
        return cls(tuple(items))

    @property
    def files(self) -> list[Path]:
        return [Path(item.key) for item in self.items]

    def check(self) -> None:
        check_images(self.files)


class _Numbered(Sequence[Item]):
    """Items img00000, img00001, ... made on demand: a source of a million images holds none."""

    def __init__(self, count: int, prefix: str):
        self.count, self.prefix, self.digits = count, prefix, len(str(max(count - 1, 0)))

    def __len__(self) -> int:
        return self.count

    @overload
    def __getitem__(self, index: int) -> Item: ...
    @overload
    def __getitem__(self, index: slice) -> list[Item]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if not -self.count <= index < self.count:
            raise IndexError(index)
        key = f"{self.prefix}{index % self.count:0{self.digits}d}"
        return Item(key, PurePosixPath(key))

    def __iter__(self) -> Iterator[Item]:
        return (self[i] for i in range(self.count))


@dataclass(frozen=True)
class _Made:
    make: Callable[[str], np.ndarray]

    def __call__(self, keys: Sequence[str], images: ImageReader) -> np.ndarray:
        pixels = np.stack([np.asarray(self.make(k), dtype=np.uint8) for k in keys])
        expected = (images.height, images.width, images.channels)
        if pixels.shape[1:] != expected:
            raise ImageError(f"{keys[0]}: made an image of shape {list(pixels.shape[1:])}; the model reads "
                               f"uint8 [{', '.join(map(str, expected))}]")
        return pixels


@dataclass(frozen=True)
class Pixels:
    """Images made in memory: make(key) -> uint8 [H, W, C] at the model's input size, called
    for a batch's keys when the run reaches it. keys: the images' names (outputs are named
    after them), or a count (img0000, img0001, ...: nothing is held per image)."""

    items: Sequence[Item]
    decoder: Decoder

    @classmethod
    def of(cls, keys: Sequence[str] | int, make: Callable[[str], np.ndarray], prefix: str = "img") -> Pixels:
        if isinstance(keys, int):
            return cls(_Numbered(keys, prefix), _Made(make))
        names = [str(k) for k in keys]
        if len(set(names)) != len(names):
            raise DataError("Pixels: two images share a key")
        return cls(tuple(Item(k, PurePosixPath(k)) for k in names), _Made(make))

    def check(self) -> None:
        """Made images have nothing to check before the run."""


def as_source(images, *, absolute: bool = False, dedupe: bool = False) -> Source:
    """A Source as given, or ImageFiles of paths."""
    if hasattr(images, "items") and hasattr(images, "decoder"):
        return images
    return ImageFiles.of(images, absolute=absolute, dedupe=dedupe)
