"""Ops that move values without computing new ones: reshapes, transposes, slices,
concatenation, constant padding. Relevance goes back to where each value came from."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import Family, Op, const_value, constant_input, given, static_shape


class Reshape(Op):
    """Flatten, Reshape, Squeeze, Unsqueeze: relevance keeps its values, takes the input's shape."""

    op_types = ("Flatten", "Reshape", "Squeeze", "Unsqueeze")
    family = Family.SHAPE
    shape_inputs = (1,)  # Reshape's target shape, Squeeze's and Unsqueeze's axes
    kind = "reshape"
    keeps_sign = True
    carries_bounds = True
    carries_factor = True  # a gate's factor reshaped on its way to the Mul
    passes_values = True
    loss_family = None  # values moved, none computed: relevance goes back whole
    default_rule = "gradient"

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        if node.inputs[0] is not self.x or len(self.data_inputs) != 1:
            raise self.error("its shape input depends on the image values")

    def transpose(self, e, g, weight=None):
        return e.op("Reshape", g, e.op("Shape", self.x))


class Transpose(Reshape):
    op_types = ("Transpose",)
    shape_inputs = ()

    def transpose(self, e, g, weight=None):
        perm = list(self.node.attrs.get("perm", reversed(range(len(self.x.shape)))))
        return e.op("Transpose", g, perm=[int(i) for i in np.argsort(perm)])


class Slice(Reshape):
    """A constant slice (step 1): relevance goes back to the elements it took, zero elsewhere."""

    op_types = ("Slice",)
    shape_inputs = (1, 2, 3, 4)  # starts, ends, axes, steps

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        starts, ends, axes, steps = (constant_input(self, i, what) for i, what in
                                     enumerate(("starts", "ends", "axes", "steps"), 1))
        if starts is None or ends is None:
            raise self.error("its starts and ends are missing")
        self.shape = static_shape(self.x, node, path)
        rank = len(self.shape)
        axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in axes]
        if steps is not None and any(int(k) != 1 for k in steps):
            raise self.error("slices with a step other than 1 are not supported")
        if 0 in axes:
            raise self.error("slicing the batch axis mixes images; no LRP rule applies")
        self.begins, self.ends = [0] * rank, [0] * rank  # padding that restores the input's shape
        for axis, start, end in zip(axes, starts, ends):
            size = self.shape[axis]
            start = min(max(int(start) + size if start < 0 else int(start), 0), size)
            end = min(max(int(end) + size if end < 0 else int(end), start), size)
            self.begins[axis], self.ends[axis] = start, size - end

    def transpose(self, e, g, weight=None):
        return e.op("Pad", g, e.ints(self.begins + self.ends))


class Concat(Op):
    """Concatenation: each computed input gets back its own part of the relevance, exactly."""

    op_types = ("Concat",)
    family = Family.SHAPE
    kind = "reshape"
    carries_bounds = True
    carries_factor = True
    loss_family = None  # values moved, none computed: relevance goes back whole
    default_rule = "gradient"

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        shapes = [static_shape(t, node, path) for t in node.inputs]
        self.axis = int(node.attrs["axis"]) % len(shapes[0])
        if self.axis == 0:
            raise self.error("concatenating along the batch axis mixes images; no LRP rule applies")
        offsets = np.cumsum([0] + [shape[self.axis] for shape in shapes])
        self.parts = [(t, int(offsets[i]), int(offsets[i + 1])) for i, t in enumerate(node.inputs) if is_data(t)]
        # the output is >= 0 where the computed parts are, if every constant part is >= 0 too
        self.keeps_sign = all(bool(np.all(const_value(t) >= 0)) for t in node.inputs if not is_data(t))

    def vjp(self, e, g):
        result: dict[str, gs.Tensor] = {}
        for tensor, begin, end in self.parts:
            part = e.op("Slice", g, e.ints([begin]), e.ints([end]), e.ints([self.axis]))
            result[tensor.name] = e.add(result[tensor.name], part) if tensor.name in result else part
        return result


