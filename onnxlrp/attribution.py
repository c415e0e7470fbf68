"""The Python API: ``Explainer(model, preset=...).explain(x)`` -> :class:`Explanation`.

It strings the pipeline together: load -> canonicalise -> DAG, merges, rules ->
relevance graph -> onnxruntime session.
"""
from __future__ import annotations

import json
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from . import cache as cache_store
from . import explosion as explode
from . import fingerprint
from . import relevance_graph as rg
from .canonizers import canonicalize
from .composites import Preset, get_preset
from .errors import OnnxLrpError, OnnxLrpWarning
from .explosion import Explosion
from .files import write_atomic
from .graph import ModelGraph, build_graph
from .merges import Merge
from .model import (DEFAULT_IMAGE_SIZE, MIN_OPSET, ImageInput, default_opset, image_input, is_float16, load,
                    to_float32, with_image_size)
from .preprocessing import Preprocessing, get_preprocessing, image_files, load_images
from .rules import Rule
from .runtime import run_batched, session
from .splitting import Split


PRECISIONS = ("fp32", "fp16")


@dataclass
class Analysis:
    """A model read, canonicalised and given its rules: everything but the relevance graph."""

    path: str
    preset: Preset
    split: Split
    image: ImageInput
    height: int
    width: int
    graph: ModelGraph
    rules: dict[str, Rule]
    opset: int
    ir_version: int
    notes: list[str] = field(default_factory=list)  # what canonicalisation changed
    warnings: list[str] = field(default_factory=list)  # where the result differs from what was asked

    @property
    def merges(self) -> list[Merge]:
        return self.graph.merges

    @property
    def num_classes(self) -> int:
        return int(self.graph.canonical.logits.shape[1])

    def rule_table(self) -> list[dict]:
        """One row per op on the data path: node, op type, shape info and rule."""
        rows = []
        for name, op in self.graph.ops.items():
            rule = self.rules[name]
            merge = self.graph.merge_at(name)
            rows.append({"node": name, "op_type": op.node.op, "info": op.describe(), "rule": rule.describe(op, merge)})
        return rows


def resolve_split(preset: Preset, split: str | Split | None, include_identity: bool | None) -> Split:
    """The Split rule asked for: a Split as given, else by name, with the preset's defaults."""
    if isinstance(split, Split):
        return split
    try:
        return Split(split or preset.split, preset.include_identity if include_identity is None else include_identity)
    except ValueError as exc:
        raise OnnxLrpError(str(exc)) from None


@dataclass(frozen=True)
class Options:
    """Everything that shapes the compiled relevance graph, resolved (a Split, not a name).

    Frozen and made of plain values, so it pickles and travels; its fingerprint, with the
    model file's content, is the cache key: anything that changes the graph changes the key.
    """

    preset: Preset
    split: Split
    bias: bool = True
    low: tuple[float, ...] | None = None  # z^B box bounds as given (per channel or one value)
    high: tuple[float, ...] | None = None
    preprocessing: Preprocessing = field(default_factory=lambda: get_preprocessing("imagenet"))
    image_size: tuple[int, int] | None = None
    rules: tuple[tuple[str, Rule], ...] = ()  # overrides, by node name or op type
    trace: bool = False
    precision: str = "fp32"
    probe: str | None = None

    def digest(self) -> str | None:
        """A digest of every field, or None where one cannot be described (a callable object as modifier)."""
        try:
            return fingerprint.digest(self)
        except fingerprint.Unfingerprintable:
            return None


def _bound(value) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1))


def analyse(
    model: str | Path,
    preset: str | Preset = "epsilon-plus-flat",
    split: str | Split | None = None,
    include_identity: bool | None = None,
    image_size: tuple[int, int] | None = None,
    rules: Mapping[str, Rule] | None = None,
) -> Analysis:
    path = str(model)
    preset = get_preset(preset)
    split_rule = resolve_split(preset, split, include_identity)
    proto = load(path)
    notes = []
    if is_float16(proto):
        proto = to_float32(proto)
        notes.append("float16 model: explained in float32")
    image = image_input(proto, path)
    height, width = image_size or (image.height or DEFAULT_IMAGE_SIZE, image.width or DEFAULT_IMAGE_SIZE)
    proto = with_image_size(proto, image, height, width, path)
    canonical = canonicalize(proto, image, fold_batchnorm=preset.fold_batchnorm, path=path)
    graph = build_graph(canonical, path)
    assigned = preset.assign(graph, split_rule, rules)
    analysis = Analysis(
        path, preset, split_rule, image, height, width, graph, assigned,
        opset=max(default_opset(proto), MIN_OPSET), ir_version=max(proto.ir_version, 8), notes=notes + canonical.notes,
    )
    if not preset.fold_batchnorm and canonical.batchnorms == 0 and preset.name == "paper":
        analysis.warnings.append(
            f"{path}: no BatchNormalization nodes; if the exporter folded them into the convs, preset "
            "'paper' runs z+ on BN-scaled weights and only approximates the published implementation "
            "(export with BatchNorm kept to reproduce it exactly)"
        )
    return analysis


