"""Relevance maximisation over a folder: for every channel of a layer, the images that show it
most, and per class the channels its predictions rest on (Achtibat et al. 2023, CRP).

Two passes. The scan explains every image once (the relevance pass with the layer probed) and
keeps, per channel, only its best images so far, by relevance and by activation, and per class
the sum of each channel's relevance shares: memory grows with channels x references, not with
the folder. Then the reference images of the channels shown are explained again, each under
the conditions of its channels (lrp.conditional), and cropped to where each channel looks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import SettingError
from ..explainer import Explainer
from ..ir.digest import model_digest
from ..options import Options, Runtime, resolve
from ..runs.sources import Source, as_source
from . import scan as scanning


@dataclass(frozen=True)
class Reference:
    """One reference image of a concept: its key, the channel's value in it (relevance, or
    largest activation), the class explained, and where the channel's conditional map
    concentrates (box: top, left, bottom, right, exclusive), with that part of the image and
    of the map (the report's pictures)."""

    image: str
    value: float
    target: int
    box: tuple[int, int, int, int]
    pixels: np.ndarray = field(repr=False, compare=False)  # uint8 [h, w, C]: the crop
    heat: np.ndarray = field(repr=False, compare=False)  # float32 [h, w]: the conditional map there

    def to_dict(self) -> dict:
        return {"image": self.image, "value": self.value, "class": self.target, "box": list(self.box)}


@dataclass(frozen=True)
class Concept:
    """A channel of the layer and its reference images: by relevance (the images whose
    predictions it carries most) and by activation (where it fires most)."""

    channel: int
    by_relevance: tuple[Reference, ...]
    by_activation: tuple[Reference, ...]

    def to_dict(self) -> dict:
        return {"channel": self.channel, "by_relevance": [r.to_dict() for r in self.by_relevance],
                "by_activation": [r.to_dict() for r in self.by_activation]}


@dataclass(frozen=True)
class ClassConcepts:
    """A class's top concepts: (channel, mean relevance share) over the images explained as it."""

    target: int
    name: str
    images: int
    channels: tuple[tuple[int, float], ...]

    def to_dict(self) -> dict:
        return {"class": self.target, "name": self.name, "images": self.images,
                "concepts": [{"channel": c, "share": s} for c, s in self.channels]}


@dataclass
class Atlas:
    """What atlas() found: the layer, per class its top concepts, and each shown concept's
    reference images. shares: [classes, C] every channel's mean share per class (NaN for a
    class no image was explained as)."""

    model: str
    sha256: str
    preset: str
    layer: str
    channels: int
    images: int
    classes: list[ClassConcepts]
    concepts: dict[int, Concept]
    shares: np.ndarray
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"model": self.model, "sha256": self.sha256, "preset": self.preset, "layer": self.layer,
                "channels": self.channels, "images": self.images, "classes": [c.to_dict() for c in self.classes],
                "concepts": {str(c): concept.to_dict() for c, concept in sorted(self.concepts.items())},
                "seconds": self.seconds}


def atlas(model: str | Path, images: Any, *, layer: str = "last", per_class: int = 5, references: int = 6,
          class_names: Sequence[str] | None = None, options: Options | None = None, runtime: Runtime | None = None,
          progress: Callable[[int, int], None] | None = None, **settings: Any) -> Atlas:
    """The concept atlas of `model`'s layer over `images` (files and folders, or a runs.sources
    source): per class, the `per_class` channels with the largest mean relevance share over
    the images explained as that class (each image's top-1), and for each of those channels its
    `references` best images by relevance and by activation, with conditional maps cropped to
    where the channel looks. options, runtime, settings: as Explainer's (runtime.cluster: the
    scan runs on Ray actors). progress(done, total): images scanned and references explained."""
    start = time.perf_counter()
    if per_class < 1 or references < 1:
        raise SettingError("per_class and references must be at least 1")
    options, runtime = resolve(options, runtime, settings)
    if options.heatmap.needs_layer:
        raise SettingError("the atlas draws pixel maps of each concept: leave the heatmap at 'pixel'")
    here = runtime if runtime.cluster is None else Runtime(device="cpu", threads=1, cache=runtime.cache)
    conditional = Explainer(model, replace(options, concept_layer=layer), here)
    summary = conditional.summary
    probe = Explainer(model, replace(options, probe=summary.concept_layer), here)
    source: Source = as_source(images)
    items = source.items
    total = [len(items)]
    if progress is not None:
        progress(0, total[0])
    scanned = scanning.scan(probe, source, summary.concept_axis, summary.concept_channels, references, runtime,
                            lambda done: progress(done, total[0]) if progress else None)
    names = list(class_names) if class_names is not None else [str(k) for k in range(summary.num_classes)]
    if len(names) != summary.num_classes:
        raise SettingError(f"{len(names)} class names for a model of {summary.num_classes} classes")
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = scanned.share_sums / scanned.counts[:, None]
    classes = []
    for k in range(summary.num_classes):
        if scanned.counts[k]:
            best = np.argsort(-shares[k], kind="stable")[:per_class]
            classes.append(ClassConcepts(k, names[k], int(scanned.counts[k]),
                                         tuple((int(c), float(shares[k, c])) for c in best)))
    shown = sorted({c for entry in classes for c, _ in entry.channels})
    wanted = {c: (scanned.by_relevance.best(c), scanned.by_activation.best(c)) for c in shown}
    total[0] += len({i for lists in wanted.values() for picked in lists for i, _ in picked})
    def read(i: int) -> tuple[str, np.ndarray]:
        return items[i].key, source.decoder([items[i].key], conditional.images)

    refs = explain_references(conditional, read, scanned.targets, wanted,
                              lambda done: progress(len(items) + done, total[0]) if progress else None)
    concepts = {c: Concept(c, tuple(refs[c, i, "r"] for i, _ in wanted[c][0]),
                           tuple(refs[c, i, "a"] for i, _ in wanted[c][1])) for c in shown}
    return Atlas(str(model), model_digest(Path(model)), options.preset.name, summary.concept_layer,
                 summary.concept_channels, len(items), classes, concepts, shares, time.perf_counter() - start)


