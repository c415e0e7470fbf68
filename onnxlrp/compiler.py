"""Compiling: options and an analysed model -> the relevance graph, found in or added to the cache.

The result, :class:`Compiled`, is the relevance graph (a cache entry's path, or the
serialised model when there is no cache) and its :class:`Summary`, everything users of
an explainer need from the analysis. A cache hit needs neither analysis nor build.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import onnx

from .analysis import Analysis, analyse
from .errors import OnnxLrpError, SettingError
from .io.files import write_atomic
from .ir.merges import Merge
from .ir.model import ImageInput, readable_ir_version
from .lrp import relevance_graph as rg
from .lrp.heatmaps import INPUT, LAST, Heatmap
from .options import Options
from .runtime import cache as cache_store

Session = TypeVar("Session")


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
    heatmap: str = "pixel"  # lrp.heatmaps KINDS: what Explanation.heatmap() returns
    heatmap_layer: str | None = None  # the tensor a layer or gated map comes from
    # the output activation stripped after the logits (ir.canonicalise.OUTPUT_ACTIVATIONS: Softmax,
    # LogSoftmax, Sigmoid), None for a model that outputs its logits: the model's own output is
    # this activation of Explanation.logits
    output_activation: str | None = None
    concept_layer: str | None = None  # the tensor whose channels are concepts (lrp.conditional)
    concept_channels: int = 0  # how many it has
    concept_axis: int = 1  # their axis

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Summary:
        data = json.loads(text)
        data["image"] = ImageInput(**data["image"])
        data["merges"] = [Merge(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.items()}) for m in data["merges"]]
        return cls(**data)


@dataclass
class Compiled:
    """A compiled explainer: its summary, and the relevance graph in the cache (path) or in memory."""

    summary: Summary
    path: Path | None = None
    data: bytes | None = None

    @property
    def source(self) -> str | bytes:
        """What onnxruntime loads: the cache entry's path, or the serialised model."""
        return str(self.path) if self.path else self.data

    def onnx(self) -> onnx.ModelProto:
        return onnx.load(str(self.path)) if self.path else onnx.ModelProto.FromString(self.data)

    def save(self, path: str | Path) -> None:
        """Write the relevance graph as one self-contained ONNX file (a cache entry keeps its weights apart)."""
        if self.path:
            model = self.onnx()
            write_atomic(Path(path), lambda tmp: onnx.save(model, tmp))
        else:
            write_atomic(Path(path), lambda tmp: Path(tmp).write_bytes(self.data))


def analysis_of(model_file: Path, options: Options) -> Analysis:
    o = options
    return analyse(model_file, o.preset, o.split, None, o.image_size, dict(o.rules) or None)


def compile_or_load(model_file: Path, options: Options, open_session: Callable[[str | bytes], Session],
                    cache: bool = True, analysis: Callable[[], Analysis] | None = None) -> tuple[Compiled, Session]:
    """The compiled explainer for `model_file` and `options`, and a session opened on it.

    From the cache where an entry exists (held while the session opens, so that no other
    process prunes it meanwhile), else built and stored there. `analysis` supplies the
    model's analysis on a miss (default: analysed here)."""
    digest = options.digest() if cache and model_file.is_file() else None
    entry = cache_store.key(model_file, digest) if digest else None
    if entry:
        with cache_store.reading(cache_store.directory() / f"{entry}.onnx"):
            found = cache_store.lookup(entry)
            if found:
                path, text = found
                try:  # an entry damaged on disk is a miss
                    return Compiled(Summary.from_json(text), path), open_session(str(path))
                except OnnxLrpError:
                    pass
    summary, model = build(analysis() if analysis else analysis_of(model_file, options), options)
    compiled = Compiled(summary)
    if entry:
        compiled.path = cache_store.store(entry, model, summary.to_json())
    if compiled.path is None:  # no cache, or one that cannot be written
        compiled.data = model.SerializeToString()
    del model
    with cache_store.reading(compiled.path) if compiled.path else nullcontext():
        return compiled, open_session(compiled.source)


