"""What the audit collects before any check runs: one pass over the images, reduced per batch.

Every batch is explained once (in this process, or on a Ray actor: Job) and reduced there to
what the checks read: per image, a few numbers and two CELLS x CELLS grids (the downsized
positive relevance SpRAy clusters, and the cells outside the object mask), kilobytes in all;
over the batches, the largest logit differences. The full-size maps leave the batch only for
the first images (examples.kept_first: the report's table and the sanity checks' subset), so
the driver's memory grows by kilobytes per image, not by a heatmap (200 KB at 224 x 224).
The sanity checks' maps (the randomised copies', another class's) are of that subset only.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..concepts.scan import channel_totals
from ..evaluation.evaluate import load_mask
from ..explainer import Explainer, Portable
from ..lrp import reach
from ..options import Options, Runtime
from ..runtime.cluster import batches_of, connected, map_batches
from . import drift as drift_check
from . import sanity
from .concepts import ConceptFacts
from .examples import Example, Examples
from .identity import activated, confidences, output_step, own_logits, own_session, reference_session
from .statistics import MASK_STATISTICS, STATISTICS, blocks, downsized, image_statistics
from .strategies import ClassStrategies, class_strategies

#: grid the heatmaps are downsized to for the per-class checks
CELLS = 16


@dataclass(frozen=True)
class Sample:
    """The images an audit looks at, in order: files, the names shown, labels, masks."""

    files: tuple[Path, ...]
    names: tuple[str, ...]  # as given, relative to the data folder where possible
    labels: np.ndarray | None  # int [N]; None: an unlabeled sample
    masks: tuple[Path | None, ...]
    classes: tuple[str, ...]  # the dataset's (empty for an unlabeled sample)
    source: str | None  # where the labels came from ("class folders", a labels file); None: unlabeled


@dataclass(frozen=True)
class PerImage:
    """Per image, what the checks read (columns of N rows; never the full-size maps)."""

    targets: np.ndarray  # int64: the class explained, the model's top-1
    confidence: np.ndarray  # the model's probability for it
    initial: np.ndarray  # relevance at the output
    input_sum: np.ndarray  # relevance reaching the input
    merge_error: np.ndarray  # largest |R - R_skip - R_main| / |R| over the merges (0 where the rules promise none)
    exploded: np.ndarray  # bool: NaN/Inf set to 0, or totals far beyond the initial relevance
    reach: np.ndarray  # share of the logit at the input (NaN: gradients)
    taken: np.ndarray  # [N, len(reach.FAMILIES)]: what each family of ops took
    statistics: Mapping[str, np.ndarray]  # statistics.image_statistics by name (mask metrics NaN without a mask)
    has_mask: np.ndarray  # bool
    grids: np.ndarray  # [N, CELLS, CELLS] positive relevance in block sums, normalised to 1 (SpRAy)
    outside: np.ndarray  # bool [N, CELLS, CELLS]: cells outside the object (all True without a mask)
    faithfulness: Mapping[str, np.ndarray] | None = None  # Insertion/Deletion scores by name
    other_predictions: np.ndarray | None = None  # int64: the --against model's top-1
    drift: Mapping[str, np.ndarray] | None = None  # drift.compared by name
    # [N, 2, C] float32 at the concept layer: each channel's relevance total and largest activation
    channels: np.ndarray | None = None
    other_channels: np.ndarray | None = None  # the --against model's

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def conservation(self) -> np.ndarray:
        """|input total - initial| / |initial| per image."""
        return np.abs(self.input_sum - self.initial) / np.maximum(np.abs(self.initial), 1e-30)

    def nbytes(self) -> int:
        """The bytes held: what grows with the number of images."""
        arrays = [v for v in vars(self).values() if isinstance(v, np.ndarray)]
        for columns in (self.statistics, self.faithfulness or {}, self.drift or {}):
            arrays.extend(columns.values())
        return sum(a.nbytes for a in arrays)

    @staticmethod
    def joined(parts: Sequence[PerImage]) -> PerImage:
        def cat(values):
            return np.concatenate(values)

        def columns(name):
            first = getattr(parts[0], name)
            return None if first is None else {k: cat([getattr(p, name)[k] for p in parts]) for k in first}

        fields_ = {k: (cat([getattr(p, k) for p in parts]) if isinstance(v, np.ndarray) else v)
                   for k, v in vars(parts[0]).items()}
        for name in ("other_predictions", "channels", "other_channels"):
            fields_[name] = None if getattr(parts[0], name) is None else cat([getattr(p, name) for p in parts])
        return PerImage(**{**fields_, "statistics": columns("statistics"), "faithfulness": columns("faithfulness"),
                           "drift": columns("drift")})


@dataclass(frozen=True)
class Integrity:
    """The model's own output against the explainer's, reduced over the batches (largest values)."""

    logit_difference: float  # |the explainer's logits through the output activation - the model's own (reference)|
    largest_output: float  # |the model's own output|
    kernel_difference: float  # |the deployed kernels' output - the reference arithmetic's|
    step: float | None  # one quantisation step of an int8 model's output (identity.output_step)


@dataclass(frozen=True)
class SanityMaps:
    """The sanity checks' maps, of the first images only."""

    heatmaps: np.ndarray  # [S, H, W]: the model's own
    randomised: tuple[tuple[str, int, np.ndarray], ...]  # the cascade: (label, layers randomised, maps)
    other_class: np.ndarray | None  # maps for a random other class; None: the model has one output