class Pad(Reshape):
    """A constant Pad that canonicalisation could not merge: relevance on the padding is dropped."""

    op_types = ("Pad",)
    shape_inputs = (1, 2, 3)  # pads, constant_value, axes
    carries_factor = False
    passes_values = False  # the padding is a new value

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        if node.attrs.get("mode", "constant") != "constant":
            raise self.error(f"{node.attrs['mode']} padding is not supported")
        pads = node.attrs.get("pads")
        if pads is None:
            pads = const_value(node.inputs[1]) if given(node, 1) is not None else None
        if pads is None or given(node, 3) is not None:
            raise self.error("only constant pads over all axes are supported")
        value = constant_input(self, 2, "fill value")
        value = node.attrs.get("value", 0.0) if value is None else value
        # The padding is part of the output: non-negative inputs stay non-negative only if it is too.
        self.keeps_sign = bool(np.all(np.asarray(value) >= 0))
        self.shape = static_shape(self.x, node, path)
        rank = len(self.shape)
        self.begins = [int(p) for p in pads[:rank]]
        if any(int(p) < 0 for p in pads):
            raise self.error("negative pads (cropping) are not supported")

    def transpose(self, e, g, weight=None):
        ends = [b + n for b, n in zip(self.begins[1:], self.shape[1:])]
        axes = list(range(1, len(self.shape)))
        return e.op("Slice", g, e.ints(self.begins[1:]), e.ints(ends), e.ints(axes))




class Expand(Reshape):
    """Broadcast to a constant shape: relevance of the copies is summed back onto the original."""

    op_types = ("Expand",)
    shape_inputs = (1,)  # the target shape

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        self.in_shape, self.out_shape = static_shape(self.x, node, path), static_shape(self.output, node, path)
        if len(self.in_shape) != len(self.out_shape):
            raise self.error(f"expands rank {len(self.in_shape)} to {len(self.out_shape)}; onnxlrp needs equal ranks")
        self.axes = [a for a in range(1, len(self.out_shape)) if self.in_shape[a] == 1 and self.out_shape[a] != 1]

    def transpose(self, e, g, weight=None):
        return e.reduce_sum(g, self.axes, keepdims=1) if self.axes else g


class Gather(Reshape):
    """Constant indices along an axis other than the batch (channel groups): each index's
    relevance goes back to the element it took; elements not taken get none."""

    op_types = ("Gather",)
    shape_inputs = ()  # the indices are data positions, read as constants below

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        indices = const_value(node.inputs[1])
        if indices is None:
            raise self.error("its indices are computed at run time; onnxlrp needs constant indices")
        self.shape = static_shape(self.x, node, path)
        self.axis = int(node.attrs.get("axis", 0)) % len(self.shape)
        if self.axis == 0:
            raise self.error("gathering along the batch axis mixes images; no LRP rule applies")
        size = self.shape[self.axis]
        self.indices = np.asarray(indices, dtype=np.int64) % size
        if indices.ndim > 1 or len(set(self.indices.reshape(-1).tolist())) != self.indices.size:
            raise self.error("only a scalar or a list of distinct indices is supported")
        # where each input element went: its position in the output, or the zero slot past the end
        self.source = np.full(size, self.indices.size, dtype=np.int64)
        self.source[self.indices.reshape(-1)] = np.arange(self.indices.size)

    def transpose(self, e, g, weight=None):
        if self.indices.ndim == 0:  # a scalar index removed the axis
            g = e.op("Unsqueeze", g, e.ints([self.axis]))
        zero_slot = e.op("Slice", e.mul(g, np.float32(0)), e.ints([0]), e.ints([1]), e.ints([self.axis]))
        padded = e.op("Concat", g, zero_slot, axis=self.axis)
        return e.op("Gather", padded, e.ints(self.source), axis=self.axis)


class Cast(Reshape):
    """A cast between float types (exporters write float32 -> float32 casts on the input): the
    values pass; a cast to integers or bool rounds them away, and no LRP rule applies."""

    op_types = ("Cast",)
    shape_inputs = ()
    carries_factor = False
    passes_values = False  # (a float cast passes them, but factor chains are not read through casts)

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        to = int(node.attrs.get("to", onnx.TensorProto.FLOAT))
        if to not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                      onnx.TensorProto.BFLOAT16):
            raise self.error(f"casts to {onnx.TensorProto.DataType.Name(to)}; relevance only passes float casts")

    def transpose(self, e, g, weight=None):
        return g
