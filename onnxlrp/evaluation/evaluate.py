"""Evaluate attribution methods on a labelled image folder, as the paper does.

Data: an ImageFolder layout (one subfolder per class) or a CSV labels file (``path,label`` per
line, label an index or a class name). Either way the class order comes from ``classes.txt``
(one name per line) if present, else from the class subfolders sorted by name. Ground-truth
masks are optional: ``masks/<same relative path>``, or the same with .png (non-zero = object). Every method explains
the image's label; maps are channel sums, heat-quantized (8 levels, as the paper evaluates)
unless asked otherwise.

Per method: Insertion, Deletion and ID under both protocols (``paper``: the published
thresholds, ``exact``: tie-robust), with masks the relevance mass and rank accuracies and the
pointing game, and for LRP methods the conservation error; each as mean and standard error.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import metrics
from ..lrp import reach
from ..io.files import Outputs
from .baselines import Forward, methods as method_registry
from ..errors import DataError, SettingError
from ..io.image import quantize
from ..io.preprocessing import MASKS, find_mask, load_image, load_images, walk_images
from ..options import Options, Runtime, resolve
from ..runtime.cluster import map_batches

METRICS = ("insertion", "deletion", "id")
MASK_METRICS = ("mass_accuracy", "rank_accuracy", "pointing_game")
DEFAULT_METHODS = ("lrp-captum", "integrated-gradients", "guided-backprop", "grad-cam", "score-cam",
                   "paper-i", "paper-ii", "paper-iii", "paper-iv", "relevance-cam", "gated-lrp")


@dataclass
class Dataset:
    files: list[Path]
    labels: np.ndarray | None  # None: an unlabeled sample (load_dataset(..., need_labels=False))
    masks: list[Path | None]
    classes: list[str]

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def method_names() -> list[str]:
    return list(method_registry("model.onnx", np.zeros(1)))


def load_dataset(root: str | Path, labels_file: str | Path | None = None, *, masks: str | Path | None = None,
                 need_labels: bool = True) -> Dataset:
    """The images of `root` with their labels and masks.

    The class list (Dataset.classes) comes from ``root/classes.txt`` (one name per line) when
    present, else from the class subfolders sorted by name (``masks/`` and hidden folders
    excluded). Without a labels file every class subfolder holds that class's images (found
    by walk_images: recursively, hidden names skipped); with one, each ``path,label`` line
    gives a path relative to `root` and a label: a class index, or a class name (which needs
    the class list). Blank lines and lines starting with ``#`` are skipped. Masks: find_mask,
    in `masks` (default root/masks). need_labels=False: a folder with neither class folders
    nor a labels file is an unlabeled sample, every image under it (walk_images), labels None."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: {'not a folder' if root.exists() else 'no such folder'}")
    classes, source = _class_list(root)
    labels: list[int] | None
    if labels_file is not None:
        files, labels = _from_labels(root, Path(labels_file), classes, source)
    elif any((root / name).is_dir() for name in classes):
        files, labels = [], []
        for index, name in enumerate(classes):
            found = [(root / name).joinpath(*rel.parts) for rel in walk_images(root / name)] \
                if (root / name).is_dir() else []
            files += found
            labels += [index] * len(found)
    elif need_labels:
        raise DataError(f"{root}: no class folders (ImageFolder layout) and no labels file")
    else:  # a flat sample (the class names, if any, from classes.txt)
        files, labels = [root.joinpath(*rel.parts) for rel in walk_images(root)], None
    if not files:
        raise DataError(f"{root}: no images")
    return Dataset(files, None if labels is None else np.asarray(labels, dtype=np.int64),
                   [find_mask(f, root, masks) for f in files], classes)


def _class_list(root: Path) -> tuple[list[str], str]:
    """The class names in index order, and where they come from (for messages)."""
    listing = root / "classes.txt"
    if listing.is_file():
        classes = [line.strip() for line in listing.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        if not classes:
            raise DataError(f"{listing}: no class names (one per line)")
        twice = sorted({c for c in classes if classes.count(c) > 1})
        if twice:
            raise DataError(f"{listing}: class {twice[0]!r} listed more than once")
        return classes, str(listing)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != MASKS and not p.name.startswith("."))
    return classes, f"the class subfolders of {root}"


