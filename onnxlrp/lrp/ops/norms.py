"""Normalisations computed from the data: LayerNormalization, GroupNormalization and
InstanceNormalization (GroupNorm as exporters before opset 18 write it: Reshape ->
InstanceNormalization -> Reshape -> Mul -> Add).

With the standard deviation held constant, as is standard for LRP, the layer is affine in its
input: y = scale (x - mean(x)) / sigma + bias. That is a linear op whose "weight" is the scale;
its forward and transpose recompute 1/sigma from the layer's own input, and its transpose is
the centred gradient, C (g scale / sigma) with C = I - mean over the normalised axes. LRP-0
on it then equals gradient x input of the model with sigma detached. The gradient baselines
get the true gradient (vjp), sigma differentiated.
"""
from __future__ import annotations

import numpy as np

from .base import Family, LinearOp, const_value, given, static_shape


class Normalization(LinearOp):
    family = Family.NORMALISATION
    kind = "norm"

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        if node.inputs[0] is not self.x or len(self.data_inputs) != 1:
            raise self.error("its scale or bias is computed at run time; onnxlrp needs constants")
        self.shape = static_shape(self.x, node, path)
        self.epsilon = float(node.attrs.get("epsilon", 1e-5))
        scale, bias = const_value(node.inputs[1]), (const_value(node.inputs[2]) if given(node, 2) is not None else None)
        if scale is None or (given(node, 2) is not None and bias is None):
            raise self.error("its scale or bias is computed at run time; onnxlrp needs constants")
        self.axes, self.weight, self.bias = self._layout(scale.astype(np.float32),
                                                         None if bias is None else bias.astype(np.float32))

    def _layout(self, scale, bias):
        raise NotImplementedError

    def _mean(self, e, t):
        # ReduceSum / n: ReduceMean takes its axes as an attribute before opset 18, as an input after
        count = int(np.prod([self.shape[a] for a in self.axes]))
        return e.mul(e.reduce_sum(t, self.axes, keepdims=1), np.float32(1 / count))

    def _inv_std(self, e):
        """1 / sqrt(var(x) + eps) over the normalised axes, from the layer's own input."""
        centred = self._centre(e, self.x)
        variance = self._mean(e, e.mul(centred, centred))
        return e.div(np.float32(1), e.op("Sqrt", e.add(variance, np.float32(self.epsilon))))

    def _centre(self, e, t):
        return e.sub(t, self._mean(e, t))

    def forward(self, e, x, weight, bias):
        y = e.mul(e.mul(self._centre(e, x), self._inv_std(e)), e.const(weight))
        return y if bias is None else e.add(y, e.const(bias))

    def transpose(self, e, g, weight=None):
        weight = self.weight if weight is None else weight
        return self._centre(e, e.mul(e.mul(g, e.const(weight)), self._inv_std(e)))

    def vjp(self, e, g):
        """The true gradient (the gradient baselines): the statistics are differentiated too,
        inv (h - mean(h) - xhat mean(h xhat)) with h = g scale, xhat the normalised input."""
        inv = self._inv_std(e)
        h = e.mul(g, e.const(self.weight))
        xhat = e.mul(self._centre(e, self.x), inv)
        return {self.x.name: e.mul(inv, e.sub(self._centre(e, h), e.mul(xhat, self._mean(e, e.mul(h, xhat)))))}

    def bias_shape(self):
        return self.bias.shape

    def describe(self) -> str:
        return "normalised over " + ",".join(map(str, self.axes))


class LayerNormalization(Normalization):
    op_types = ("LayerNormalization",)  # over trailing axes: no channel axis of its own

    def _layout(self, scale, bias):
        rank = len(self.shape)
        axis = int(self.node.attrs.get("axis", -1)) % rank
        if axis == 0:
            raise self.error("normalising over the batch axis mixes images; no LRP rule applies")
        if len(self.node.outputs) > 1 and any(t.outputs for t in self.node.outputs[1:]):
            raise self.error("its mean and inverse standard deviation outputs are used; onnxlrp needs only the output")
        trailing = tuple(self.shape[axis:])  # scale and bias broadcast over the normalised axes
        return (list(range(axis, rank)), np.broadcast_to(scale, trailing).copy(),
                None if bias is None else np.broadcast_to(bias, trailing).copy())


class InstanceNormalization(Normalization):
    op_types = ("InstanceNormalization",)
    channel_axis = 1

    def _layout(self, scale, bias):
        rank = len(self.shape)
        per_channel = (1, -1) + (1,) * (rank - 2)
        return list(range(2, rank)), scale.reshape(per_channel), None if bias is None else bias.reshape(per_channel)


class GroupNormalization(Normalization):
    """Statistics per group of channels (over the group's channels and all positions)."""

    op_types = ("GroupNormalization",)
    channel_axis = 1

    def _layout(self, scale, bias):
        rank, channels = len(self.shape), self.shape[1]
        self.groups = int(self.node.attrs["num_groups"])
        if channels % self.groups:
            raise self.error(f"{channels} channels do not split into {self.groups} groups")
        per_channel = (1, -1) + (1,) * (rank - 2)

        def channelwise(v):  # opset 18 has one value per group, opset 21 one per channel
            return None if v is None else np.repeat(v, channels // v.size).reshape(per_channel)

        return list(range(1, rank)), channelwise(scale), channelwise(bias)

    def _mean(self, e, t):
        """The group mean, broadcast back to the input's shape."""
        size = int(np.prod(self.shape[1:])) // self.groups
        grouped = e.op("Reshape", t, e.ints([0, self.groups, size]))
        mean = e.mul(e.reduce_sum(grouped, [2], keepdims=1), np.float32(1 / size))
        return e.op("Reshape", e.op("Expand", mean, e.ints([1, self.groups, size])), e.ints([0] + self.shape[1:]))

    def describe(self) -> str:
        return f"normalised over {self.groups} groups"
