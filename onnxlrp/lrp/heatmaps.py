"""The heatmap a relevance pass ends in: pixel, layer (Relevance-CAM) or gated.

- ``pixel``: the input relevance summed over colour channels (the LRP heatmap).
- ``layer``: Relevance-CAM (Lee et al., CVPR 2021): the relevance at an intermediate
  tensor, by default the last conv block's output, summed over its channels and upsampled
  bilinearly to the image (ONNX Resize, linear, half-pixel centres). Class-discriminative
  and smooth like Grad-CAM, from the same one relevance pass.
- ``gated``: the pixel map times a gate, the upsampled positive layer map raised to a power
  (2 by default) and scaled to [0, 1] per image (as Guided Grad-CAM gates guided backprop by
  Grad-CAM): fine detail survives only where the coarse map places the class evidence, the
  more so the higher the power. Zero wherever the layer map is <= 0. The power 2 was chosen
  on the shipped benchmark (README, "Layer maps and gated maps").

All three are computed inside the relevance graph (output ``heatmap``), so a compiled
explainer carries its map with it. A layer or gated map does not conserve relevance; the
conservation figures (input total, merges) stay those of the pixel relevance below it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import SettingError
from .emit import Emitter

KINDS = ("pixel", "layer", "gated")
LAST = "last"  # the last conv block's output: the tensor the final global pooling averages
INPUT = "input"  # the image input itself (a layer map there is the pixel map)


@dataclass(frozen=True)
class Heatmap:
    """Which map the explainer returns. layer: a node or tensor name of the model, "last" or
    "input". power: the gate's exponent (gated maps)."""

    kind: str = "pixel"
    layer: str = LAST
    power: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SettingError(f"unknown heatmap '{self.kind}'; choose one of {', '.join(KINDS)}")
        if not self.power > 0:
            raise SettingError(f"heatmap gate power must be positive, got {self.power}")

    @property
    def needs_layer(self) -> bool:
        return self.kind != "pixel"

    def describe(self, tensor: str | None = None) -> str:
        where = tensor or self.layer
        return {"pixel": "pixel relevance (channel sum)",
                "layer": f"layer relevance at {where} (Relevance-CAM)",
                "gated": f"pixel relevance gated by the positive layer relevance at {where}"
                         + (f" to the power {self.power:g}" if self.power != 1 else "")}[self.kind]


def emit(e: Emitter, spec: Heatmap, pixel: gs.Tensor, pixel_axis: int, layer: gs.Tensor | None,
         layer_axis: int, height: int, width: int) -> gs.Tensor:
    """The map [N, H, W] from the input relevance `pixel` (channel axis `pixel_axis`) and the
    relevance at the layer (channel axis `layer_axis`; its two other non-batch axes are rows and
    columns, in that order)."""
    with e.scope("heatmap"):
        pixels = e.reduce_sum(pixel, [pixel_axis])
        if spec.kind == "pixel":
            return pixels
        coarse = upsample(e, e.reduce_sum(layer, [layer_axis]), height, width)
        if spec.kind == "layer":
            return coarse
        gate = e.op("Relu", coarse)
        if spec.power != 1:
            gate = e.op("Pow", gate, np.float32(spec.power))
        # the per-image maximum: GlobalMaxPool (ReduceMax changes its signature at opset 18, and
        # the float16 converter keeps TopK and Max in float32)
        top = e.op("Squeeze", e.op("GlobalMaxPool", e.op("Unsqueeze", gate, e.ints([1]))), e.ints([1]))
        # scaled to [0, 1] per image: the gated map keeps the pixel map's units; an all-zero gate stays 0
        safe = e.op("Where", e.op("Greater", top, np.float32(0)), top, np.float32(1))
        return e.mul(pixels, e.div(gate, safe))


def upsample(e: Emitter, maps: gs.Tensor, height: int, width: int) -> gs.Tensor:
    """[N, h, w] -> [N, H, W], bilinear with half-pixel centres, edges clamped: ONNX Resize
    (mode linear, coordinate_transformation_mode half_pixel), which is what numpy.interp does
    along each axis at the points (i + 0.5) h / H - 0.5."""
    batch = e.op("Slice", e.op("Shape", maps), e.ints([0]), e.ints([1]))
    sizes = e.op("Concat", batch, e.ints([1, height, width]), axis=0)
    four = e.op("Unsqueeze", maps, e.ints([1]))
    resized = e.op("Resize", four, gs.Variable.empty(), gs.Variable.empty(), sizes, mode="linear",
                   coordinate_transformation_mode="half_pixel")
    return e.op("Squeeze", resized, e.ints([1]))


def upsample_reference(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """The same upsampling in numpy (float64), for tests and for readers: separable linear
    interpolation at the half-pixel sample points, clamped at the edges."""
    maps = np.asarray(maps, dtype=np.float64)
    h, w = maps.shape[-2:]
    rows = np.clip((np.arange(height) + 0.5) * h / height - 0.5, 0, h - 1)
    cols = np.clip((np.arange(width) + 0.5) * w / width - 0.5, 0, w - 1)
    along_rows = np.apply_along_axis(lambda v: np.interp(rows, np.arange(h), v), -2, maps)
    return np.apply_along_axis(lambda v: np.interp(cols, np.arange(w), v), -1, along_rows)