@dataclass(frozen=True, eq=False)
class AuditData:
    """Everything the checks read: the model and explainer facts, the images' names and labels,
    the per-image columns, the integrity figures, the sanity maps and the kept examples."""

    model: str
    facts: dict  # identity(): what was audited
    sample: Sample
    options: Options
    num_classes: int = 0
    images: PerImage | None = None  # None: nothing explained (a model without rules)
    integrity: Integrity | None = None
    sanity: SanityMaps | None = None
    examples: Examples = field(default_factory=Examples)
    against: str | None = None
    no_rule: str | None = None  # the NoRuleError's message: the one thing the rules check reads
    concepts: ConceptFacts | None = None  # what the model uses (audit.concepts), where a concept layer was found

    @property
    def names(self) -> tuple[str, ...]:
        return self.sample.names

    @property
    def classes(self) -> list[str]:
        """The class names; an unlabeled sample's are the model's class indices."""
        return list(self.sample.classes) or [str(k) for k in range(self.num_classes)]

    @property
    def conserving(self) -> bool:
        """Whether the rules promise conservation at all (an initial relevance of one, or copy splits, do not)."""
        return self.options.preset.initial != "one" and self.options.split.method != "copy"

    def available(self) -> frozenset[str]:
        """Which of checks.NEEDS this data meets."""
        have = {"explained": self.images is not None, "labels": self.sample.labels is not None,
                "masks": self.images is not None and bool(self.images.has_mask.any()),
                "against": self.images is not None and self.images.drift is not None,
                "faithfulness": self.images is not None and self.images.faithfulness is not None,
                "sanity images": self.sanity is not None, "concepts": self.concepts is not None}
        return frozenset(k for k, v in have.items() if v)

    @cached_property
    def strategies(self) -> list[ClassStrategies]:
        """Per predicted class of at least 3 images: its Clever Hans region and SpRAy clusters."""
        targets = self.images.targets
        found = []
        for k, name in enumerate(self.classes):
            members = [i for i in range(len(targets)) if targets[i] == k]
            if len(members) >= 3:
                found.append(class_strategies(name, members, self.images.grids, self.images.outside))
        return found

    @cached_property
    def drift(self) -> drift_check.Drift | None:
        if self.images is None or self.images.drift is None:
            return None
        return drift_check.from_measures(self.against, self.images.targets, self.images.other_predictions,
                                         self.images.drift)

    def rows(self) -> list[dict]:
        """images.csv: one row per image."""
        if self.images is None:
            return []
        images, classes, labels = self.images, self.classes, self.sample.labels
        conservation = images.conservation
        rows = []
        for i, name in enumerate(self.names):
            label = int(labels[i]) if labels is not None else None
            target = int(images.targets[i])
            row = {"image": name, "label": classes[label] if label is not None else None,
                   "prediction": classes[target], "confidence": float(images.confidence[i]),
                   "correct": None if label is None else bool(label == target),
                   "initial_relevance": float(images.initial[i]), "conservation_error": float(conservation[i])}
            shown = STATISTICS + (MASK_STATISTICS if images.has_mask[i] else ())
            row.update({k: float(images.statistics[k][i]) for k in shown})
            row.update({f"exact_{k}": float(v[i]) for k, v in (images.faithfulness or {}).items()})
            if self.drift is not None:
                compared = self.drift.per_image[i]
                row.update({f"drift_{k}": (classes[v] if k == "other_prediction" else v) for k, v in compared.items()})
            rows.append(row)
        return rows