def explain_references(explainer: Explainer, read: Callable[[int], tuple[str, np.ndarray]], targets: np.ndarray,
               wanted: dict[int, tuple[list, list]], advance: Callable[[int], None] | None = None) -> dict:
    """Each reference image explained once under the conditions of all its channels (for the
    class it was explained as, targets[i]; in batches) and cropped to where each looks. wanted: channel ->
    (by relevance, by activation), lists of (image index, value); read(i) -> (key, uint8
    pixels [1, H, W, C]). The references by (channel, image index, "r" or "a")."""
    needs: dict[int, list[int]] = {}
    values: dict[tuple[int, int, str], float] = {}
    for c, (by_relevance, by_activation) in wanted.items():
        for kind, picked in (("r", by_relevance), ("a", by_activation)):
            for i, value in picked:
                needs.setdefault(i, [])
                if c not in needs[i]:
                    needs[i].append(c)
                values[c, i, kind] = value
    found = {}
    order = sorted(needs)
    width = max((len(c) for c in needs.values()), default=0)  # conditions per image, the short lists padded
    step = max(1, explainer.runtime.batch_size // max(width, 1))
    for start in range(0, len(order), step):
        chosen = order[start:start + step]
        keys, pixels = zip(*(read(i) for i in chosen))
        pixels = np.concatenate(pixels)
        channels = np.array([needs[i] + needs[i][:1] * (width - len(needs[i])) for i in chosen], dtype=np.int64)
        result = explainer.explain(explainer.images.normalize(pixels), targets[chosen], concepts=channels, warn=False)
        maps = result.concepts.heatmap()
        for row, (i, key) in enumerate(zip(chosen, keys)):
            for c, heat in zip(needs[i], maps[row]):
                box = where_it_looks(heat)
                top, left, bottom, right = box
                for kind in ("r", "a"):
                    if (c, i, kind) in values:
                        found[c, i, kind] = Reference(key, values[c, i, kind], int(targets[i]), box,
                                                      pixels[row, top:bottom, left:right],
                                                      heat[top:bottom, left:right].astype(np.float32))
        if advance is not None:
            advance(start + len(chosen))
    return found


def where_it_looks(heat: np.ndarray, fraction: float = 0.2, least: float = 0.25) -> tuple[int, int, int, int]:
    """The box (top, left, bottom, right; exclusive) around the pixels whose positive relevance
    is at least `fraction` of the largest, widened to at least `least` of each side (a crop
    big enough to see what is there); the whole image where nothing is positive."""
    height, width = heat.shape
    positive = np.maximum(heat, 0)
    peak = positive.max()
    if not peak > 0 or not np.isfinite(peak):
        return 0, 0, height, width
    rows, cols = np.nonzero(positive >= fraction * peak)
    box = []
    for low, high, size in ((rows.min(), rows.max() + 1, height), (cols.min(), cols.max() + 1, width)):
        need = max(int(np.ceil(least * size)), high - low)
        low = int(min(max(0, (low + high - need) // 2), size - need))
        box.append((low, low + need))
    (top, bottom), (left, right) = box
    return int(top), int(left), int(bottom), int(right)