def _from_labels(root: Path, labels_file: Path, classes: list[str], source: str) -> tuple[list[Path], list[int]]:
    if not labels_file.is_file():
        raise DataError(f"{labels_file}: no such file")
    files, labels = [], []
    reader = csv.reader(labels_file.read_text(encoding="utf-8-sig").splitlines())
    for row in reader:
        where = f"{labels_file} line {reader.line_num}"
        if not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        if len(row) < 2:
            raise DataError(f"{where}: expected 'path,label', got {','.join(row)!r}")
        path = root / row[0].strip()
        if not path.is_file():
            raise DataError(f"{where}: no such image {path}")
        files.append(path)
        labels.append(_label(row[1].strip(), classes, source, where, root))
    return files, labels


def _label(text: str, classes: list[str], source: str, where: str, root: Path) -> int:
    """A class index or a class name -> the class index; anything else is an OnnxLrpError at `where`."""
    if not text:
        raise DataError(f"{where}: empty label")
    if re.fullmatch(r"[+-]?[0-9]+", text):
        index = int(text)
        if index < 0:
            raise DataError(f"{where}: negative label {index}")
        # An index is checked against an explicit classes.txt here, and against the model's
        # classes in evaluate(); subfolders in a CSV layout need not be classes.
        if source.endswith("classes.txt") and index >= len(classes):
            raise DataError(f"{where}: label {index} out of range: {len(classes)} classes ({source})")
        return index
    if not classes:
        raise DataError(f"{where}: class name {text!r} but no class list: put the class order in "
                           f"{root / 'classes.txt'} (one name per line)")
    if text not in classes:
        shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
        raise DataError(f"{where}: unknown class {text!r}; the classes in {source}: {shown}")
    return classes.index(text)


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()) if len(values) else math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


@dataclass
class BatchResults:
    """What a batch contributes: per method and metric the values of its images, in order."""

    correct: int = 0
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    conservation: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, method: str, metric: str, value: float) -> None:
        self.values.setdefault(method, {}).setdefault(metric, []).append(float(value))


@dataclass
class Results:
    model: str
    images: int
    protocols: tuple[str, ...]
    levels: int
    labels: dict[str, str] = field(default_factory=dict)  # method -> label
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # method -> metric -> per image
    conservation: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # method -> point -> per image
    accuracy: float = math.nan

    def extend(self, part: BatchResults) -> None:
        """A batch's values after those already here: call in batch order, for dataset order."""
        for mine, theirs in ((self.values, part.values), (self.conservation, part.conservation)):
            for method, per in theirs.items():
                for key, values in per.items():
                    mine.setdefault(method, {}).setdefault(key, []).extend(values)

    def summary(self) -> dict:
        return {
            "model": self.model, "images": self.images, "model_accuracy": self.accuracy,
            "protocols": list(self.protocols), "heat_quantization_levels": self.levels,
            "methods": {
                method: {"label": self.labels[method],
                         **{metric: dict(zip(("mean", "stderr"), mean_and_error(v))) for metric, v in per.items()}}
                for method, per in self.values.items()
            },
        }

    def reach_warnings(self, threshold: float = reach.WARN_BELOW) -> list[str]:
        """One line per LRP method whose median share at the input is below `threshold`."""
        lines = []
        for method, per in self.values.items():
            if "reach" not in per:
                continue
            taken = np.array([per[f"taken:{f}"] for f in reach.FAMILIES]).T
            line = reach.warning(np.asarray(per["reach"]), taken, f"method {method}", threshold=threshold)
            if line:
                lines.append(line)
        return lines

    def markdown(self) -> str:
        columns = [f"{m} ({p})" for p in self.protocols for m in METRICS]
        columns += [m for m in MASK_METRICS + ("reach", "conservation_error") if any(m in v for v in self.values.values())]
        keys = [f"{p}:{m}" for p in self.protocols for m in METRICS] + columns[len(self.protocols) * len(METRICS):]
        lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for method, per in self.values.items():
            cells = []
            for key in keys:
                mean, err = mean_and_error(per.get(key, []))
                scale = 100 if key.split(":")[-1] in METRICS + MASK_METRICS + ("reach",) else 1
                cells.append("-" if math.isnan(mean) else
                             (f"{mean * scale:.1f} ± {err * scale:.1f}" if scale == 100 else f"{mean:.2e}"))
            lines.append(f"| {self.labels[method]} | " + " | ".join(cells) + " |")
        note = (f"\n{self.images} images, model accuracy {self.accuracy:.1%}; Insertion, Deletion, ID, mass/rank "
                f"accuracy, pointing game and reach (the share of the explained logit at the input) in percent "
                f"(mean ± standard error); maps heat-quantized to "
                f"{self.levels} levels" if self.levels else "\nno heat quantization")
        return "\n".join(lines) + note + ".\n"


