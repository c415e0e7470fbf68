"""The atlas's first pass: every image explained once with the concept layer probed, folded as
it comes into what the atlas needs (per channel its best images, per class the channels'
relevance shares); in this process, or on Ray actors (runtime.cluster), with the same result."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..explainer import Explainer, Portable
from ..explanation import channel_shares
from ..options import Runtime
from ..runs.sources import Decoder, Source
from ..runtime.cluster import connected, stream_batches


class Top:
    """Per channel, the `size` largest values seen so far and the images they came from; ties
    go to the earlier image, so the result does not depend on the order batches are folded."""

    def __init__(self, channels: int, size: int):
        self.values = np.full((channels, size), -np.inf)
        self.index = np.full((channels, size), np.iinfo(np.int64).max, dtype=np.int64)

    def add(self, values: np.ndarray, indices: np.ndarray) -> None:
        """values [B, C] of the images `indices` [B]."""
        size = self.values.shape[1]
        v = np.concatenate([self.values, values.T.astype(np.float64)], axis=1)
        i = np.concatenate([self.index, np.broadcast_to(indices, (len(v), len(indices)))], axis=1)
        order = np.lexsort((i, -v), axis=1)[:, :size]  # by value, then by image
        self.values, self.index = np.take_along_axis(v, order, 1), np.take_along_axis(i, order, 1)

    def best(self, channel: int) -> list[tuple[int, float]]:
        """(image index, value) of the channel's best images with a positive value, best first."""
        return [(int(i), float(v)) for i, v in zip(self.index[channel], self.values[channel]) if v > 0]


@dataclass
class Scanned:
    targets: np.ndarray  # [N] int64: the class each image was explained as
    by_relevance: Top
    by_activation: Top
    share_sums: np.ndarray  # [classes, C] the channels' relevance shares summed over each class's images
    counts: np.ndarray  # [classes] images per class

    def add(self, first: int, targets: np.ndarray, relevance: np.ndarray, activation: np.ndarray) -> None:
        indices = np.arange(first, first + len(targets))
        self.targets[indices] = targets
        self.by_relevance.add(relevance, indices)
        self.by_activation.add(activation, indices)
        np.add.at(self.share_sums, targets, channel_shares(relevance))
        np.add.at(self.counts, targets, 1)


def channel_totals(probe: tuple[np.ndarray, np.ndarray], axis: int) -> tuple[np.ndarray, np.ndarray]:
    """A probed layer's (activation, relevance), channel axis `axis` -> per channel [N, C] its
    relevance total (float64) and its largest activation (what relevance maximisation ranks by)."""
    activation, relevance = probe
    spatial = tuple(a for a in range(1, relevance.ndim) if a != axis)
    return relevance.sum(axis=spatial, dtype=np.float64), activation.max(axis=spatial) if spatial else activation


def channel_numbers(explainer: Explainer, pixels: np.ndarray, axis: int):
    """One batch: (targets, per channel relevance totals [B, C], largest activations [B, C])."""
    result = explainer.explain(explainer.images.normalize(pixels), warn=False)
    return (result.targets, *channel_totals(result.probe, axis))


@dataclass(frozen=True)
class _ScanJob:
    """A batch of images scanned on a Ray actor (runtime.cluster's Job)."""

    explainer: Portable
    decoder: Decoder
    axis: int

    def open(self, device: str, threads: int | None) -> Callable:
        explainer = self.explainer.open(device, threads)

        def run(keys: list[str]):
            return channel_numbers(explainer, self.decoder(keys, explainer.images), self.axis)

        return run


def scan(explainer: Explainer, source: Source, axis: int, channels: int, size: int, runtime: Runtime,
         advance: Callable[[int], None]) -> Scanned:
    """Every image of `source`, in batches of runtime.batch_size, through `explainer` (its probe:
    the layer, `channels` channels on `axis`), keeping `size` references per channel;
    advance(done) as they finish."""
    items = source.items
    classes = explainer.num_classes
    scanned = Scanned(np.zeros(len(items), np.int64), Top(channels, size), Top(channels, size),
                      np.zeros((classes, channels)), np.zeros(classes, np.int64))
    starts = list(range(0, len(items), runtime.batch_size))
    batches = [[item.key for item in items[s:s + runtime.batch_size]] for s in starts]
    done = [0]

    def fold(k: int, numbers) -> None:
        scanned.add(starts[k], *numbers)
        done[0] += len(batches[k])
        advance(done[0])

    if runtime.cluster is not None:
        with connected(runtime.cluster) as ray:
            job = _ScanJob(explainer.portable().stored(ray), source.decoder, axis)
            stream_batches(job, batches, runtime.cluster, runtime.device, fold)
        return scanned
    with ThreadPoolExecutor(max_workers=1) as pool:  # the next batch decodes while this one runs
        upcoming = pool.submit(source.decoder, batches[0], explainer.images) if batches else None
        for k in range(len(batches)):
            pixels = upcoming.result()
            if k + 1 < len(batches):
                upcoming = pool.submit(source.decoder, batches[k + 1], explainer.images)
            fold(k, channel_numbers(explainer, pixels, axis))
    return scanned