def channel_numbers(probe: tuple[np.ndarray, np.ndarray], axis: int) -> np.ndarray:
    """[N, 2, C] float32 from a probed concept layer: each channel's relevance total and largest
    activation (concepts.scan.channel_totals)."""
    return np.stack(channel_totals(probe, axis), axis=1).astype(np.float32)


Item = tuple[int, Path, "Path | None"]  # (index among the audited images, image file, mask file)


@dataclass(frozen=True)
class Job:
    """What auditing a batch of image files needs, picklable for Ray actors: the compiled
    explainer, the model file (its own logits, and the Insertion/Deletion curves), and the
    other model's compiled explainer for drift. A batch comes back reduced (PerImage columns,
    the integrity maxima, the examples of the first `keep` images)."""

    explainer: Portable
    model: str
    batch_size: int
    faithfulness: bool = False
    against: Portable | None = None
    keep: int = 0  # images with an index below this come back with their example (maps and pixels)
    axes: tuple[int, int] = (1, 1)  # the channel axis of each model's probed concept layer

    def open(self, device: str = "cpu", threads: int | None = None, explainer: Explainer | None = None,
             other: Explainer | None = None) -> Callable[[Sequence[Item]], dict]:
        """A worker: a batch of items -> its reduced part (explainers given are used as they are)."""
        from ..evaluation import metrics
        from ..evaluation.baselines import Forward

        explainer = explainer or self.explainer.open(device, threads)
        if self.against is not None:
            other = other or self.against.open(device, threads)
        summary, size = explainer.summary, self.batch_size
        image, activation, height, width = summary.image, summary.output_activation, summary.height, summary.width
        options = explainer.options
        conserving = options.preset.initial != "one" and options.split.method != "copy"
        # the explainer's size (--size or the model's) for the forward pass too
        forward = Forward(self.model, device=device, image_size=(height, width), threads=threads) if self.faithfulness else None
        black = explainer.images.normalize(np.zeros((1, height, width, image.channels), np.uint8))[0]
        # the model's own output twice: in the reference arithmetic (the integrity gate) and with
        # the deployed kernels (reported beside it)
        reference = reference_session(Path(self.model), device, threads)
        plain = own_session(Path(self.model), device, threads)

        def run(items: Sequence[Item]) -> dict:
            indices = [index for index, _, _ in items]
            pixels = explainer.read_images([file for _, file, _ in items])
            x = explainer.images.normalize(pixels)
            result = explainer.explain(x, batch_size=size, warn=False)
            heatmaps, targets, n = result.heatmap(), result.targets, len(x)
            own, deployed = own_logits(reference, x, size), own_logits(plain, x, size)
            masks = [load_mask(mask, height, width) for _, _, mask in items]
            statistics = [image_statistics(h, m) for h, m in zip(heatmaps, masks)]
            exploded = np.zeros(n, dtype=bool)
            exploded[list(result.explosion.indices if result.explosion else ())] = True
            merge_sums = result.merge_sums
            if conserving and merge_sums.size:  # per merge: does the split hand on all it gets?
                totals = merge_sums[..., 0].astype(np.float64)
                with np.errstate(invalid="ignore"):
                    per_merge = np.abs(totals - merge_sums[..., 1] - merge_sums[..., 2]) / np.maximum(np.abs(totals), 1e-30)
                merge_error = np.nan_to_num(per_merge, nan=np.inf).max(axis=1)
            else:
                merge_error = np.zeros(n)
            columns = dict(
                targets=targets, confidence=confidences(result.logits, activation)[np.arange(n), targets],
                initial=result.initial, input_sum=result.input_sum, merge_error=merge_error, exploded=exploded,
                # share at the input and what each family of ops took (NaN: gradients)
                reach=(np.asarray(result.reach, np.float64) if result.absorbed_by is not None
                       else np.full(n, np.nan)),
                taken=(np.asarray(result.taken_shares, np.float64) if result.absorbed_by is not None
                       else np.full((n, len(reach.FAMILIES)), np.nan)),
                statistics={k: np.array([s.get(k, np.nan) for s in statistics], np.float64)
                            for k in STATISTICS + MASK_STATISTICS},
                has_mask=np.array([m is not None for m in masks], bool),
                grids=np.stack([downsized(h, CELLS) for h in heatmaps]),
                outside=np.stack([np.ones((CELLS, CELLS), bool) if m is None else blocks(m, CELLS, np.mean) < 0.5
                                  for m in masks]))
            if result.probe is not None:  # the concept layer, probed
                columns["channels"] = channel_numbers(result.probe, self.axes[0])
            if forward is not None:  # Insertion and Deletion, tie-robust protocol ("exact")
                scores = [metrics.insertion_deletion(forward.probabilities, x[i], heatmaps[i], int(targets[i]), black,
                                                     "exact", image.layout).scores for i in range(n)]
                columns["faithfulness"] = {k: np.array([s[k] for s in scores], np.float64) for k in scores[0]}
            theirs = None
            if other is not None:
                explained = other.explain(x, target=targets, batch_size=size, warn=False)
                theirs = explained.heatmap()
                compared = [drift_check.compared(a, b) for a, b in zip(heatmaps, theirs)]
                columns["drift"] = {k: np.array([c[k] for c in compared], np.float64) for k in drift_check.MEASURES}
                columns["other_predictions"] = np.asarray(explained.logits).argmax(axis=1)
                if explained.probe is not None:
                    columns["other_channels"] = channel_numbers(explained.probe, self.axes[1])
            examples = {index: Example(pixels[j].copy(), heatmaps[j].copy(), None if theirs is None else theirs[j].copy())
                        for j, index in enumerate(indices) if index < self.keep}
            ours = activated(result.logits, activation)
            return {"images": PerImage(**columns), "examples": examples,
                    "integrity": (float(np.abs(ours - own).max()), float(np.abs(own).max()),
                                  float(np.abs(deployed.astype(np.float64) - own).max()))}

        return run


