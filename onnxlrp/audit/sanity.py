"""Sanity of the explanations (Adebayo et al. 2018; Sixt et al. 2020).

Model-parameter randomisation: the weights of the top layer, then of more and more layers
(top down), are replaced by random values of the same spread in the ONNX graph; heatmaps of
the randomised models must differ from the original's. Random logit: explaining a random
other class must give a different map. Both report Spearman rank correlations of |R|
(a map that merely flips sign is the same explanation); an explainer that fails them is
reported, not hidden.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..ir.model import constants_to_initializers
from ..lrp.ops import facts
from .statistics import rank_correlation

#: the cascade: share of the weighted layers randomised, top down
STEPS = (0.0, 0.25, 0.5, 1.0)  # 0.0: the top layer alone


@dataclass
class Randomisation:
    steps: list[tuple[str, int, float]]  # (label, layers randomised, mean rank correlation)

    @property
    def final(self) -> float:
        return self.steps[-1][2] if self.steps else float("nan")


def weighted_layers(model: onnx.ModelProto) -> list[str]:
    """The float weight initializers of the layers with a learned kernel (an adapter's
    weight_input: Conv, Gemm, MatMul), top (output) first."""
    initializers = {init.name: init for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        adapter = facts(node.op_type)
        index = adapter.weight_input if adapter is not None else None
        if index is not None and len(node.input) > index and node.input[index] in initializers:
            if initializers[node.input[index]].data_type == onnx.TensorProto.FLOAT:
                names.append(node.input[index])
    return names[::-1]


def randomised(model: onnx.ModelProto, names: list[str], seed: int = 0) -> onnx.ModelProto:
    """A copy with those weights drawn from N(0, their standard deviation)."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    rng = np.random.default_rng(seed)
    wanted = set(names)
    for init in copy.graph.initializer:
        if init.name in wanted:
            values = numpy_helper.to_array(init)
            fresh = rng.normal(0.0, float(values.std()) or 1e-2, values.shape).astype(values.dtype)
            init.CopyFrom(numpy_helper.from_array(fresh, init.name))
    return copy


def cascade(model_path: Path, explain, x: np.ndarray, targets: np.ndarray, seed: int = 0):
    """explain(path, x, targets) -> heatmaps [N, H, W] on copies of the model with more and more
    layers randomised (STEPS, top down): (label, layers randomised, maps) per step."""
    model = onnx.load(str(model_path))
    constants_to_initializers(model)  # weights written as Constant nodes (paddle2onnx) are weights too
    layers = weighted_layers(model)
    if not layers:  # e.g. an int8 model: its weights are integers behind DequantizeLinear
        return
    with tempfile.TemporaryDirectory(prefix="onnxlrp-audit-") as folder:
        done = -1
        for share in STEPS:
            count = max(1, int(round(share * len(layers))))
            if count == done:
                continue
            done = count
            path = Path(folder) / f"random_{count}.onnx"
            onnx.save(randomised(model, layers[:count], seed), str(path))
            label = "top layer" if count == 1 else f"top {count} of {len(layers)} layers"
            yield label, count, explain(path, x, targets)


def correlation(heatmaps: np.ndarray, maps: np.ndarray) -> float:
    """Mean rank correlation of |R|: a map that only changed sign (a random top layer can flip
    it) has not changed."""
    return float(np.mean([rank_correlation(np.abs(a), np.abs(b)) for a, b in zip(heatmaps, maps)]))


def randomisation(model_path: Path, explain, x: np.ndarray, targets: np.ndarray, heatmaps: np.ndarray,
                  seed: int = 0) -> Randomisation:
    """explain(path, x, targets) -> heatmaps [N, H, W]; the cascade's rank correlations."""
    return Randomisation([(label, count, correlation(heatmaps, maps))
                          for label, count, maps in cascade(model_path, explain, x, targets, seed)])


def other_classes(targets: np.ndarray, classes: int, seed: int = 0) -> np.ndarray:
    """A random class other than each target."""
    rng = np.random.default_rng(seed)
    shift = rng.integers(1, classes, size=len(targets))
    return (targets + shift) % classes
