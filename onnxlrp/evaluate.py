"""Pipeline stage 7: evaluate attribution methods on a labelled image folder, as the paper does.

Data: an ImageFolder layout (one subfolder per class; their order from ``classes.txt`` if
present, else sorted by name) or a CSV labels file (``path,label`` per line, label an index
or a class name). Ground-truth masks are optional: ``masks/<same relative path>`` (non-zero =
object). Every method explains the image's label; maps are channel sums, heat-quantized
(8 levels, as the paper evaluates) unless asked otherwise.

Per method: Insertion, Deletion and ID under both protocols (``paper``: the published
thresholds, ``exact``: tie-robust), with masks the relevance mass and rank accuracies and the
pointing game, and for LRP methods the conservation error; each as mean and standard error.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import metrics
from .files import write_atomic
from .baselines import Forward, methods as method_registry
from .errors import OnnxLrpError
from .image import quantize
from .preprocessing import IMAGE_SUFFIXES, get_preprocessing, load_image, load_images

METRICS = ("insertion", "deletion", "id")
MASK_METRICS = ("mass_accuracy", "rank_accuracy", "pointing_game")
DEFAULT_METHODS = ("lrp-captum", "integrated-gradients", "guided-backprop", "grad-cam", "score-cam",
                   "paper-i", "paper-ii", "paper-iii", "paper-iv")


@dataclass
class Dataset:
    files: list[Path]
    labels: np.ndarray
    masks: list[Path | None]
    classes: list[str]


def method_names() -> list[str]:
    return list(method_registry("model.onnx", np.zeros(1)))


def load_dataset(root: str | Path, labels_file: str | Path | None = None) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise OnnxLrpError(f"{root}: no such folder")
    if labels_file is not None:
        files, labels, classes = _from_labels(root, Path(labels_file))
    else:
        names = root / "classes.txt"
        classes = names.read_text().split() if names.is_file() else sorted(
            p.name for p in root.iterdir() if p.is_dir() and p.name != "masks")
        if not classes:
            raise OnnxLrpError(f"{root}: no class folders (ImageFolder layout) and no labels file")
        files, labels = [], []
        for index, name in enumerate(classes):
            found = sorted(p for p in (root / name).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [index] * len(found)
    if not files:
        raise OnnxLrpError(f"{root}: no images")
    masks = [root / "masks" / f.relative_to(root) for f in files]
    masks = [m if m.is_file() else None for m in masks]
    return Dataset(files, np.asarray(labels, dtype=np.int64), masks, classes)


def _from_labels(root: Path, labels_file: Path) -> tuple[list[Path], list[int], list[str]]:
    if not labels_file.is_file():
        raise OnnxLrpError(f"{labels_file}: no such file")
    rows = [row for row in csv.reader(labels_file.read_text().splitlines()) if row and not row[0].startswith("#")]
    names = sorted({r[1] for r in rows if not r[1].strip().lstrip("-").isdigit()})
    files, labels = [], []
    for number, row in enumerate(rows, 1):
        if len(row) < 2:
            raise OnnxLrpError(f"{labels_file} line {number}: expected 'path,label', got {','.join(row)!r}")
        files.append(root / row[0].strip())
        if not files[-1].is_file():
            raise OnnxLrpError(f"{labels_file} line {number}: no such image {files[-1]}")
        label = row[1].strip()
        labels.append(int(label) if label.lstrip("-").isdigit() else names.index(label))
    return files, labels, names


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()) if len(values) else math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


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

    def add(self, method: str, metric: str, value: float) -> None:
        self.values.setdefault(method, {}).setdefault(metric, []).append(float(value))

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

    def markdown(self) -> str:
        columns = [f"{m} ({p})" for p in self.protocols for m in METRICS]
        columns += [m for m in MASK_METRICS + ("conservation_error",) if any(m in v for v in self.values.values())]
        keys = [f"{p}:{m}" for p in self.protocols for m in METRICS] + columns[len(self.protocols) * len(METRICS):]
        lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for method, per in self.values.items():
            cells = []
            for key in keys:
                mean, err = mean_and_error(per.get(key, []))
                scale = 100 if key.split(":")[-1] in METRICS + MASK_METRICS else 1
                cells.append("-" if math.isnan(mean) else
                             (f"{mean * scale:.1f} ± {err * scale:.1f}" if scale == 100 else f"{mean:.2e}"))
            lines.append(f"| {self.labels[method]} | " + " | ".join(cells) + " |")
        note = (f"\n{self.images} images, model accuracy {self.accuracy:.1%}; Insertion, Deletion, ID, mass/rank "
                f"accuracy and pointing game in percent (mean ± standard error); maps heat-quantized to "
                f"{self.levels} levels" if self.levels else "\nno heat quantization")
        return "\n".join(lines) + note + ".\n"


def evaluate(
    model: str | Path, dataset: Dataset, method_names: Sequence[str] = DEFAULT_METHODS,
    protocols: Sequence[str] = metrics.PROTOCOLS, levels: int = 8, preprocessing: str = "imagenet",
    limit: int | None = None, batch_size: int = 16, device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> Results:
    forward = Forward(model, device=device)  # the model's own forward pass scores the curves
    image, height, width = forward.image, forward.height, forward.width
    prep = get_preprocessing(preprocessing)
    count = min(limit or len(dataset.files), len(dataset.files))
    files, labels = dataset.files[:count], dataset.labels[:count]
    if labels.max(initial=0) >= forward.num_classes:
        raise OnnxLrpError(f"label {labels.max()} out of range: the model has {forward.num_classes} classes")
    black = prep.normalize(np.zeros((1, height, width, image.channels), np.uint8), image.layout)[0]
    registry = method_registry(model, black, image.layout, device)
    unknown = [m for m in method_names if m not in registry]
    if unknown:
        raise OnnxLrpError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(registry)}")
    chosen = {name: registry[name]() for name in method_names}
    results = Results(str(model), count, tuple(protocols), levels, {n: m.label for n, m in chosen.items()})
    correct = 0
    for start in range(0, count, batch_size):
        pixels = load_images(files[start:start + batch_size], height, width, image.channels)
        x = prep.normalize(pixels, image.layout)
        y = labels[start:start + batch_size]
        masks = [_mask(m, height, width) for m in dataset.masks[start:start + batch_size]]
        correct += int((forward.probabilities(x).argmax(axis=1) == y).sum())
        for name, method in chosen.items():
            maps = method(x, y)
            for i in range(len(x)):
                saliency = quantize(maps[i], levels) if levels else maps[i]
                for protocol in protocols:
                    curves = metrics.insertion_deletion(forward.probabilities, x[i], saliency, int(y[i]), black,
                                                        protocol, image.layout)
                    for metric, value in curves.scores.items():
                        results.add(name, f"{protocol}:{metric}", value)
                if masks[i] is not None:
                    results.add(name, "mass_accuracy", metrics.mass_accuracy(saliency, masks[i]))
                    results.add(name, "rank_accuracy", metrics.rank_accuracy(saliency, masks[i]))
                    results.add(name, "pointing_game", metrics.pointing_game(saliency, masks[i]))
            if method.explainer is not None:
                _conservation(results, name, method)
        if progress:
            progress(len(x))
    results.accuracy = correct / count
    return results


def _mask(path: Path | None, height: int, width: int) -> np.ndarray | None:
    return None if path is None else load_image(path, height, width, channels=1)[..., 0] > 127


def _conservation(results: Results, name: str, method) -> None:
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


def write(results: Results, folder: str | Path) -> dict[str, Path]:
    """results.md, results.json and conservation.png (when LRP methods ran) into `folder`."""
    folder = Path(folder)
    paths = {"markdown": folder / "results.md", "json": folder / "results.json"}
    write_atomic(paths["markdown"], lambda tmp: Path(tmp).write_text(results.markdown()))
    payload = {**results.summary(), "per_image": results.values, "conservation": results.conservation}
    write_atomic(paths["json"], lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))
    if results.conservation:
        paths["plot"] = folder / "conservation.png"
        write_atomic(paths["plot"], lambda tmp: _plot_conservation(results, tmp))
    return paths


def _plot_conservation(results: Results, path: str) -> None:
    """Relevance totals against the model output, one panel per LRP method (the paper's Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(results.conservation)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
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
    plt.close(fig)
