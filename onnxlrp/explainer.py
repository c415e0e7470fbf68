"""The Python API: ``Explainer(model, preset=...).explain(x)`` -> :class:`Explanation`.

An Explainer is three pieces put together: the compiled relevance graph (options ->
:mod:`onnxlrp.compiler`, cached), a :class:`~onnxlrp.runtime.session.Runner` that runs
it on a device in batches, and an :class:`~onnxlrp.io.preprocessing.ImageReader` for
image files.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from .analysis import Analysis
from .compiler import Compiled, Summary, analysis_of, compile_or_load
from .errors import DataError, OnnxLrpWarning, SettingError
from .explanation import Concepts, Explanation
from .io.preprocessing import ImageReader, Preprocessing
from .ir.merges import Merge
from .lrp import explosion as explode
from .lrp import relevance_graph as rg
from .options import Options, Runtime, resolve
from .runtime.session import Runner, session


class Explainer:
    """LRP for an ONNX image classifier, computed in onnxruntime.

    >>> explainer = Explainer("model.onnx", preset="epsilon-plus-flat", split="ratio")
    >>> result = explainer.explain(x)          # x: preprocessed float32 batch
    >>> result.relevance.shape == x.shape
    """

    def __init__(self, model: str | Path, options: Options | None = None, runtime: Runtime | None = None,
                 **settings: Any):
        """
        model: path to the .onnx file. options: what the relevance graph is (Options.make:
        preset, split, rules, bounds, heatmap, ...); runtime: where it runs (Runtime: device,
        threads, batch size, cache). Instead of the objects, their settings may be given by
        name, as shortcuts: ``Explainer(model, preset="epsilon", device="cuda")``.
        """
        self._setup(Path(model), *resolve(options, runtime, settings))

    def _setup(self, model: Path, options: Options, runtime: Runtime) -> None:
        self._analysis: Analysis | None = None
        self.model_file, self.options, self.runtime = model, options, runtime  # what a cache miss analyses
        compiled, sess = compile_or_load(model, options, lambda source: session(source, runtime.device, runtime.threads),
                                         runtime.cache, lambda: self.analysis)
        self._attach(compiled, sess, options, runtime.device)
        for message in self.summary.warnings:
            warnings.warn(message, OnnxLrpWarning, stacklevel=3)

    def _attach(self, compiled: Compiled, sess, options: Options, device: str) -> None:
        """The running pieces around a compiled graph: the runner and the image reader."""
        self.options, self.device, self.compiled = options, device, compiled
        summary, image = compiled.summary, compiled.summary.image
        self.runner = Runner(sess, image.batch)
        self.images = ImageReader(summary.height, summary.width, image.channels, image.layout, options.preprocessing)
        self.input_shape = image.shape(image.batch or 1, summary.height, summary.width)

    @classmethod
    def from_compiled(cls, compiled: Compiled, options: Options, device: str = "cpu",
                      threads: int | None = None) -> Explainer:
        """An explainer on a graph compiled elsewhere (a worker that received it from the driver):
        no model file is read, no graph built."""
        explainer = cls.__new__(cls)
        explainer._analysis = None
        explainer.runtime = Runtime(device=device, threads=threads, cache=False)
        explainer.model_file = Path(compiled.summary.model)
        explainer._attach(compiled, session(compiled.source, device, threads), options, device)
        return explainer

    def portable(self) -> Portable:
        """The compiled explainer as it travels to another process (pickle it, or send it to Ray)."""
        return Portable(self.compiled.onnx().SerializeToString(), self.summary.to_json(), self.options)

    # What the compiled explainer knows
    @property
    def summary(self) -> Summary:
        return self.compiled.summary

    @property
    def session(self):
        return self.runner.session

    @property
    def model_path(self) -> Path | None:
        """The cache entry the explainer runs from, None when it is held in memory."""
        return self.compiled.path

    @property
    def preprocessing(self) -> Preprocessing:
        return self.options.preprocessing

    @property
    def bias(self) -> bool:
        return self.options.bias

    @property
    def analysis(self) -> Analysis:
        """The model's analysis (graph, merges, rules); recomputed on demand for a cached explainer."""
        if self._analysis is None:
            self._analysis = analysis_of(self.model_file, self.options)
        return self._analysis

    @property
    def onnx(self) -> onnx.ModelProto:
        """The compiled explainer as an ONNX model."""
        return self.compiled.onnx()

    @property
    def merges(self) -> list[Merge]:
        return self.summary.merges

    @property
    def num_classes(self) -> int:
        return self.summary.num_classes

    @property
    def trace_nodes(self) -> list[str]:
        return self.summary.trace_nodes

    def targets(self, target, n: int) -> np.ndarray:
        """The int64 target per image (-1: the top-1 class); a one-line error for a class out of range."""
        if target is None:
            return np.full(n, -1, dtype=np.int64)  # -1: the graph picks the top-1 class
        targets = np.asarray(target, dtype=np.int64).reshape(-1)
        if targets.size == 1:
            targets = np.full(n, targets[0], dtype=np.int64)
        if len(targets) != n:
            raise SettingError(f"{len(targets)} targets for {n} images")
        bad = targets[(targets < 0) | (targets >= self.num_classes)]
        if bad.size:
            raise SettingError(
                f"target class {int(bad[0])} out of range: the model has {self.num_classes} classes "
                f"(0..{self.num_classes - 1})"
            )
        return targets.copy()

    def explain(self, x: np.ndarray, target=None, batch_size: int | None = None, top_k: int | None = None,
                warn: bool = True, concepts=None) -> Explanation:
        """Explain a preprocessed batch. target: None (top-1), a class for all, or one per image.
        top_k: explain each image's k best classes instead, in one batched run; the result then
        has k rows per image (image 0's best, second best, ..., then image 1's).
        concepts (an Explainer with a concept_layer): K, each image's K most relevant channels;
        or channels of the layer, the same for every image ([c1, c2, ...]) or per image ([N, K]);
        or sets of channels, a condition each ([(c1, c2), c3]: c1 and c2 together, then c3;
        per image [N, K, S]);
        Explanation.concepts then holds each one's conditional relevance, from the same forward
        pass (rows of batch_size // K images per run; K > batch_size: several runs).
        Relevance that exploded (NaN/Inf, set to 0, or totals far beyond the initial relevance)
        is in Explanation.explosion, and warned about unless warn=False."""
        x = np.asarray(x, dtype=np.float32)
        expected = self.input_shape[1:]
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(expected):
            raise DataError(f"input batch has shape {list(x.shape)}; the model expects [N, {', '.join(map(str, expected))}]")
        if top_k is not None:
            if target is not None or not 1 <= top_k <= self.num_classes:
                raise SettingError(f"top_k must be 1..{self.num_classes}, without target")
            targets = np.tile(-np.arange(1, top_k + 1, dtype=np.int64), len(x))  # -r: the r-th best class
            x = np.repeat(x, top_k, axis=0)
        else:
            targets = self.targets(target, len(x))
        batch_size = batch_size or self.runtime.batch_size
        conditions = self.conditions(concepts, len(x) // (top_k or 1))
        if conditions is None:
            out = self.runner.run({rg.INPUT: x, rg.TARGET: targets}, batch_size)
        else:
            if top_k is not None:
                conditions = np.repeat(conditions, top_k, axis=0)
            out = self._run_conditions(x, targets, conditions, batch_size)
        merges = out.get(rg.MERGE_SUMS, np.zeros((len(x), 0, 3), np.float32))
        probe = (out[rg.PROBE_ACTIVATION], out[rg.PROBE_RELEVANCE]) if self.summary.probe else None
        preset = self.options.preset
        conserving = preset.initial != "one" and self.options.split.method != "copy"
        relevance, explosion = explode.check(out[rg.RELEVANCE], out[rg.INITIAL], merges,
                                             [m.node for m in self.merges], conserving)
        maps = out.get(rg.HEATMAP)
        if maps is not None and not np.isfinite(maps).all():  # where the relevance exploded: set to 0 too
            maps = np.where(np.isfinite(maps), maps, np.float32(0))
        found = None
        if concepts is not None:
            found = self._concepts(out)
            # a conditional map that is not finite is an explosion of its image, reported as one
            broken = ~np.isfinite(out[rg.CONCEPT_RELEVANCE].reshape(len(x), -1)).all(axis=1)
            explosion = explode.including(explosion, broken, f"in a conditional map below {self.summary.concept_layer}")
        if explosion.images and warn:
            warnings.warn(explode.message(explosion, preset.name, self.options.bias), OnnxLrpWarning, stacklevel=2)
        return Explanation(
            relevance, out[rg.LOGITS], out[rg.TARGETS], out[rg.INITIAL], merges,
            self.merges, self.summary.image.layout, out.get(rg.LAYER_SUMS), list(self.trace_nodes), probe,
            explosion, maps, out.get(rg.ABSORBED) if conserving else None, found,
        )

    def conditions(self, concepts, n: int) -> np.ndarray | None:
        """concepts as explain() takes them -> int64 [n, K, S], each condition a set of S channels
        (-r: the r-th most relevant channel; a shorter set padded with its first channel, which
        counts once); None without a concept layer (then concepts must be None too)."""
        layer, count = self.summary.concept_layer, self.summary.concept_channels
        if layer is None:
            if concepts is not None:
                raise SettingError("concepts need an Explainer with a concept layer (concept_layer=, e.g. \"last\")")
            return None
        if concepts is None:  # the cheapest condition, not returned
            return np.full((n, 1, 1), -1, dtype=np.int64)
        if isinstance(concepts, (int, np.integer)):
            if not 1 <= concepts <= count:
                raise SettingError(f"concepts {concepts}: the concept layer '{layer}' has {count} channels")
            return np.tile(-np.arange(1, concepts + 1, dtype=np.int64).reshape(1, -1, 1), (n, 1, 1))
        if isinstance(concepts, (list, tuple)) and any(isinstance(c, (list, tuple, set, frozenset)) for c in concepts):
            sets = [sorted(c) if isinstance(c, (set, frozenset)) else list(np.atleast_1d(c)) for c in concepts]
            if any(len(c) == 0 for c in sets):
                raise SettingError("concepts: an empty set of channels")
            width = max(len(c) for c in sets)
            concepts = np.array([c + c[:1] * (width - len(c)) for c in sets])[None].repeat(n, axis=0)
        chosen = np.asarray(concepts, dtype=np.int64)
        if chosen.ndim == 1:  # channels, the same for every image
            chosen = np.tile(chosen.reshape(1, -1), (n, 1))
        if chosen.ndim == 2:  # one channel per condition
            chosen = chosen[..., None]
        if chosen.ndim != 3 or len(chosen) != n or 0 in chosen.shape[1:]:
            raise SettingError(f"concepts: {list(np.shape(concepts))} channels for {n} images; give K, channels or "
                               "sets of channels, or one list per image")
        bad = chosen[(chosen < 0) | (chosen >= count)]
        if bad.size:
            raise SettingError(f"channel {int(bad[0])} out of range: the concept layer '{layer}' has {count} "
                               f"channels (0..{count - 1})")
        return chosen

    def _run_conditions(self, x: np.ndarray, targets: np.ndarray, conditions: np.ndarray,
                        batch_size: int) -> dict[str, np.ndarray]:
        """The graph on images and conditions, within batch_size rows per run: each image's K
        conditions are K rows of the pass below the concept layer."""
        k = conditions.shape[1]
        per_run = max(1, batch_size // k)
        groups = [conditions[:, i:i + batch_size] for i in range(0, k, batch_size)] if k > batch_size else [conditions]
        runs = [self.runner.run({rg.INPUT: x, rg.TARGET: targets, rg.CONCEPT: group}, per_run) for group in groups]
        out = runs[0]
        for name in (rg.CONCEPT_RELEVANCE, rg.CONCEPT_CHANNELS):
            out[name] = np.concatenate([run[name] for run in runs], axis=1)
        return out

    def _concepts(self, out: dict[str, np.ndarray]) -> Concepts:
        """The conditional maps, NaN/Inf set to 0 (explain() reports them with the explosions)."""
        relevance = out[rg.CONCEPT_RELEVANCE]
        if not np.isfinite(relevance).all():
            relevance = np.where(np.isfinite(relevance), relevance, np.float32(0))
        return Concepts(self.summary.concept_layer, out[rg.CONCEPT_CHANNELS], relevance, out[rg.CHANNEL_RELEVANCE],
                        out[rg.CHANNEL_ACTIVATION], self.summary.image.layout)

    # Image files
    def load_images(self, paths: Sequence[str | Path]) -> tuple[list[Path], np.ndarray]:
        """Read image files (folders expand to their images): (files, uint8 [N, H, W, C])."""
        return self.images.load(list(paths))

    def read_images(self, files: Sequence[Path]) -> np.ndarray:
        """uint8 [N, H, W, C] as the model sees them (scaled, centre-cropped)."""
        return self.images.read(list(files))

    def explain_files(self, paths: Sequence[str | Path], target=None, batch_size: int | None = None) -> tuple[Explanation, np.ndarray]:
        """Explain image files: (explanation, the uint8 images as the model saw them)."""
        _, pixels = self.load_images(paths)
        return self.explain(self.images.normalize(pixels), target, batch_size), pixels

    def save(self, path: str | Path) -> None:
        """Write the explainer as an ONNX model that runs in plain onnxruntime."""
        self.compiled.save(path)


@dataclass(frozen=True)
class Portable:
    """A compiled explainer on its way to a worker: the relevance graph (bytes, or a Ray
    ObjectRef to them, so that a cluster ships it once), its summary and its options.
    open() gives the worker its Explainer without reading the model or building a graph."""

    graph: Any
    summary: str
    options: Options

    def open(self, device: str = "cpu", threads: int | None = None) -> Explainer:
        graph = self.graph
        if not isinstance(graph, bytes):
            import ray

            graph = ray.get(graph)
        return Explainer.from_compiled(Compiled(Summary.from_json(self.summary), data=graph), self.options, device,
                                       threads)

    def stored(self, ray) -> Portable:
        """The same, with the graph put in Ray's object store (once for all actors)."""
        return Portable(ray.put(self.graph), self.summary, self.options)