@dataclass
class Explanation:
    """Input relevance for a batch, with the numbers needed to audit conservation."""

    relevance: np.ndarray  # same shape and layout as the model input
    logits: np.ndarray  # [N, K]
    targets: np.ndarray  # [N] the classes explained
    initial: np.ndarray  # [N] relevance the pass started from (target logit or probability)
    merge_sums: np.ndarray  # [N, M, 3]: sums of R, R_skip, R_main at each merge
    merges: list[Merge]
    layout: str = "NCHW"
    layer_sums: np.ndarray | None = None  # [N, L, 2] with trace=True: per op, relevance out and in
    layer_names: list[str] = field(default_factory=list)  # the L ops, in forward order
    probe: tuple[np.ndarray, np.ndarray] | None = None  # with probe=: (activation, relevance) there
    explosion: Explosion | None = None  # images whose relevance exploded (NaN/Inf are set to 0)

    def layer_report(self, index: int = 0) -> list[dict]:
        """With trace=True: per op (forward order), the relevance at its output, what it passed
        to its inputs, and the share it absorbed (negative: created)."""
        if self.layer_sums is None:
            raise OnnxLrpError("build the Explainer with trace=True to get per-layer relevance")
        return [
            {"node": name, "out": float(out), "in": float(inp), "absorbed": float((out - inp) / out) if out else 0.0}
            for name, (out, inp) in zip(self.layer_names, self.layer_sums[index])
        ]

    @property
    def input_sum(self) -> np.ndarray:
        """[N] total relevance at the input."""
        return self.relevance.reshape(len(self.relevance), -1).sum(axis=1, dtype=np.float64)

    @property
    def absorbed(self) -> np.ndarray:
        """[N] relevance that biases and stabilisers absorbed (negative: created) on the way down."""
        return self.initial.astype(np.float64) - self.input_sum

    @property
    def conservation_error(self) -> np.ndarray:
        """[N] |input sum - initial relevance| / |initial relevance|."""
        return np.abs(self.absorbed) / np.maximum(np.abs(self.initial), 1e-30)

    def heatmap(self) -> np.ndarray:
        """[N, H, W] relevance summed over colour channels."""
        return self.relevance.sum(axis=1 if self.layout == "NCHW" else 3)

    def merge_report(self, index: int = 0) -> list[dict]:
        """Per merge: node, skip kind, and R, R_skip, R_main summed over image `index`."""
        return [
            {"node": m.node, "kind": m.kind, "R": float(s[0]), "R_skip": float(s[1]), "R_main": float(s[2])}
            for m, s in zip(self.merges, self.merge_sums[index])
        ]


@dataclass
class Summary:
    """What users of an explainer need from its analysis; stored with the compiled model."""

    model: str
    preset: str
    split: str
    include_identity: bool
    image: ImageInput
    height: int
    width: int
    num_classes: int
    merges: list[Merge]
    notes: list[str]
    warnings: list[str]
    trace_nodes: list[str]
    probe: str | None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Summary:
        data = json.loads(text)
        data["image"] = ImageInput(**data["image"])
        data["merges"] = [Merge(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.items()}) for m in data["merges"]]
        return cls(**data)


