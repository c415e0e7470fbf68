"""FileSink: a folder run's heatmaps as PNG and/or NPY files, named as the command line names them.

Where the files go (the `explain` command's rules): for one heatmap, `output` is the PNG (or a
folder to put it in), by default ./<image>_lrp.png; for several, `output` is a folder, by
default ./lrp_out/, mirroring the images' subfolders (photos/cats/a.png -> lrp_out/cats/a_lrp.png),
and names that two images would share are numbered (a_lrp_1.png). `npy` is a file for one
heatmap and a folder for several; given without `output`, only the NPY files are written.
top_k: <image>_top<r>_lrp.png per rank. concepts=K: beside each heatmap its K most relevant
channels' conditional maps (lrp.conditional), <heatmap>_concept<j>.png for the j-th.

How they are written: each image's files go to temporary names and are renamed into place
together (io.files.Outputs), so a run that stops half-way leaves complete files only, and a
rerun with resume=True skips the images whose files all exist. staged=True instead keeps
every file of the run staged until it ends and publishes them together: a failure anywhere
leaves no output at all (nothing to resume from).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..io.files import Outputs, check_writable
from ..io.image import write_heatmap
from .sources import Item

#: the output folder for several heatmaps when neither output nor npy is given
DEFAULT_FOLDER = Path("lrp_out")


def suffixes(top_k: int | None) -> list[str]:
    """The suffix of each rank's files: _lrp, or _top1_lrp, _top2_lrp, ... for top_k."""
    return [f"_top{r}_lrp" for r in range(1, top_k + 1)] if top_k else ["_lrp"]


@dataclass(frozen=True)
class FileSink:
    """PNG (output) and/or NPY (npy) files per heatmap; style, levels, sign, cmap: the picture
    (io.image.render). Frozen and small: it travels to Ray actors, which write the files."""

    output: Path | None = None
    npy: Path | None = None
    style: str = "signed"
    levels: int | None = None
    sign: str = "positive"
    cmap: str | None = None
    resume: bool = True
    staged: bool = False
    concepts: int = 0  # the K most relevant concepts' maps beside each heatmap (an Explainer with a concept layer)
    # set by plan(): the run's ranks, and where files go
    ranks: int = 1
    top_k: int | None = None
    several: bool | None = None
    png_dir: Path | None = None
    npy_dir: Path | None = None

    #: the keys a Parquet sink would want absolute; files keep the paths as given
    absolute = False
    #: pair a lone image (only the Parquet rows need numbers independent of Ray's block cut)
    pair_lone = False

    def __post_init__(self) -> None:
        for name in ("output", "npy"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))

    def plan(self, count: int, top_k: int | None) -> FileSink:
        """The sink for a run of `count` images: one heatmap or several decides what output
        and npy are (a file or a folder), looked at now, before anything is written."""
        ranks = top_k or 1
        several = count * ranks > 1
        output, npy = self.output, self.npy
        png_dir = output if several else (output if output is not None and output.is_dir() else None)
        if several and output is None and npy is None:
            png_dir = DEFAULT_FOLDER
        npy_dir = npy if several or (npy is not None and npy.is_dir()) else None
        return replace(self, ranks=ranks, top_k=top_k, several=several, png_dir=png_dir, npy_dir=npy_dir)

    def destinations(self, item: Item) -> list[tuple[Path | None, Path | None]]:
        """(PNG, NPY) per rank of `item` (None: not written)."""
        assert self.several is not None, "plan() the sink first"
        pairs = []
        for suffix in suffixes(self.top_k):
            name = str(item.name.parent / f"{item.name.name}{suffix}") + (f"_{item.copy}" if item.copy else "")
            if self.png_dir is not None:
                png = self.png_dir / f"{name}.png"
            elif self.output is not None:
                png = self.output
            else:
                png = None if self.npy is not None else Path(f"{Path(name).name}.png")
            pairs.append((png, self.npy_dir / f"{name}.npy" if self.npy_dir is not None else self.npy))
        return pairs

    def concept_destinations(self, item: Item) -> list[list[tuple[Path | None, Path | None]]]:
        """Per rank of `item`, the (PNG, NPY) of each of its K concept maps, beside the heatmap's."""
        return [[tuple(None if p is None else p.with_name(f"{p.stem}_concept{j}{p.suffix}") for p in pair)
                 for j in range(1, self.concepts + 1)] for pair in self.destinations(item)]

    def _all(self, item: Item) -> list[Path]:
        pairs = self.destinations(item) + [pair for rank in self.concept_destinations(item) for pair in rank]
        return [p for pair in pairs for p in pair if p is not None]

    def check(self, items: Sequence[Item]) -> None:
        """Every destination can be written: a one-line error before any work."""
        check_writable(p for item in items for p in self._all(item))

    @property
    def resumes(self) -> bool:
        """Whether a run skips the images whose files all exist (staged runs leave none behind)."""
        return self.resume and not self.staged

    def done(self, item: Item) -> bool:
        """The item's files all exist (a finished image of an earlier run)."""
        return all(p.exists() for p in self._all(item))

    @contextmanager
    def writing(self) -> Iterator[_Writer]:
        """A run's writer; staged: the run's files appear when the block ends, or none."""
        if self.staged:
            with Outputs() as outputs:
                yield _Writer(self, outputs)
        else:
            yield _Writer(self, None)


@dataclass
class _Writer:
    sink: FileSink
    outputs: Outputs | None  # staged: the run's; else one per image

    def tasks(self, items: Sequence[Item], pixels: np.ndarray, result) -> list[Callable[[], list[tuple[str, ...]]]]:
        """One task per image (the backends run them in threads): write its files, return the
        files written per rank. result: the batch's Explanation, `ranks` rows per image."""
        heat, ranks = result.heatmap(), self.sink.ranks
        concepts = result.concepts.heatmap() if self.sink.concepts else np.zeros((len(heat), 0) + heat.shape[1:])
        return [partial(self._write, item, pixels[i], heat[i * ranks:(i + 1) * ranks],
                        concepts[i * ranks:(i + 1) * ranks]) for i, item in enumerate(items)]

    def _write(self, item: Item, pixels: np.ndarray, heats: np.ndarray, concepts: np.ndarray) -> list[tuple[str, ...]]:
        sink = self.sink
        pairs, concept_pairs = sink.destinations(item), sink.concept_destinations(item)

        def write_all(outputs: Outputs) -> None:
            for (png, npy), heat, extra, maps in zip(pairs, heats, concept_pairs, concepts):
                write_heatmap(outputs, pixels, heat, png, npy, sink.style, sink.levels, sink.sign, sink.cmap)
                for (concept_png, concept_npy), concept in zip(extra, maps):
                    write_heatmap(outputs, pixels, concept, concept_png, concept_npy, sink.style, sink.levels,
                                  sink.sign, sink.cmap)

        if self.outputs is not None:
            write_all(self.outputs)
        else:
            with Outputs() as outputs:  # the image's files together, or none of them
                write_all(outputs)
        return [tuple(str(p) for p in pair + tuple(q for extra_pair in extra for q in extra_pair) if p is not None)
                for pair, extra in zip(pairs, concept_pairs)]
