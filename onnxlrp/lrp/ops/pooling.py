"""Pools: average pools are linear (a scalar weight 1.0 that rules may modify), MaxPool
routes relevance to each window's winner."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import Family, LinearOp, Op, const_value, given, scaled, static_shape, window_transpose


class AveragePool(LinearOp):
    """Average pooling; its transpose spreads each output's gradient over its window."""

    op_types = ("AveragePool",)
    family = Family.AVERAGE_POOLING
    channel_axis = 1
    kind = "pool"
    keeps_sign = True

    def __init__(self, node, is_data, path="model", attrs: dict | None = None, output: gs.Tensor | None = None):
        super().__init__(node, is_data, path)
        if output is not None:
            self.output = output
        attrs = dict(node.attrs if attrs is None else attrs)
        self.weight = np.array(1.0, dtype=np.float32)
        self.in_shape = static_shape(self.x, node, path)
        self.out_shape = static_shape(self.output, node, path)
        rank = len(self.in_shape) - 2
        self.kernel = list(attrs["kernel_shape"])
        self.strides = list(attrs.get("strides", [1] * rank))
        self.pads = list(attrs.get("pads", [0] * (2 * rank)))
        self.ceil_mode = int(attrs.get("ceil_mode", 0))
        self.count_include_pad = int(attrs.get("count_include_pad", 0))
        if any(d != 1 for d in attrs.get("dilations", [1] * rank)):
            raise self.error("dilated average pooling is not supported")

    def _attrs(self) -> dict:
        return dict(kernel_shape=self.kernel, strides=self.strides, pads=self.pads,
                    ceil_mode=self.ceil_mode, count_include_pad=self.count_include_pad)

    def forward(self, e, x, weight, bias):
        return scaled(e, e.op("AveragePool", x, **self._attrs()), weight)

    def _counts(self) -> np.ndarray:
        """How many inputs each window averages over (the pool's divisor), shape [1, 1, *out]."""
        rank = len(self.kernel)
        per_axis = []
        for i in range(rank):
            size, k, s = self.in_shape[2 + i], self.kernel[i], self.strides[i]
            begin, end = self.pads[i], self.pads[rank + i]
            starts = np.arange(self.out_shape[2 + i]) * s - begin
            stops = np.minimum(starts + k, size + end)
            if self.count_include_pad:
                per_axis.append(stops - starts)
            else:
                per_axis.append(np.minimum(stops, size) - np.maximum(starts, 0))
        counts = per_axis[0]
        for axis in per_axis[1:]:
            counts = np.multiply.outer(counts, axis)
        return counts.reshape((1, 1) + counts.shape).astype(np.float32)

    def transpose(self, e, g, weight=None):
        weight = self.weight if weight is None else weight
        scale = np.float32(weight) / self._counts()
        channels, rank = self.in_shape[1], len(self.kernel)
        ones = np.ones((channels, 1) + tuple(self.kernel), dtype=np.float32)  # each channel on its own
        return window_transpose(e, e.mul(g, e.const(scale)), ones, self.in_shape, self.out_shape, self.kernel,
                                self.strides, self.pads, [1] * rank, channels)

    def describe(self) -> str:
        return f"{'x'.join(map(str, self.kernel))}/{'x'.join(map(str, self.strides))}"


class GlobalAveragePool(LinearOp):
    op_types = ("GlobalAveragePool",)
    family = Family.GLOBAL_POOLING
    pools_globally = True
    kind = "pool"
    keeps_sign = True

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        self.weight = np.array(1.0, dtype=np.float32)
        self.in_shape = static_shape(self.x, node, path)
        self.axes = list(range(2, len(self.in_shape)))
        self.keepdims = 1

    def forward(self, e, x, weight, bias):
        return scaled(e, e.op("GlobalAveragePool", x), weight)

    def transpose(self, e, g, weight=None):
        weight = self.weight if weight is None else weight
        count = self.divisor()
        if not self.keepdims:
            g = e.op("Unsqueeze", g, e.ints(self.axes))
        # Broadcast over the averaged axes; a static shape, so the input need not stay in memory.
        spread = [self.in_shape[a] if a in self.axes else 1 for a in range(len(self.in_shape))]
        return e.op("Expand", e.mul(g, np.float32(weight) / count), e.ints(spread))

    def divisor(self) -> int:
        return int(np.prod([self.in_shape[a] for a in self.axes]))

    @property
    def channel_axis(self) -> int | None:
        """The one axis past the batch that is not averaged (a ReduceMean over the rows and columns
        of a channels-last map keeps axis 3); None where that is not one axis."""
        kept = [a for a in range(1, len(self.in_shape)) if a not in self.axes]
        return kept[0] if len(kept) == 1 else None

    def describe(self) -> str:
        return "mean over " + ",".join(map(str, self.axes))


