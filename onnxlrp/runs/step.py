"""One batch of a folder run, the same in either backend: explain the pixels, then what it leaves
for the run's summary (a record per explanation and the summable totals); no heatmap is kept."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..lrp.explosion import Explosion
from .sources import Item


@dataclass(frozen=True)
class Explained:
    """One explanation of a run (an image, or one of its top_k ranks), after its outputs are
    written. rank: 0 for the target (or best class), r for the (r+1)-th best. reach: the share
    of the initial relevance at the input; taken: what each family of ops took (lrp.reach),
    None for gradients. written: the files that hold it."""

    key: str
    rank: int
    target: int
    initial: float
    input_sum: float
    reach: float
    taken: tuple[float, ...] | None
    exploded: bool
    written: tuple[str, ...]
    concepts: tuple[tuple[int, float], ...] = ()  # with concept maps: (channel, its share) for each


def explain(explainer, pixels: np.ndarray, target, top_k: int | None, batch_size: int, pair_lone: bool,
            concepts: int = 0):
    """The batch's Explanation, and how many of its rows are the batch's own. pair_lone: a lone
    image is run as a pair (onnxruntime's CPU kernels take another path for a batch of one, a
    few ulp apart): then the numbers do not depend on where a run was cut into batches.
    concepts: each row's K most relevant channels' conditional maps too (0: none)."""
    n = len(pixels) * (top_k or 1)
    x = explainer.images.normalize(np.concatenate([pixels, pixels]) if pair_lone and len(pixels) == 1 else pixels)
    return explainer.explain(x, target, batch_size, top_k, warn=False, concepts=concepts or None), n


@dataclass
class Part:
    """What one batch leaves for the summary: its records, what exploded (positions in the
    batch's rows), and per row the share at the input and what each family took (LRP only)."""

    records: list[Explained]
    explosion: Explosion
    at_input: np.ndarray | None
    taken: np.ndarray | None


def numbers(items: list[Item], result, rows: int, ranks: int) -> Part:
    """The batch's numbers without its arrays (records not yet written: written=())."""
    # per batch, once: each of these sums the whole relevance
    sums, at_input, taken = result.input_sum[:rows], result.reach[:rows], result.taken_shares
    taken = taken[:rows] if taken is not None else None
    explosion = result.explosion
    indices = tuple(i for i in explosion.indices if i < rows)
    if explosion.of != rows:  # a lone image run as a pair: its own rows only
        explosion = Explosion(len(indices), rows, explosion.worst if indices else 0.0,
                              explosion.where if indices else None, indices)
    exploded = set(indices)
    concepts = [()] * rows
    if result.concepts is not None:
        channels, shares = result.concepts.channels, result.concepts.chosen_shares
        concepts = [tuple((int(c), float(s)) for c, s in zip(channels[r], shares[r])) for r in range(rows)]
    records = [Explained(items[r // ranks].key, r % ranks, int(result.targets[r]), float(result.initial[r]),
                         float(sums[r]), float(at_input[r]), None if taken is None else tuple(taken[r].tolist()),
                         r in exploded, (), concepts[r])
               for r in range(rows)]
    return Part(records, explosion, at_input if taken is not None else None, taken)


def written(part: Part, files: list[tuple[str, ...]]) -> Part:
    """The records, with the files each was written to."""
    part.records = [replace(record, written=names) for record, names in zip(part.records, files)]
    return part


@dataclass
class Totals:
    """The run's summary, added up batch by batch: counts, explosions, and per explanation the
    two shares the reach warning takes the median of (8 bytes each, kept; no heatmap is)."""

    images: int = 0
    explosion: Explosion | None = None
    shares: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def add(self, part: Part, images: int) -> None:
        self.images += images
        self.explosion = part.explosion if self.explosion is None else self.explosion + part.explosion
        if part.taken is not None:
            self.shares.append((np.asarray(part.at_input, np.float64), np.asarray(part.taken, np.float64)))