class Explainer:
    """LRP for an ONNX image classifier, computed in onnxruntime.

    >>> explainer = Explainer("model.onnx", preset="epsilon-plus-flat", split="ratio")
    >>> result = explainer.explain(x)          # x: preprocessed float32 batch
    >>> result.relevance.shape == x.shape
    """

    def __init__(
        self,
        model: str | Path,
        preset: str | Preset = "epsilon-plus-flat",
        split: str | Split | None = None,
        include_identity: bool | None = None,
        bias: bool = True,
        low: float | Sequence[float] | None = None,
        high: float | Sequence[float] | None = None,
        device: str = "cpu",
        preprocessing: str | Preprocessing = "imagenet",
        image_size: tuple[int, int] | None = None,
        rules: Mapping[str, Rule] | None = None,
        threads: int | None = None,
        trace: bool = False,
        precision: str = "fp32",
        probe: str | None = None,
        cache: bool = True,
    ):
        """
        model: path to the .onnx file. preset: a name from onnxlrp.PRESETS. split: symmetric,
        ratio or proportional (default: the preset's, ratio). include_identity: whether identity
        skips take part in the split (False sends their relevance down the main branch).
        bias: False drops biases from every rule (Zennit's zero_params=['bias']), which makes
        conserving presets conserve. low/high: z^B box bounds, scalars or per channel (default:
        pixel range mapped through `preprocessing`). device: cpu or cuda. rules: overrides,
        keyed by node name or op type. trace: also report the relevance total at the output of
        every op (Explanation.layer_sums), to see where relevance is absorbed. precision: "fp16"
        runs the relevance pass in float16 (inputs and outputs stay float32), for GPUs. probe: a
        tensor name ("last" for the last conv block's output) whose activation and relevance are
        returned too (Explanation.probe). cache: reuse a compiled explainer from the on-disk cache
        (onnxlrp.cache) when model and options are the same, and store new ones there.
        """
        if precision not in PRECISIONS:
            raise OnnxLrpError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
        preset = get_preset(preset)
        self.options = Options(
            preset, resolve_split(preset, split, include_identity), bias, _bound(low), _bound(high),
            get_preprocessing(preprocessing), tuple(image_size) if image_size else None,
            tuple((rules or {}).items()), trace, precision, probe,
        )
        self.device = device
        self.model_file = Path(model)
        self._analysis: Analysis | None = None
        self._model_bytes: bytes | None = None
        self.model_path: Path | None = None
        digest = self.options.digest() if cache and self.model_file.is_file() else None
        entry = cache_store.key(self.model_file, digest) if digest else None
        found = None
        if entry:  # held while the session loads: no other process prunes the entry meanwhile
            with cache_store.reading(cache_store.directory() / f"{entry}.onnx"):
                found = cache_store.lookup(entry)
                if found:
                    self.model_path, text = found
                    self.summary = Summary.from_json(text)
                    try:  # an entry damaged on disk is a miss
                        self.session = session(str(self.model_path), device, threads)
                    except OnnxLrpError:
                        found, self.model_path = None, None
        if not found:
            self.summary, compiled = self._build()
            if entry:
                self.model_path = cache_store.store(entry, compiled, self.summary.to_json())
            if self.model_path is None:  # no cache, or one that cannot be written
                self._model_bytes = compiled.SerializeToString()
            del compiled
            with cache_store.reading(self.model_path) if self.model_path else nullcontext():
                self.session = session(str(self.model_path) if self.model_path else self._model_bytes, device, threads)
        for message in self.summary.warnings:
            warnings.warn(message, OnnxLrpWarning, stacklevel=2)
        image = self.summary.image
        self.input_shape = image.shape(image.batch or 1, self.summary.height, self.summary.width)

    def _build(self) -> tuple[Summary, onnx.ModelProto]:
        options, analysis = self.options, self.analysis
        bounds = self._bounds(options.low, options.high)
        probe = options.probe
        if probe == "last":
            probe = analysis.graph.last_feature_map()
            if probe is None:
                raise OnnxLrpError(f"{analysis.path}: no global average pool, so no last conv block to probe")
        compiled = rg.build(
            analysis.graph, analysis.rules, initial=analysis.preset.initial, bias=options.bias, low=bounds[0],
            high=bounds[1], ir_version=analysis.ir_version, opset=analysis.opset, trace=options.trace, probe=probe,
        )
        if options.precision == "fp16":
            compiled = rg.to_float16(compiled)
        props = {p.key: p.value for p in compiled.metadata_props}
        summary = Summary(
            analysis.path, analysis.preset.name, analysis.split.method, analysis.split.include_identity,
            analysis.image, analysis.height, analysis.width, analysis.num_classes, analysis.merges,
            analysis.notes, analysis.warnings, json.loads(props.get(rg.TRACE_KEY, "[]")), probe,
        )
        return summary, compiled

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
            o = self.options
            self._analysis = analyse(self.model_file, o.preset, o.split, None, o.image_size, dict(o.rules) or None)
        return self._analysis

    @property
    def onnx(self) -> onnx.ModelProto:
        """The compiled explainer as an ONNX model."""
        return onnx.load(str(self.model_path)) if self.model_path else onnx.ModelProto.FromString(self._model_bytes)

    def _bounds(self, low, high) -> tuple[np.ndarray, np.ndarray]:
        """Box bounds as arrays shaped like one input image (batch axis 1)."""
        image = self.analysis.image
        default_low, default_high = self.preprocessing.bounds(image.channels)
        per_channel = []
        for given, default, which in ((low, default_low, "low"), (high, default_high, "high")):
            value = default if given is None else np.asarray(given, dtype=np.float32).reshape(-1)
            if value.size not in (1, image.channels):
                raise OnnxLrpError(f"{which} bound has {value.size} values; the model has {image.channels} channels")
            per_channel.append(np.broadcast_to(value, (image.channels,)).astype(np.float32))
        shape = [1, 1, 1, 1]
        shape[image.channel_axis] = image.channels
        full = image.shape(1, self.analysis.height, self.analysis.width)
        low_arr, high_arr = (np.broadcast_to(v.reshape(shape), full).copy() for v in per_channel)
        if np.any(low_arr > high_arr):
            raise OnnxLrpError("box bounds: low is above high")
        return low_arr, high_arr

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
            raise OnnxLrpError(f"{len(targets)} targets for {n} images")
        bad = targets[(targets < 0) | (targets >= self.num_classes)]
        if bad.size:
            raise OnnxLrpError(
                f"target class {int(bad[0])} out of range: the model has {self.num_classes} classes "
                f"(0..{self.num_classes - 1})"
            )
        return targets.copy()

    def explain(self, x: np.ndarray, target=None, batch_size: int = 16, top_k: int | None = None,
                warn: bool = True) -> Explanation:
        """Explain a preprocessed batch. target: None (top-1), a class for all, or one per image.
        top_k: explain each image's k best classes instead, in one batched run; the result then
        has k rows per image (image 0's best, second best, ..., then image 1's).
        Relevance that exploded (NaN/Inf, set to 0, or totals far beyond the initial relevance)
        is in Explanation.explosion, and warned about unless warn=False."""
        x = np.asarray(x, dtype=np.float32)
        expected = self.input_shape[1:]
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(expected):
            raise OnnxLrpError(f"input batch has shape {list(x.shape)}; the model expects [N, {', '.join(map(str, expected))}]")
        if top_k is not None:
            if target is not None or not 1 <= top_k <= self.num_classes:
                raise OnnxLrpError(f"top_k must be 1..{self.num_classes}, without target")
            targets = np.tile(-np.arange(1, top_k + 1, dtype=np.int64), len(x))  # -r: the r-th best class
            x = np.repeat(x, top_k, axis=0)
        else:
            targets = self.targets(target, len(x))
        out = run_batched(self.session, {rg.INPUT: x, rg.TARGET: targets}, batch_size, self.summary.image.batch)
        merges = out.get(rg.MERGE_SUMS, np.zeros((len(x), 0, 3), np.float32))
        probe = (out[rg.PROBE_ACTIVATION], out[rg.PROBE_RELEVANCE]) if self.summary.probe else None
        preset = self.options.preset
        conserving = preset.initial != "one" and self.options.split.method != "copy"
        relevance, explosion = explode.check(out[rg.RELEVANCE], out[rg.INITIAL], merges,
                                             [m.node for m in self.merges], conserving)
        if explosion.images and warn:
            warnings.warn(explode.message(explosion, preset.name, self.options.bias), OnnxLrpWarning, stacklevel=2)
        return Explanation(
            relevance, out[rg.LOGITS], out[rg.TARGETS], out[rg.INITIAL], merges,
            self.merges, self.summary.image.layout, out.get(rg.LAYER_SUMS), list(self.trace_nodes), probe,
            explosion,
        )

    def load_images(self, paths: Sequence[str | Path]) -> tuple[list[Path], np.ndarray]:
        """Read image files (folders expand to their images): (files, uint8 [N, H, W, C])."""
        files = image_files(list(paths))
        return files, self.read_images(files)

    def read_images(self, files: Sequence[Path]) -> np.ndarray:
        """uint8 [N, H, W, C] as the model sees them (scaled, centre-cropped)."""
        summary = self.summary
        return load_images(list(files), summary.height, summary.width, summary.image.channels)

    def explain_files(self, paths: Sequence[str | Path], target=None, batch_size: int = 16) -> tuple[Explanation, np.ndarray]:
        """Explain image files: (explanation, the uint8 images as the model saw them)."""
        _, pixels = self.load_images(paths)
        x = self.preprocessing.normalize(pixels, self.summary.image.layout)
        return self.explain(x, target, batch_size), pixels

    def save(self, path: str | Path) -> None:
        """Write the explainer as an ONNX model that runs in plain onnxruntime."""
        if self.model_path:  # a cache entry keeps its weights apart; the saved file holds them
            model = self.onnx
            write_atomic(Path(path), lambda tmp: onnx.save(model, tmp))
        else:
            write_atomic(Path(path), lambda tmp: Path(tmp).write_bytes(self._model_bytes))