class ReduceMean(GlobalAveragePool):
    op_types = ("ReduceMean",)

    def __init__(self, node, is_data, path="model"):
        LinearOp.__init__(self, node, is_data, path)
        self.weight = np.array(1.0, dtype=np.float32)
        self.in_shape = static_shape(self.x, node, path)
        rank = len(self.in_shape)
        axes = node.attrs.get("axes")
        if axes is None and given(node, 1) is not None:
            axes = const_value(node.inputs[1])
            if axes is None:
                raise self.error("its axes are computed at run time")
        if axes is None:
            axes = [] if node.attrs.get("noop_with_empty_axes", 0) else list(range(rank))
        self.axes = sorted(int(a) % rank for a in axes)
        if 0 in self.axes:
            raise self.error("averaging over the batch axis mixes images; no LRP rule applies")
        self.keepdims = int(node.attrs.get("keepdims", 1))

    def forward(self, e, x, weight, bias):
        node = self.node
        return scaled(e, e.op(node.op, x, *node.inputs[1:], **node.attrs), weight)


class ReduceSum(ReduceMean):
    """A sum over axes other than the batch (ResNeSt adds its radix groups): linear, weight 1."""

    op_types = ("ReduceSum",)
    pools_globally = False  # a sum of radix groups, not the mean a classifier's head takes

    def divisor(self) -> int:
        return 1

    def describe(self) -> str:
        return "sum over " + ",".join(map(str, self.axes))


class MaxPool(Op):
    """Max pooling. Its transpose routes each output's gradient to the window's winner."""

    op_types = ("MaxPool",)
    family = Family.MAX_POOLING
    channel_axis = 1
    kind = "maxpool"
    keeps_sign = True
    default_rule = "gradient"

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        self.in_shape = static_shape(self.x, node, path)
        self.out_shape = static_shape(self.output, node, path)
        if node.attrs.get("storage_order", 0):
            raise self.error("column-major storage_order is not supported")

    def transpose(self, e, g, weight=None):
        node = self.node
        if len(node.outputs) < 2:  # ask the forward MaxPool for its argmax indices
            node.outputs.append(gs.Variable(f"{node.name}/indices", dtype=np.int64, shape=list(self.out_shape)))
        indices = node.outputs[1]
        size = int(np.prod(self.in_shape[1:]))
        # Sizes from the static input shape and g's batch axis: the input need not stay in memory.
        batch = e.op("Slice", e.op("Shape", g), e.ints([0]), e.ints([1]))
        zeros = e.op("ConstantOfShape", e.op("Concat", batch, e.ints([size]), axis=0))
        # Scattered per image, the indices taken within it (ONNX's count the images before it
        # too): so the same indices serve rows repeated along the batch axis (lrp.conditional).
        # In float32 whatever the graph's precision (no CPU float16 kernel for it); in a
        # float32 graph onnxruntime drops the two casts.
        rows = e.ints([0, -1])
        updates = e.op("Cast", e.op("Reshape", g, rows), to=onnx.TensorProto.FLOAT)
        within = e.op("Mod", e.op("Reshape", indices, rows), e.ints([size]))
        scattered = e.op("ScatterElements", zeros, within, updates, axis=1, reduction="add")
        return e.op("CastLike", e.op("Reshape", scattered, e.ints([-1] + self.in_shape[1:])), g)

    def average_view(self, size: int = 2) -> AveragePool:
        """The paper's stand-in for relevance: a size x size average pool with stride size, no padding."""
        rank = len(self.in_shape) - 2
        for ceil_mode in (0, 1):
            sizes = [
                (-(-(n - size) // size) if ceil_mode else (n - size) // size) + 1
                for n in self.in_shape[2:]
            ]
            if sizes == self.out_shape[2:]:
                attrs = dict(kernel_shape=[size] * rank, strides=[size] * rank, pads=[0] * (2 * rank),
                             ceil_mode=ceil_mode, count_include_pad=0)
                return AveragePool(self.node, lambda t: t is self.x, self.path, attrs=attrs, output=self.output)
        raise self.error(
            f"a {size}x{size} average pool of its input {self.in_shape} does not give its output {self.out_shape}"
        )

    def describe(self) -> str:
        kernel = self.node.attrs.get("kernel_shape", [])
        strides = self.node.attrs.get("strides", [1] * len(kernel))
        return f"{'x'.join(map(str, kernel))}/{'x'.join(map(str, strides))}"