@dataclass(frozen=True)
class Job:
    """What evaluating a batch of images needs; picklable, so that Ray actors can open it."""

    model: str
    method_names: tuple[str, ...]
    protocols: tuple[str, ...]
    levels: int
    options: Options  # the LRP methods' settings (baselines.methods), the preprocessing and input size

    def open(self, device: str = "cpu", threads: int | None = None, labels: np.ndarray | None = None
             ) -> "BatchEvaluator":
        return BatchEvaluator(self, device, threads, labels)


@dataclass
class Batch:
    """One batch of the dataset: image files, labels, mask files."""

    files: list[Path]
    labels: np.ndarray
    masks: list[Path | None]

    def __len__(self) -> int:
        return len(self.files)


class BatchEvaluator:
    """The model's forward pass and the methods' sessions, opened once; called per batch."""

    def __init__(self, job: Job, device: str = "cpu", threads: int | None = None, labels: np.ndarray | None = None):
        """labels: checked against the model's classes before any method is built."""
        self.job = job
        self.forward = forward = Forward(job.model, device=device, image_size=job.options.image_size,
                                         threads=threads)  # scores the curves
        if labels is not None and labels.min(initial=0) < 0:
            raise DataError(f"label {labels.min()} is negative")
        if labels is not None and labels.max(initial=0) >= forward.num_classes:
            raise DataError(f"label {labels.max()} out of range: the model has {forward.num_classes} classes")
        image = forward.image
        self.prep = job.options.preprocessing
        self.black = self.prep.normalize(np.zeros((1, forward.height, forward.width, image.channels), np.uint8),
                                         image.layout)[0]
        registry = method_registry(job.model, self.black, image.layout, options=job.options,
                                   runtime=Runtime(device=device, threads=threads))
        unknown = [m for m in job.method_names if m not in registry]
        if unknown:
            raise SettingError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(registry)}, or a preset "
                               "name; an LRP method or preset with :layer or :gated takes that heatmap")
        self.methods = {name: registry[name]() for name in job.method_names}
        self.labels = {name: method.label for name, method in self.methods.items()}

    def __call__(self, batch: Batch, advance: Callable[[float], None] | None = None) -> BatchResults:
        """advance(n): n images' worth of the batch done (fractions: per method, maps then metrics)."""
        job, forward, image = self.job, self.forward, self.forward.image
        out = BatchResults()
        pixels = load_images(batch.files, forward.height, forward.width, image.channels)
        x = self.prep.normalize(pixels, image.layout)
        y = batch.labels
        masks = [load_mask(m, forward.height, forward.width) for m in batch.masks]
        out.correct = int((forward.probabilities(x).argmax(axis=1) == y).sum())
        share = 1 / len(self.methods) if self.methods else 0.0  # of one image, per method: half maps, half metrics
        for name, method in self.methods.items():
            maps = method(x, y)
            if advance:
                advance(len(x) * share / 2)
            for i in range(len(x)):
                saliency = quantize(maps[i], job.levels) if job.levels else maps[i]
                for protocol in job.protocols:
                    curves = metrics.insertion_deletion(forward.probabilities, x[i], saliency, int(y[i]), self.black,
                                                        protocol, image.layout)
                    for metric, value in curves.scores.items():
                        out.add(name, f"{protocol}:{metric}", value)
                if masks[i] is not None:
                    out.add(name, "mass_accuracy", metrics.mass_accuracy(saliency, masks[i]))
                    out.add(name, "rank_accuracy", metrics.rank_accuracy(saliency, masks[i]))
                    out.add(name, "pointing_game", metrics.pointing_game(saliency, masks[i]))
                if advance:
                    advance(share / 2)
            if method.explainer is not None:
                _conservation(out, name, method)
        return out


