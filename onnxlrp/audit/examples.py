"""The example images the report draws: a bounded set, never one map per audited image.

The report shows the first ROWS_SHOWN rows of the per-image table with their heatmaps, up to
FINDING_PICTURES images per finding, CLUSTER_PICTURES exemplars per SpRAy cluster and the
DRIFT_PAIRS images whose explanation changed most. The first images are kept as their batches
arrive (the table's rows, and the subset the sanity checks explain again); which others the
report draws is known only once the checks ran, so those few are explained again at the end
(audit.run). What is kept grows with the classes and findings, not with the images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

#: rows of the per-image table the report shows (with a heatmap each); all are in images.csv
ROWS_SHOWN = 200
#: pictures per finding, exemplars per SpRAy cluster, image pairs of the drift section
FINDING_PICTURES = 6
CLUSTER_PICTURES = 3
DRIFT_PAIRS = 6


@dataclass(frozen=True)
class Example:
    """One image as the model saw it, with its heatmap (and the --against model's)."""

    pixels: np.ndarray  # uint8 [H, W, C]
    heatmap: np.ndarray  # [H, W], the map the checks look at
    other: np.ndarray | None = None  # [H, W], the other model's map for the same class


@dataclass(frozen=True)
class Examples:
    """The examples kept, by image index (the audit's order of images)."""

    kept: Mapping[int, Example] = field(default_factory=dict)

    def __contains__(self, index: int) -> bool:
        return index in self.kept

    def __getitem__(self, index: int) -> Example:
        return self.kept[index]

    def __len__(self) -> int:
        return len(self.kept)

    def __iter__(self):
        return iter(self.kept)

    def joined(self, more: Mapping[int, Example]) -> Examples:
        return Examples({**self.kept, **more})

    def leading(self) -> int:
        """How many of the first images are all kept (0, 1, ... without a gap)."""
        count = 0
        while count in self.kept:
            count += 1
        return count

    def first(self, what: str) -> np.ndarray | None:
        """pixels, heatmap or other of the leading images, stacked ([K, ...]); None where there is none."""
        values = [getattr(self.kept[i], what) for i in range(self.leading())]
        return np.stack(values) if values and all(v is not None for v in values) else None

    def nbytes(self) -> int:
        return sum(e.pixels.nbytes + e.heatmap.nbytes + (e.other.nbytes if e.other is not None else 0)
                   for e in self.kept.values())


def kept_first(sanity_images: int) -> int:
    """How many of the first images keep their example as they arrive: the table's rows and the
    sanity checks' subset (explained again with randomised weights and another class)."""
    return max(ROWS_SHOWN, sanity_images)


def drawn(findings: Iterable, strategies: Iterable, drift, names: list[str]) -> set[int]:
    """The images the report draws (report.html): the table's first rows, each finding's first
    pictures, the clusters' exemplars and the drift pairs."""
    index = {name: i for i, name in enumerate(names)}
    wanted = set(range(min(ROWS_SHOWN, len(names))))
    for f in findings:
        wanted.update(index[n] for n in f.images[:FINDING_PICTURES] if n in index)
    for s in strategies:
        for cluster in s.clusters:
            wanted.update(cluster[:CLUSTER_PICTURES])
    if drift is not None:
        wanted.update(drift.most_changed(DRIFT_PAIRS))
    return wanted
