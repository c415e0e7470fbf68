"""What the audited model uses, not only where: per class the channels of a layer its
predictions rest on (Concept Relevance Propagation), with reference images from the audited
folder; the channels that carry a Clever Hans region; and, with a second model, whether the two
rest on the same concepts.

Collected after the pass over the images (data.collect keeps each image's channel totals: two
numbers per channel, kilobytes per image), from a few conditional passes in this process.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..concepts.atlas import ClassConcepts, Reference, explain_references
from ..concepts.scan import Top
from ..explainer import Explainer
from ..explanation import channel_shares
from .statistics import downsized
from .strategies import SMALL_REGION, ClassStrategies

#: per class, the concepts shown and compared; per concept, its reference images
SHOWN, REFERENCES = 5, 3
#: a channel carries a Clever Hans region when at least this share of its conditional relevance lies there
IN_REGION = 0.5
#: channels tried per suspicious class (its most relevant), and images per channel
TRIED, HANS_IMAGES = 10, 4


@dataclass(frozen=True)
class ConceptFacts:
    layer: str
    channels: int
    per_class: tuple[ClassConcepts, ...]
    references: dict[int, tuple[Reference, ...]]  # channel (shown or Clever Hans) -> its best images by relevance
    hans: dict[str, tuple[tuple[int, float], ...]]  # class -> (channel, share of its conditional relevance in the region)
    agreement: dict[str, float] | None = None  # class -> share of its top concepts the --against model shares

    def to_dict(self) -> dict:
        return {"layer": self.layer, "channels": self.channels,
                "per_class": [{**c.to_dict(), "concepts": [
                    {"channel": ch, "share": share, "references": [r.to_dict() for r in self.references.get(ch, ())]}
                    for ch, share in c.channels]} for c in self.per_class],
                "clever_hans": {name: [{"channel": c, "in_region": s,
                                        "references": [r.to_dict() for r in self.references.get(c, ())]}
                                       for c, s in found] for name, found in self.hans.items()},
                "agreement": self.agreement}


def class_means(values: np.ndarray, targets: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """[classes, C] the mean of `values` over each class's images, and [classes] their counts."""
    sums = np.zeros((classes, values.shape[1]))
    np.add.at(sums, targets, values)
    counts = np.bincount(targets, minlength=classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None], counts


def facts(names: list[str], files, targets: np.ndarray, channels: np.ndarray, strategies: list[ClassStrategies],
          explainer: Explainer, other: np.ndarray | None = None) -> ConceptFacts:
    """channels: [N, 2, C] each image's channel relevance totals and largest activations
    (data.PerImage.channels); explainer: the audited model with the concept layer; other: the
    --against model's channels, or None."""
    relevance, activation = channels[:, 0].astype(np.float64), channels[:, 1].astype(np.float64)
    means, counts = class_means(channel_shares(relevance), targets, len(names))
    per_class = tuple(
        ClassConcepts(k, names[k], int(counts[k]), tuple((int(c), float(means[k, c]))
                                                          for c in np.argsort(-means[k], kind="stable")[:SHOWN]))
        for k in range(len(names)) if counts[k])
    hans = {s.name: carried for s in strategies if s.region_area <= SMALL_REGION
            for carried in [_carrying(s, names.index(s.name), means[names.index(s.name)], files, explainer)] if carried}
    shown = sorted({c for entry in per_class for c, _ in entry.channels} | {c for found in hans.values() for c, _ in found})
    best = Top(relevance.shape[1], REFERENCES)  # the atlas's references, here over the audited images
    best.add(relevance, np.arange(len(relevance)))
    wanted = {c: (best.best(c), []) for c in shown}

    def read(i: int):
        return str(files[i][1]), explainer.read_images([files[i][0]])

    found = explain_references(explainer, read, targets, wanted)
    references = {c: tuple(found[c, i, "r"] for i, _ in wanted[c][0]) for c in shown}
    agreement = None if other is None else _agreement(per_class, activation, other, targets, len(names))
    return ConceptFacts(explainer.summary.concept_layer, explainer.summary.concept_channels, per_class, references,
                        hans, agreement)


def _carrying(strategy: ClassStrategies, target: int, mean_shares: np.ndarray, files, explainer: Explainer):
    """The class's channels whose conditional relevance lies mostly in its Clever Hans region,
    on the images most concentrated there: (channel, share in the region), largest first."""
    tried = [int(c) for c in np.argsort(-mean_shares, kind="stable")[:TRIED]]
    images = strategy.hans_images[:HANS_IMAGES]
    pixels = explainer.read_images([files[i][0] for i in images])
    result = explainer.explain(explainer.images.normalize(pixels), target, concepts=tried, warn=False)
    cells = strategy.region.shape[0]
    inside = np.array([[downsized(heat, cells)[strategy.region].sum() for heat in maps]
                       for maps in result.concepts.heatmap()])  # [images, tried]
    positive = np.array([[np.clip(heat, 0, None).sum() > 0 for heat in maps] for maps in result.concepts.heatmap()])
    share = np.where(positive, inside, 0).mean(axis=0)
    return tuple(sorted(((c, float(s)) for c, s in zip(tried, share) if s >= IN_REGION), key=lambda cs: -cs[1]))


def _agreement(per_class, activation: np.ndarray, other: np.ndarray, targets: np.ndarray,
               classes: int) -> dict[str, float]:
    """Per class: the share of its top concepts that are among the other model's top concepts
    for the same images, the channels of the two layers matched one to one by how their
    activations correlate over the audited images (the same channels for an int8 copy; a
    retrained model's own order otherwise)."""
    from scipy.optimize import linear_sum_assignment

    theirs = other[:, 1].astype(np.float64)

    def standard(a):
        a = a - a.mean(axis=0)
        return a / np.maximum(np.linalg.norm(a, axis=0), 1e-30)

    correlation = standard(activation).T @ standard(theirs)  # [C_ours, C_theirs]
    ours_index, their_index = linear_sum_assignment(-correlation)
    matched = dict(zip(ours_index.tolist(), their_index.tolist()))
    other_means, _ = class_means(channel_shares(other[:, 0]), targets, classes)
    result = {}
    for entry in per_class:
        top = [c for c, _ in entry.channels]
        their_top = set(np.argsort(-other_means[entry.target], kind="stable")[:len(top)].tolist())
        result[entry.name] = sum(matched.get(c) in their_top for c in top) / len(top)
    return result
