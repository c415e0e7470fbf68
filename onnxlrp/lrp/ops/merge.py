"""Sums of computed tensors: the residual merge (an Add, split by onnxlrp.lrp.splitting) and
the difference a - b (a normalisation's centring, written out)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Family, Op, static_shape


class ResidualAdd(Op):
    """An Add of two computed tensors: a residual merge. Relevance is split, see splitting.py."""

    family = Family.MERGE  # made by make_op for an Add of two computed tensors (no op_types)
    kind = "merge"
    keeps_sign = True
    shape_preserving = True
    default_rule = "split"

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        shapes = [t.shape for t in self.data_inputs]
        if shapes[0] is None or shapes[1] is None or shapes[0][1:] != shapes[1][1:]:
            raise self.error(f"adds tensors of shapes {shapes[0]} and {shapes[1]}; a residual merge needs equal shapes")


class Difference(Op):
    """a - b of two computed tensors: the centring x - mean(x) of a normalisation written out
    (ReduceMean / Sub / Pow / Sqrt / Div). Linear in both inputs; b may broadcast over a.
    Its rule is the proportional (z-) rule: R_a = a R / y, R_b = -b R / y."""

    family = Family.MERGE  # made by make_op for a Sub of two computed tensors (no op_types)
    kind = "difference"
    shape_preserving = True
    default_rule = "proportional"

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        a, b = node.inputs[0], node.inputs[1]
        shapes = [static_shape(t, node, path) for t in (a, b, self.output)]
        if shapes[0] != shapes[2] or len(shapes[1]) != len(shapes[2]):
            raise self.error(f"subtracts {shapes[1]} from {shapes[0]}; onnxlrp needs the second to broadcast over the first")
        self.x, self.b = a, b
        self.b_axes = [axis for axis in range(1, len(shapes[2])) if shapes[1][axis] == 1 and shapes[2][axis] != 1]

    def terms(self, e) -> list[tuple[gs.Tensor, gs.Tensor]]:
        """(input, its signed contribution to the output)."""
        return [(self.x, self.x), (self.b, e.op("Neg", self.b))]

    def reduce(self, e, tensor: gs.Tensor, r: gs.Tensor) -> gs.Tensor:
        """Relevance on the output's shape -> on `tensor`'s (summed where it broadcast)."""
        return e.reduce_sum(r, self.b_axes, keepdims=1) if tensor is self.b and self.b_axes else r

    def vjp(self, e, g):
        return {self.x.name: g, self.b.name: self.reduce(e, self.b, e.op("Neg", g))}