def evaluate(
    model: str | Path, dataset: Dataset, method_names: Sequence[str] = DEFAULT_METHODS,
    protocols: Sequence[str] = metrics.PROTOCOLS, levels: int = 8, *, options: Options | None = None,
    runtime: Runtime | None = None, limit: int | None = None, progress: Callable[[float], None] | None = None,
    **settings,
) -> Results:
    """Evaluate the methods on the first `limit` images of `dataset`.

    options: the LRP methods' settings, except what a method sets itself (baselines.fixed_settings:
    a named method's preset, split and map; method 'lrp' takes them all), and the preprocessing
    and input size of every method; runtime: device, threads, batch size and a Ray cluster
    (runtime.cluster: the batches on Ray actors, with the same results as in one process, image
    for image). Instead of the objects, their settings may be given by name (batch_size=4,
    image_size=(48, 192)), as Explainer takes them. progress(n) is called as the work goes on,
    n in images (fractions of one: each method's maps for a batch, then each image's metrics);
    the calls add up to the number of images."""
    options, runtime = resolve(options, runtime, settings)
    batch_size, device, threads, cluster = runtime.batch_size, runtime.device, runtime.threads, runtime.cluster
    if not dataset.labelled:
        raise DataError("evaluate needs labels: class folders (ImageFolder layout) or a labels file")
    count = min(limit or len(dataset.files), len(dataset.files))
    labels = dataset.labels[:count]
    job = Job(str(model), tuple(method_names), tuple(protocols), levels, options)
    files, masks = dataset.files[:count], dataset.masks[:count]
    batches = [Batch(files[k:k + batch_size], labels[k:k + batch_size], masks[k:k + batch_size])
               for k in range(0, count, batch_size)]
    # Opened here in any case: bad labels, methods or models are errors before Ray starts.
    evaluator = job.open(device, threads, labels=labels)
    results = Results(str(model), count, tuple(protocols), levels, dict(evaluator.labels))
    if cluster is None:
        done = [evaluator(batch, progress) for batch in batches]
    else:
        del evaluator  # its sessions: the actors open their own
        done = map_batches(job, batches, cluster, device, progress)
    for part in done:  # in batch order: every list holds its images in dataset order, wherever they ran
        results.extend(part)
    results.accuracy = sum(part.correct for part in done) / count
    return results


def load_mask(path: Path | None, height: int, width: int) -> np.ndarray | None:
    """A mask file as a boolean [height, width] (white: the object), None without one."""
    return None if path is None else load_image(path, height, width, channels=1)[..., 0] > 127


def _conservation(results: BatchResults, name: str, method) -> None:
    """Per image: the model output's relevance, and the relevance totals at the network input,
    at the first and at the last block's input (the paper's Fig. 5), and the conservation error."""
    result = method.last[0]
    merges = method.explainer.merges
    points = {"output": result.initial, "input": result.input_sum}
    if merges and result.layer_sums is not None:
        out_sums = dict(zip(result.layer_names, result.layer_sums[:, :, 0].T))
        points["first block"] = out_sums.get(merges[0].fork)
        points["last block"] = out_sums.get(merges[-1].fork)
    for point, values in points.items():
        if values is not None:
            results.conservation.setdefault(name, {}).setdefault(point, []).extend(np.asarray(values, float).tolist())
    for value in metrics.conservation_error(result.input_sum, result.initial):
        results.add(name, "conservation_error", value)
    if result.absorbed_by is not None:  # LRP: how much reached the input, and what took the rest
        for value in result.reach:
            results.add(name, "reach", value)
        for family, values in result.taken.items():
            for value in values:
                results.add(name, f"taken:{family}", value)


#: what write() puts into the output folder (the plot only when LRP methods ran)
RESULT_FILES = ("results.md", "results.json", "conservation.png")


def write(results: Results, folder: str | Path) -> dict[str, Path]:
    """results.md, results.json and conservation.png (when LRP methods ran) into `folder`,
    published together: all of them or, on failure, none."""
    folder = Path(folder)
    markdown, table, plot = (folder / name for name in RESULT_FILES)
    paths = {"markdown": markdown, "json": table}
    payload = {**results.summary(), "per_image": results.values, "conservation": results.conservation}
    with Outputs() as outputs:
        outputs.write(markdown, lambda tmp: Path(tmp).write_text(results.markdown()))
        outputs.write(table, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))
        if results.conservation:
            paths["plot"] = plot
            outputs.write(plot, lambda tmp: _plot_conservation(results, tmp))
    return paths


def _plot_conservation(results: Results, path: str) -> None:
    """Relevance totals against the model output, one panel per LRP method (the paper's Fig. 5)."""
    from matplotlib.figure import Figure  # not pyplot: the user's matplotlib backend stays as it is

    names = list(results.conservation)
    fig = Figure(figsize=(3.2 * len(names), 3.4))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        points = results.conservation[name]
        output = np.asarray(points["output"])
        for label, marker in (("input", "o"), ("first block", "s"), ("last block", "^")):
            if label in points:
                ax.scatter(output, points[label], s=10, marker=marker, label=f"at {label}", alpha=0.7)
        low, high = min(0.0, output.min()), max(output.max(), 1e-9)
        ax.plot([low, high], [low, high], color="#999999", linewidth=1)
        ax.set_title(results.labels[name], fontsize=8)
        ax.set_xlabel("relevance at the output")
        ax.set_ylabel("relevance total")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
