"""Elementwise activations that relevance passes through: ReLU, LeakyReLU, Clip (ReLU6)."""
from __future__ import annotations

import numpy as np

from .base import Op, constant_input


class Relu(Op):
    kind = "activation"
    loss_family = "activation"  # where the gradient is zero (a clip's saturation), relevance stops
    shape_preserving = True
    makes_nonneg = True

    def transpose(self, e, g, weight=None):
        return e.op("Where", e.op("Greater", self.x, np.float32(0)), g, np.float32(0))


class LeakyRelu(Op):
    """y = x, or alpha x below 0. Relevance passes as through a ReLU: under LRP-0 (gradient x
    input) the relevance at x is g * alpha * x = g * y, the relevance at y."""

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

    def transpose(self, e, g, weight=None):
        inside = None
        for bound, compare in ((self.low, "Greater"), (self.high, "Less")):
            if bound is not None:
                test = e.op(compare, self.x, np.float32(bound))
                inside = test if inside is None else e.op("And", inside, test)
        return g if inside is None else e.op("Where", inside, g, np.float32(0))


OPS = {"Relu": Relu, "LeakyRelu": LeakyRelu, "Clip": Clip}
