"""The model analysed: loaded, canonicalised, its DAG and merges found, a rule for every op.

This is the front of the pipeline (onnxlrp.ir, then the rule assignment of onnxlrp.lrp);
``onnxlrp graph`` prints it, and the compiler turns it into the relevance graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .ir.canonicalise import canonicalize
from .ir.graph import ModelGraph, build_graph
from .ir.merges import Merge
from .ir.model import (DEFAULT_IMAGE_SIZE, MIN_OPSET, ImageInput, default_opset, image_input, is_float16, load,
                       to_float32, with_image_size)
from .lrp.composites import Preset, get_preset
from .lrp.ops import make_op
from .lrp.rules import Rule
from .lrp.splitting import Split
from .options import resolve_split


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

    @property
    def output_activation(self) -> str | None:
        """The activation canonicalisation stripped after the logits (Softmax, LogSoftmax, Sigmoid), or None."""
        return self.graph.canonical.output_activation

    def rule_table(self) -> list[dict]:
        """One row per op on the data path: node, op type, shape info and rule."""
        rows = []
        for name, op in self.graph.ops.items():
            rule = self.rules[name]
            merge = self.graph.merge_at(name)
            rows.append({"node": name, "op_type": op.node.op, "info": op.describe(), "rule": rule.describe(op, merge)})
        return rows


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
    graph = build_graph(canonical, make_op, path)
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