def collect(model: Path, sample: Sample, explainer: Explainer, other: Explainer | None, runtime: Runtime, *,
            facts: dict, against: str | None = None, faithfulness: bool = False, sanity_images: int = 0, keep: int = 0,
            progress: Callable[[float], None] | None = None, axes: tuple[int, int] = (1, 1)) -> AuditData:
    """Explain every image once (in this process, or batch by batch on Ray actors: the batches
    are the same either way, and so are the numbers), then the sanity maps of the first images."""
    job = Job(explainer.portable(), str(model), runtime.batch_size, faithfulness,
              other.portable() if other is not None else None, keep, axes)
    items = [(i, file, mask) for i, (file, mask) in enumerate(zip(sample.files, sample.masks))]
    batches = batches_of(items, runtime.batch_size)
    if runtime.cluster is None:
        run = job.open(runtime.device, runtime.threads, explainer, other)
        parts = []
        for batch in batches:
            parts.append(run(batch))
            if progress:
                progress(len(batch))
    else:
        with connected(runtime.cluster) as ray:
            shipped = replace(job, explainer=job.explainer.stored(ray),
                              against=job.against.stored(ray) if job.against is not None else None)
            parts = map_batches(shipped, batches, runtime.cluster, runtime.device, progress)
    images = PerImage.joined([part["images"] for part in parts])
    logits, largest, kernels = (max(values) for values in zip(*(part["integrity"] for part in parts)))
    examples = Examples({i: e for part in parts for i, e in part["examples"].items()})
    data = AuditData(str(model), facts, sample, explainer.options, explainer.num_classes, images,
                     Integrity(logits, largest, kernels, output_step(model)), examples=examples, against=against)
    return replace(data, sanity=sanity_maps(data, explainer, runtime, sanity_images))


def sanity_maps(data: AuditData, explainer: Explainer, runtime: Runtime, count: int) -> SanityMaps | None:
    """The first `count` images explained again: by copies of the model with randomised weights
    (each an Explainer with the audit's options and runtime, uncached), and for another class."""
    subset = list(range(min(count, len(data.names))))
    if not subset:
        return None
    x = explainer.images.normalize(np.stack([data.examples[i].pixels for i in subset]))
    heatmaps = np.stack([data.examples[i].heatmap for i in subset])
    targets = data.images.targets[subset]
    uncached = replace(runtime, cache=False, cluster=None)

    def explain_with(path, x, chosen):
        return Explainer(path, data.options, uncached).explain(x, target=chosen, warn=False).heatmap()

    cascade = tuple(sanity.cascade(Path(data.model), explain_with, x, targets))
    other_class = None
    if explainer.num_classes >= 2:
        others = sanity.other_classes(targets, explainer.num_classes)
        other_class = explainer.explain(x, target=others, batch_size=runtime.batch_size, warn=False).heatmap()
    return SanityMaps(heatmaps, cascade, other_class)