def build(analysis: Analysis, options: Options) -> tuple[Summary, onnx.ModelProto]:
    """The relevance graph of an analysed model under `options`, and its summary."""
    low, high = box_bounds(analysis, options)
    probe = options.probe
    if probe == "last":
        probe = analysis.graph.last_feature_map()
        if probe is None:
            raise SettingError(f"{analysis.path}: no global average pool, so no last conv block to probe")
    layer, layer_axis = heatmap_layer(analysis, options.heatmap)
    concepts, concept_axis, channels = concept_layer(analysis, options.concept_layer)
    compiled = rg.build(
        analysis.graph, analysis.rules, initial=analysis.preset.initial, bias=options.bias, low=low,
        high=high, ir_version=readable_ir_version(analysis.ir_version), opset=analysis.opset, trace=options.trace, probe=probe,
        heatmap=options.heatmap, layer=layer, layer_axis=layer_axis, pixel_axis=analysis.image.channel_axis,
        concept_layer=concepts, concept_axis=concept_axis,
    )
    if options.precision == "fp16":
        compiled = rg.to_float16(compiled)
    props = {p.key: p.value for p in compiled.metadata_props}
    summary = Summary(
        analysis.path, analysis.preset.name, analysis.split.method, analysis.split.include_identity,
        analysis.image, analysis.height, analysis.width, analysis.num_classes, analysis.merges,
        analysis.notes + _heatmap_note(options.heatmap, layer), analysis.warnings,
        json.loads(props.get(rg.TRACE_KEY, "[]")), probe, options.heatmap.kind, layer,
        output_activation=analysis.output_activation, concept_layer=concepts, concept_channels=channels,
        concept_axis=concept_axis,
    )
    return summary, compiled


def _heatmap_note(spec: Heatmap, layer: str | None) -> list[str]:
    if not spec.needs_layer:
        return []
    return [f"heatmap: {spec.describe(layer)}; it does not conserve relevance: the conservation figures "
            "are those of the pixel relevance it is computed with"]


def heatmap_layer(analysis: Analysis, spec: Heatmap) -> tuple[str | None, int]:
    """The tensor a layer or gated map is taken at, and its channel axis (find_layer)."""
    if not spec.needs_layer:
        return None, 1
    return find_layer(analysis, spec.layer, "layer map", (4,))


def concept_layer(analysis: Analysis, given: str | None) -> tuple[str | None, int, int]:
    """The tensor whose channels are concepts, its channel axis and how many channels it has."""
    if given is None:
        return None, 1, 0
    name, axis = find_layer(analysis, given, "concept layer", (2, 4))
    if name == analysis.graph.canonical.input.name:
        raise SettingError(f"{analysis.path}: the input's colour channels are no concepts; choose a layer "
                           "(onnxlrp graph lists the nodes)")
    shape = next(op.output.shape for op in analysis.graph.ops.values() if op.output.name == name)
    return name, axis, int(shape[axis])


def find_layer(analysis: Analysis, given: str, what: str, ranks: tuple[int, ...]) -> tuple[str, int]:
    """A layer's tensor (given by its name, its node's name, "last" or "input") and its channel
    axis: 1 by ONNX's convention, or the axis the global pooling over it keeps (a ReduceMean
    over rows and columns of a channels-last map)."""
    graph = analysis.graph
    name = {LAST: graph.last_feature_map(), INPUT: graph.canonical.input.name}.get(given, given)
    if name is None:
        raise SettingError(f"{analysis.path}: no global average pool, so no last conv block for the {what}")
    if name == graph.canonical.input.name:
        return name, analysis.image.channel_axis
    # a tensor name, or the name of the node that writes it (what `onnxlrp graph` lists)
    producer = graph.ops.get(name) or next((op for op in graph.ops.values() if op.output.name == name), None)
    if producer is None:
        raise SettingError(f"{analysis.path}: no node or tensor '{name}' on the path from the image to the logits "
                           "(onnxlrp graph lists the nodes)")
    name = producer.output.name
    shape = producer.output.shape
    if shape is None or len(shape) not in ranks:
        kinds = " or ".join(f"{r}-d" for r in ranks)
        raise SettingError(f"{analysis.path}: tensor '{name}' has shape {shape}; a {what} needs a {kinds} "
                           f"{'feature map' if ranks == (4,) else 'tensor'}")
    return name, graph.channel_axis(name) if len(shape) == 4 else 1


def box_bounds(analysis: Analysis, options: Options) -> tuple[np.ndarray, np.ndarray]:
    """The z^B box bounds as arrays shaped like one input image (batch axis 1): as given in
    the options, else the pixel range mapped through the preprocessing."""
    image = analysis.image
    default_low, default_high = options.preprocessing.bounds(image.channels)
    per_channel = []
    for given, default, which in ((options.low, default_low, "low"), (options.high, default_high, "high")):
        value = default if given is None else np.asarray(given, dtype=np.float32).reshape(-1)
        if value.size not in (1, image.channels):
            raise SettingError(f"{which} bound has {value.size} values; the model has {image.channels} channels")
        per_channel.append(np.broadcast_to(value, (image.channels,)).astype(np.float32))
    shape = [1, 1, 1, 1]
    shape[image.channel_axis] = image.channels
    full = image.shape(1, analysis.height, analysis.width)
    low, high = (np.broadcast_to(v.reshape(shape), full).copy() for v in per_channel)
    if np.any(low > high):
        raise SettingError("box bounds: low is above high")
    return low, high
