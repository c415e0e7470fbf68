"""Elementwise activations that relevance passes through: ReLU, LeakyReLU, Clip (ReLU6)."""
from __future__ import annotations

import math

import numpy as np

from .base import Family, Op, const_value, constant_input, finite_values


class Relu(Op):
    op_types = ("Relu",)
    family = Family.ACTIVATION
    kind = "activation"
    loss_family = "activation"  # where the gradient is zero (a clip's saturation), relevance stops
    shape_preserving = True
    makes_nonneg = True

    def transpose(self, e, g, weight=None):
        return e.op("Where", e.op("Greater", self.x, np.float32(0)), g, np.float32(0))


class LeakyRelu(Op):
    """y = x, or alpha x below 0. Relevance passes as through a ReLU: under LRP-0 (gradient x
    input) the relevance at x is g * alpha * x = g * y, the relevance at y."""

    op_types = ("LeakyRelu",)
    family = Family.ACTIVATION
    kind = "activation"
    loss_family = "activation"  # where the gradient is zero (a clip's saturation), relevance stops
    shape_preserving = True

    def transpose(self, e, g, weight=None):
        alpha = np.float32(self.node.attrs.get("alpha", 0.01))
        return e.op("Where", e.op("Greater", self.x, np.float32(0)), g, e.mul(g, alpha))


class Clip(Op):
    """ReLU6 and other clips. Where the clip holds the output constant, the output no longer
    depends on the input (as with a bias): that relevance is absorbed; inside the range it
    passes. This is the op's gradient, the reading under which LRP-0 is gradient x input."""

    op_types = ("Clip",)
    family = Family.BOUNDED_ACTIVATION
    kind = "activation"
    loss_family = "activation"  # where the gradient is zero (a clip's saturation), relevance stops
    shape_preserving = True
    default_rule = "gradient"

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        if len(self.data_inputs) != 1 or node.inputs[0] is not self.x:
            raise self.error("its bounds are computed from the image; onnxlrp needs constant bounds")
        self.low, self.high = (None if v is None else float(v) for v in
                               (constant_input(self, i, "bound") for i in (1, 2)))
        self.makes_nonneg = self.low is not None and self.low >= 0

    @classmethod
    def output_range(cls, node):
        """[low, high] where both bounds are given and finite (min/max attributes before opset 11)."""
        bounds = [finite_values(const_value(node.inputs[i])) if i < len(node.inputs) and node.inputs[i].name
                  else None for i in (1, 2)]
        low, high = node.attrs.get("min"), node.attrs.get("max")  # opset < 11 keeps them as attributes
        low = float(bounds[0].min()) if bounds[0] is not None else low
        high = float(bounds[1].max()) if bounds[1] is not None else high
        if low is None or high is None or not math.isfinite(low) or not math.isfinite(high):
            return None
        return (float(low), float(high))

    def transpose(self, e, g, weight=None):
        inside = None
        for bound, compare in ((self.low, "Greater"), (self.high, "Less")):
            if bound is not None:
                test = e.op(compare, self.x, np.float32(bound))
                inside = test if inside is None else e.op("And", inside, test)
        return g if inside is None else e.op("Where", inside, g, np.float32(0))


class Softplus(Op):
    """y = log(1 + exp(x)), a smooth ReLU: element-wise and monotone, so relevance passes
    through it as through a ReLU (the pass rule) and the z^B box bounds are replayed through
    it; its VJP is g sigmoid(x)."""

    op_types = ("Softplus",)
    family = Family.ACTIVATION
    kind = "activation"
    loss_family = "activation"
    shape_preserving = True
    makes_nonneg = True  # log(1 + exp(x)) > 0
    carries_bounds = True  # monotone, one input element per output element

    def transpose(self, e, g, weight=None):
        return e.mul(g, e.op("Sigmoid", self.x))
