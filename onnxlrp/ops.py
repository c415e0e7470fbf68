"""What onnxlrp knows about each ONNX op type: one adapter class per op, in one table.

Every op on the data path supplies its *transpose* (vector-Jacobian product) as ONNX
nodes; linear ops (Conv, Gemm, MatMul, affine BatchNorm and constant arithmetic, the
average pools) also supply their *forward* with given, possibly modified, parameters.
The LRP rules in :mod:`onnxlrp.rules` are recipes over these two emitters, so adding
an op type means adding one class here and one line to :data:`OPS`.

Parameter-free linear ops (the average pools) expose a scalar weight 1.0: a rule's
weight modifier then yields a scale (clamp(min=0) keeps it, clamp(max=0) drops the term).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .emit import Emitter
from .errors import OnnxLrpError

IsData = Callable[[gs.Tensor], bool]


def _const(tensor: gs.Tensor | None) -> np.ndarray | None:
    return tensor.values if isinstance(tensor, gs.Constant) else None


def _given(node: gs.Node, index: int) -> gs.Tensor | None:
    """The node's optional input `index`, or None when it is absent."""
    if index < len(node.inputs) and node.inputs[index].name:
        return node.inputs[index]
    return None


def _constant_input(op: Op, index: int, what: str) -> np.ndarray | None:
    """The node's optional input `index` as a constant; None when absent, an error when computed."""
    tensor = _given(op.node, index)
    if tensor is None:
        return None
    value = _const(tensor)
    if value is None:
        raise op.error(f"its {what} is computed at run time; onnxlrp needs a constant")
    return value


def _static(tensor: gs.Tensor, node: gs.Node, path: str) -> list[int]:
    shape = tensor.shape
    if shape is None or not all(isinstance(d, int) for d in shape[1:]):
        raise OnnxLrpError(
            f"{path}: node '{node.name}' ({node.op}): tensor '{tensor.name}' has shape {shape}; "
            "onnxlrp needs static shapes past the batch axis"
        )
    return list(shape)


def transpose_padding(
    in_size: int, out_size: int, kernel: int, stride: int, dilation: int, begin: int, end: int
) -> tuple[int, int, int]:
    """(end pad, output_padding, extra zeros) that make ConvTranspose the exact VJP of a window op."""
    covered = (out_size - 1) * stride + dilation * (kernel - 1) + 1 - begin - end
    extra = in_size - covered
    if extra < 0:  # ceil-mode windows reach past the input: crop them off
        return end - extra, 0, 0
    if extra < stride:
        return end, extra, 0
    return end, 0, extra  # trailing inputs no window reads: their gradient is zero


def window_transpose(e: Emitter, g: gs.Tensor, weight: np.ndarray, in_shape, out_shape, kernel, strides, pads,
                     dilations, group: int) -> gs.Tensor:
    """The VJP of a window op (convolution, or average pool as a depthwise convolution).

    With stride 1 it is a convolution with the kernel flipped and its in/out channels swapped,
    which onnxruntime runs much faster than ConvTranspose; otherwise a ConvTranspose padded to
    the input's size."""
    rank = len(kernel)
    common = dict(kernel_shape=list(kernel), strides=list(strides), dilations=list(dilations), group=group)
    reach = [d * (k - 1) for d, k in zip(dilations, kernel)] * 2
    if all(s == 1 for s in strides) and all(p <= r for p, r in zip(pads, reach)):
        return e.op("Conv", g, e.const(_flipped(weight, group)), pads=[r - p for p, r in zip(pads, reach)], **common)
    ends, output_padding, extra = zip(*(
        transpose_padding(in_shape[2 + i], out_shape[2 + i], kernel[i], strides[i], dilations[i], pads[i], pads[rank + i])
        for i in range(rank)
    ))
    result = e.op("ConvTranspose", g, e.const(weight), pads=list(pads[:rank]) + list(ends),
                  output_padding=list(output_padding), **common)
    if any(extra):
        result = e.op("Pad", result, e.ints([0, 0] + [0] * rank + [0, 0] + list(extra)))
    return result


class Op:
    """An op on the data path. Subclasses say which rules apply and emit its transpose."""

    kind = "op"
    linear = False  # forward/transpose take (modified) parameters: LRP rules apply
    shape_preserving = False  # output shape == input shape: the pass rule applies
    keeps_sign = False  # output >= 0 whenever every data input is >= 0
    makes_nonneg = False  # output >= 0 whatever the input (ReLU, ReLU6)
    default_rule = "pass"  # rule used where a preset names none

    def __init__(self, node: gs.Node, is_data: IsData, path: str = "model"):
        self.node = node
        self.path = path
        self.data_inputs = [t for t in node.inputs if is_data(t)]
        self.x = self.data_inputs[0]
        self.output = node.outputs[0]

    def error(self, message: str) -> OnnxLrpError:
        return OnnxLrpError(f"{self.path}: node '{self.node.name}' ({self.node.op}): {message}")

    def transpose(self, e: Emitter, g: gs.Tensor, weight=None) -> gs.Tensor:
        raise self.error("has no transpose")

    def vjp(self, e: Emitter, g: gs.Tensor) -> dict[str, gs.Tensor]:
        """The vector-Jacobian product at every data input, by tensor name (one input here;
        ops of several inputs override it)."""
        return {self.x.name: self.transpose(e, g)}

    def describe(self) -> str:
        """Kernel, stride and channels, for `onnxlrp graph`."""
        return ""


class LinearOp(Op):
    """An op linear in its data input, given parameters (weight, bias)."""

    kind = "linear"
    linear = True
    default_rule = None  # presets must say which LRP rule a linear op gets

    weight: np.ndarray
    bias: np.ndarray | None = None
    has_bias = False  # forward() takes a bias of forward_bias_shape()

    def forward(self, e: Emitter, x: gs.Tensor, weight: np.ndarray, bias: np.ndarray | None) -> gs.Tensor:
        raise NotImplementedError

    def bias_shape(self) -> tuple[int, ...]:
        """How the bias broadcasts against the output."""
        return self.bias.shape

    def forward_bias_shape(self) -> tuple[int, ...]:
        """The shape of the bias forward() takes: one value per output channel."""
        raise NotImplementedError


class Conv(LinearOp):
    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        if node.inputs[0] is not self.x or len(self.data_inputs) != 1:
            raise self.error("its weights are computed at run time; onnxlrp needs constant weights")
        self.weight = _const(node.inputs[1])
        if self.weight is None:
            raise self.error("its weights are computed at run time; onnxlrp needs constant weights")
        bias = _given(node, 2)
        self.bias = _const(bias) if bias is not None else None
        if bias is not None and self.bias is None:
            raise self.error("its bias is computed at run time; onnxlrp needs a constant bias")
        rank = self.weight.ndim - 2
        self.in_shape = _static(self.x, node, path)
        self.out_shape = _static(self.output, node, path)
        self.kernel = list(self.weight.shape[2:])
        self.strides = list(node.attrs.get("strides", [1] * rank))
        self.dilations = list(node.attrs.get("dilations", [1] * rank))
        self.pads = list(node.attrs.get("pads", [0] * (2 * rank)))
        self.group = int(node.attrs.get("group", 1))

    def _attrs(self) -> dict:
        return dict(kernel_shape=self.kernel, strides=self.strides, pads=self.pads,
                    dilations=self.dilations, group=self.group)

    def forward(self, e, x, weight, bias):
        inputs = [x, e.const(weight)] + ([e.const(bias)] if bias is not None else [])
        return e.op("Conv", *inputs, **self._attrs())

    def transpose(self, e, g, weight=None):
        weight = self.weight if weight is None else weight
        # A constant kernel (the flat rule's ones) treats every channel alike: sum g over the
        # output channels first and transpose one channel, C_out times fewer operations.
        constant = self.group == 1 and bool(np.all(weight == weight.flat[0]))
        channels = weight.shape[1]
        if constant:
            g = e.reduce_sum(g, [1], keepdims=1)
            weight = np.full((1, 1) + weight.shape[2:], weight.flat[0], dtype=weight.dtype)
        result = window_transpose(e, g, weight, self.in_shape, self.out_shape, self.kernel, self.strides,
                                  self.pads, self.dilations, self.group)
        return e.op("Expand", result, e.ints([1, channels] + [1] * len(self.kernel))) if constant else result

    has_bias = True

    def bias_shape(self):
        return (1, self.weight.shape[0]) + (1,) * (self.weight.ndim - 2)

    def forward_bias_shape(self):
        return (self.weight.shape[0],)

    def describe(self) -> str:
        k = "x".join(map(str, self.kernel))
        s = "x".join(map(str, self.strides))
        group = f", group {self.group}" if self.group != 1 else ""
        return f"{k}/{s}, {self.weight.shape[1] * self.group}->{self.weight.shape[0]}{group}"


def _flipped(weight: np.ndarray, group: int) -> np.ndarray:
    """The weight of the convolution that is the transpose of a stride-1 convolution: per group,
    output and input channels swapped, every spatial axis reversed."""
    outputs, inputs = weight.shape[:2]
    kernel = weight.shape[2:]
    w = weight.reshape((group, outputs // group, inputs) + kernel).swapaxes(1, 2)
    w = w[(Ellipsis,) + (slice(None, None, -1),) * len(kernel)]
    return np.ascontiguousarray(w.reshape((group * inputs, outputs // group) + kernel))


class Gemm(LinearOp):
    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        if node.inputs[0] is not self.x or len(self.data_inputs) != 1 or node.attrs.get("transA", 0):
            raise self.error("only x @ W + b with constant W and b is supported")
        self.weight = _const(node.inputs[1])
        if self.weight is None:
            raise self.error("its weights are computed at run time; onnxlrp needs constant weights")
        self.trans_b = int(node.attrs.get("transB", 0))
        bias = _given(node, 2)
        self.bias = _const(bias) if bias is not None else None
        if bias is not None and self.bias is None:
            raise self.error("its bias is computed at run time; onnxlrp needs a constant bias")
        if node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0:
            raise self.error("alpha and beta could not be folded into constant weights and bias")
        if self.bias is not None:
            # ONNX lets C broadcast to [batch, outputs]: [N], [1, N] and a scalar all mean one value
            # per output; a bias that differs per row of the batch has no per-output reading.
            if self.bias.size not in (1, self.outputs) or (self.bias.ndim == 2 and self.bias.shape[0] != 1):
                raise self.error(f"its bias has shape {list(self.bias.shape)}; onnxlrp needs one value per output "
                                 f"([{self.outputs}] or [1, {self.outputs}])")
            self.bias = np.broadcast_to(self.bias.reshape(-1), (self.outputs,)).copy()

    @property
    def outputs(self) -> int:
        return self.weight.shape[0] if self.trans_b else self.weight.shape[1]

    def forward(self, e, x, weight, bias):
        inputs = [x, e.const(weight)] + ([e.const(bias)] if bias is not None else [])
        return e.op("Gemm", *inputs, transB=self.trans_b)

    def transpose(self, e, g, weight=None):
        weight = self.weight if weight is None else weight
        # dz/dx = W for x @ W^T (transB=1); W^T otherwise.
        return e.op("MatMul", g, e.const(weight if self.trans_b else np.ascontiguousarray(weight.T)))

    has_bias = True

    def bias_shape(self):
        return (1, self.outputs)

    def forward_bias_shape(self):
        return (self.outputs,)

    def describe(self) -> str:
        inputs = self.weight.shape[1] if self.trans_b else self.weight.shape[0]
        return f"{inputs}->{self.outputs}"


class MatMul(LinearOp):
    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        self.weight = _const(node.inputs[1])
        if node.inputs[0] is not self.x or self.weight is None or self.weight.ndim != 2:
            raise self.error("only x @ W with a constant 2-D W is supported")

    def forward(self, e, x, weight, bias):
        return e.op("MatMul", x, e.const(weight))

    def transpose(self, e, g, weight=None):
        weight = self.weight if weight is None else weight
        return e.op("MatMul", g, e.const(np.ascontiguousarray(weight.T)))

    def describe(self) -> str:
        return f"{self.weight.shape[0]}->{self.weight.shape[1]}"


class Affine(LinearOp):
    """y = x * scale + shift, elementwise with constants: BatchNormalization and constant arithmetic."""

    kind = "affine"
    shape_preserving = True
    default_rule = "pass"

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        self.weight, self.bias = self._coefficients(node)
        shape = _static(self.x, node, path)
        if _static(self.output, node, path)[1:] != shape[1:]:
            raise self.error(f"its constant broadcasts the input {shape} to {self.output.shape}")

    def _coefficients(self, node) -> tuple[np.ndarray, np.ndarray | None]:
        one = np.array(1.0, dtype=np.float32)
        if node.op == "BatchNormalization":
            params = [_const(t) for t in node.inputs[1:5]]
            if any(p is None for p in params) or len(node.outputs) != 1:
                raise self.error("only inference-mode BatchNormalization with constant statistics is supported")
            gamma, beta, mean, var = (p.astype(np.float64) for p in params)
            scale = gamma / np.sqrt(var + node.attrs.get("epsilon", 1e-5))
            rank = len(self.x.shape)
            shape = (-1,) + (1,) * (rank - 2)
            return (scale.reshape(shape).astype(np.float32),
                    (beta - mean * scale).reshape(shape).astype(np.float32))
        other = next(t for t in node.inputs if t is not self.x)
        c = _const(other)
        if c is None:
            raise self.error("its other input is neither constant nor computed from the image")
        c = c.astype(np.float32)
        data_first = node.inputs[0] is self.x
        if node.op == "Add":
            return one, c
        if node.op == "Sub":
            return (one, -c) if data_first else (-one, c)
        if node.op == "Mul":
            return c, None
        if node.op == "Div" and data_first:
            return (1.0 / c).astype(np.float32), None
        raise self.error("dividing a constant by a computed tensor is not linear; no LRP rule applies")

    def forward(self, e, x, weight, bias):
        y = x if _is_one(weight) else e.mul(x, e.const(weight))
        return y if bias is None else e.add(y, e.const(bias))

    def transpose(self, e, g, weight=None):
        weight = self.weight if weight is None else weight
        return g if _is_one(weight) else e.mul(g, e.const(weight))

    def describe(self) -> str:
        return "affine"


def _is_one(weight: np.ndarray) -> bool:
    return weight.ndim == 0 and float(weight) == 1.0


def _scaled(e: Emitter, y: gs.Tensor, weight: np.ndarray) -> gs.Tensor:
    return y if _is_one(weight) else e.mul(y, e.const(weight))


class AveragePool(LinearOp):
    """Average pooling; its transpose spreads each output's gradient over its window."""

    kind = "pool"
    keeps_sign = True

    def __init__(self, node, is_data, path="model", attrs: dict | None = None, output: gs.Tensor | None = None):
        super().__init__(node, is_data, path)
        if output is not None:
            self.output = output
        attrs = dict(node.attrs if attrs is None else attrs)
        self.weight = np.array(1.0, dtype=np.float32)
        self.in_shape = _static(self.x, node, path)
        self.out_shape = _static(self.output, node, path)
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
        return _scaled(e, e.op("AveragePool", x, **self._attrs()), weight)

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
    kind = "pool"
    keeps_sign = True

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        self.weight = np.array(1.0, dtype=np.float32)
        self.in_shape = _static(self.x, node, path)
        self.axes = list(range(2, len(self.in_shape)))
        self.keepdims = 1

    def forward(self, e, x, weight, bias):
        return _scaled(e, e.op("GlobalAveragePool", x), weight)

    def transpose(self, e, g, weight=None):
        weight = self.weight if weight is None else weight
        count = int(np.prod([self.in_shape[a] for a in self.axes]))
        if not self.keepdims:
            g = e.op("Unsqueeze", g, e.ints(self.axes))
        # Broadcast over the averaged axes; a static shape, so the input need not stay in memory.
        spread = [self.in_shape[a] if a in self.axes else 1 for a in range(len(self.in_shape))]
        return e.op("Expand", e.mul(g, np.float32(weight) / count), e.ints(spread))

    def describe(self) -> str:
        return "mean over " + ",".join(map(str, self.axes))


class ReduceMean(GlobalAveragePool):
    def __init__(self, node, is_data, path="model"):
        LinearOp.__init__(self, node, is_data, path)
        self.weight = np.array(1.0, dtype=np.float32)
        self.in_shape = _static(self.x, node, path)
        rank = len(self.in_shape)
        axes = node.attrs.get("axes")
        if axes is None and _given(node, 1) is not None:
            axes = _const(node.inputs[1])
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
        return _scaled(e, e.op("ReduceMean", x, *node.inputs[1:], **node.attrs), weight)


class MaxPool(Op):
    """Max pooling. Its transpose routes each output's gradient to the window's winner."""

    kind = "maxpool"
    keeps_sign = True
    default_rule = "gradient"

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        self.in_shape = _static(self.x, node, path)
        self.out_shape = _static(self.output, node, path)
        if node.attrs.get("storage_order", 0):
            raise self.error("column-major storage_order is not supported")

    def transpose(self, e, g, weight=None):
        node = self.node
        if len(node.outputs) < 2:  # ask the forward MaxPool for its argmax indices
            node.outputs.append(gs.Variable(f"{node.name}/indices", dtype=np.int64))
        indices = node.outputs[1]
        flat = e.ints([-1])
        # Sizes from the static input shape and g's batch axis: the input need not stay in memory.
        batch = e.op("Slice", e.op("Shape", g), e.ints([0]), e.ints([1]))
        zeros = e.op("ConstantOfShape", e.mul(batch, e.ints([int(np.prod(self.in_shape[1:]))])))
        # Scattered in float32 whatever the graph's precision (no CPU float16 kernel for it);
        # in a float32 graph onnxruntime drops the two casts.
        updates = e.op("Cast", e.op("Reshape", g, flat), to=onnx.TensorProto.FLOAT)
        scattered = e.op("ScatterElements", zeros, e.op("Reshape", indices, flat), updates, axis=0, reduction="add")
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


class Relu(Op):
    kind = "activation"
    shape_preserving = True
    makes_nonneg = True

    def transpose(self, e, g, weight=None):
        return e.op("Where", e.op("Greater", self.x, np.float32(0)), g, np.float32(0))


class LeakyRelu(Op):
    """y = x, or alpha x below 0. Relevance passes as through a ReLU: under LRP-0 (gradient x
    input) the relevance at x is g * alpha * x = g * y, the relevance at y."""

    kind = "activation"
    shape_preserving = True

    def transpose(self, e, g, weight=None):
        alpha = np.float32(self.node.attrs.get("alpha", 0.01))
        return e.op("Where", e.op("Greater", self.x, np.float32(0)), g, e.mul(g, alpha))


class Clip(Op):
    """ReLU6 and other clips. Where the clip holds the output constant, the output no longer
    depends on the input (as with a bias): that relevance is absorbed; inside the range it
    passes. This is the op's gradient, the reading under which LRP-0 is gradient x input."""

    kind = "activation"
    shape_preserving = True
    default_rule = "gradient"

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        if len(self.data_inputs) != 1 or node.inputs[0] is not self.x:
            raise self.error("its bounds are computed from the image; onnxlrp needs constant bounds")
        self.low, self.high = (None if v is None else float(v) for v in
                               (_constant_input(self, i, "bound") for i in (1, 2)))
        self.makes_nonneg = self.low is not None and self.low >= 0

    def transpose(self, e, g, weight=None):
        inside = None
        for bound, compare in ((self.low, "Greater"), (self.high, "Less")):
            if bound is not None:
                test = e.op(compare, self.x, np.float32(bound))
                inside = test if inside is None else e.op("And", inside, test)
        return g if inside is None else e.op("Where", inside, g, np.float32(0))


class Sigmoid(Op):
    """A gate's squashing, s = 1 / (1 + exp(-x)), in (0, 1). Relevance reaches it only where a
    gate's branch is explained (the gradient baselines); its VJP is g s (1 - s)."""

    kind = "gate"
    shape_preserving = True
    makes_nonneg = True
    default_rule = "gradient"

    def transpose(self, e, g, weight=None):
        s = self.output
        return e.mul(g, e.mul(s, e.sub(np.float32(1), s)))


class HardSigmoid(Sigmoid):
    """max(0, min(1, alpha x + beta)); its VJP is alpha g where the ramp is not clipped."""

    def transpose(self, e, g, weight=None):
        alpha, beta = np.float32(self.node.attrs.get("alpha", 0.2)), np.float32(self.node.attrs.get("beta", 0.5))
        z = e.add(e.mul(self.x, alpha), beta)
        inside = e.op("And", e.op("Greater", z, np.float32(0)), e.op("Less", z, np.float32(1)))
        return e.op("Where", inside, e.mul(g, alpha), np.float32(0))


#: ops whose output gates a signal when multiplied with it (x * g)
GATES = {"Sigmoid", "HardSigmoid"}


class GateMul(Op):
    """x * g, g computed from the data by a gate (squeeze-excitation, SiLU's x * sigmoid(x)).

    LRP holds the gate constant by default: all relevance goes to the signal x, none into the
    gate's branch; that conserves, and LRP-0 then equals gradient x input of the model with
    the gate detached. The gradient (vjp) reaches both inputs."""

    kind = "gate"
    shape_preserving = True  # the output has the signal's shape; the gate broadcasts
    keeps_sign = True  # a gate >= 0 times a signal >= 0
    default_rule = "gate"

    def __init__(self, node, is_data, path, gate: gs.Tensor):
        super().__init__(node, is_data, path)
        self.gate = gate
        self.x = next(t for t in self.data_inputs if t is not gate)  # the signal
        signal, out, gate_shape = _static(self.x, node, path), _static(self.output, node, path), _static(gate, node, path)
        if signal[1:] != out[1:] or len(gate_shape) != len(out):
            raise self.error(f"the gate {gate_shape} must broadcast over the signal {signal}, not widen it")
        self.gate_axes = [axis for axis in range(1, len(out)) if gate_shape[axis] == 1 and out[axis] != 1]

    def transpose(self, e, g, weight=None):
        return e.mul(g, self.gate)

    def vjp(self, e, g):
        to_gate = e.mul(g, self.x)
        if self.gate_axes:
            to_gate = e.reduce_sum(to_gate, self.gate_axes, keepdims=1)
        return {self.x.name: self.transpose(e, g), self.gate.name: to_gate}


def _gate(computed: list[gs.Tensor]) -> gs.Tensor | None:
    """The one computed input of a Mul that a gate op produced, if there is exactly one."""
    gates = [t for t in computed if t.inputs and t.inputs[0].op in GATES]
    return gates[0] if len(gates) == 1 and len(computed) == 2 else None


class Reshape(Op):
    """Flatten, Reshape, Squeeze, Unsqueeze: relevance keeps its values, takes the input's shape."""

    kind = "reshape"
    keeps_sign = True
    default_rule = "gradient"

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        if node.inputs[0] is not self.x or len(self.data_inputs) != 1:
            raise self.error("its shape input depends on the image values")

    def transpose(self, e, g, weight=None):
        return e.op("Reshape", g, e.op("Shape", self.x))


class Transpose(Reshape):
    def transpose(self, e, g, weight=None):
        perm = list(self.node.attrs.get("perm", reversed(range(len(self.x.shape)))))
        return e.op("Transpose", g, perm=[int(i) for i in np.argsort(perm)])


class Slice(Reshape):
    """A constant slice (step 1): relevance goes back to the elements it took, zero elsewhere."""

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        starts, ends, axes, steps = (_constant_input(self, i, what) for i, what in
                                     enumerate(("starts", "ends", "axes", "steps"), 1))
        if starts is None or ends is None:
            raise self.error("its starts and ends are missing")
        self.shape = _static(self.x, node, path)
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

    kind = "reshape"
    default_rule = "gradient"

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        shapes = [_static(t, node, path) for t in node.inputs]
        self.axis = int(node.attrs["axis"]) % len(shapes[0])
        if self.axis == 0:
            raise self.error("concatenating along the batch axis mixes images; no LRP rule applies")
        offsets = np.cumsum([0] + [shape[self.axis] for shape in shapes])
        self.parts = [(t, int(offsets[i]), int(offsets[i + 1])) for i, t in enumerate(node.inputs) if is_data(t)]
        # the output is >= 0 where the computed parts are, if every constant part is >= 0 too
        self.keeps_sign = all(bool(np.all(_const(t) >= 0)) for t in node.inputs if not is_data(t))

    def vjp(self, e, g):
        result: dict[str, gs.Tensor] = {}
        for tensor, begin, end in self.parts:
            part = e.op("Slice", g, e.ints([begin]), e.ints([end]), e.ints([self.axis]))
            result[tensor.name] = e.add(result[tensor.name], part) if tensor.name in result else part
        return result


class Pad(Reshape):
    """A constant Pad that canonicalisation could not merge: relevance on the padding is dropped."""

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        if node.attrs.get("mode", "constant") != "constant":
            raise self.error(f"{node.attrs['mode']} padding is not supported")
        pads = node.attrs.get("pads")
        if pads is None:
            pads = _const(node.inputs[1]) if _given(node, 1) is not None else None
        if pads is None or _given(node, 3) is not None:
            raise self.error("only constant pads over all axes are supported")
        value = _constant_input(self, 2, "fill value")
        value = node.attrs.get("value", 0.0) if value is None else value
        # The padding is part of the output: non-negative inputs stay non-negative only if it is too.
        self.keeps_sign = bool(np.all(np.asarray(value) >= 0))
        self.shape = _static(self.x, node, path)
        rank = len(self.shape)
        self.begins = [int(p) for p in pads[:rank]]
        if any(int(p) < 0 for p in pads):
            raise self.error("negative pads (cropping) are not supported")

    def transpose(self, e, g, weight=None):
        ends = [b + n for b, n in zip(self.begins[1:], self.shape[1:])]
        axes = list(range(1, len(self.shape)))
        return e.op("Slice", g, e.ints(self.begins[1:]), e.ints(ends), e.ints(axes))


class ResidualAdd(Op):
    """An Add of two computed tensors: a residual merge. Relevance is split, see splitting.py."""

    kind = "merge"
    keeps_sign = True
    shape_preserving = True
    default_rule = "split"

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        shapes = [t.shape for t in self.data_inputs]
        if shapes[0] != shapes[1]:
            raise self.error(f"adds tensors of shapes {shapes[0]} and {shapes[1]}; a residual merge needs equal shapes")


#: ONNX op type -> adapter. Add/Sub/Mul/Div are dispatched by how many inputs are computed.
OPS: dict[str, type[Op]] = {
    "Conv": Conv,
    "Gemm": Gemm,
    "MatMul": MatMul,
    "BatchNormalization": Affine,
    "AveragePool": AveragePool,
    "GlobalAveragePool": GlobalAveragePool,
    "ReduceMean": ReduceMean,
    "MaxPool": MaxPool,
    "Relu": Relu,
    "LeakyRelu": LeakyRelu,
    "Sigmoid": Sigmoid,
    "HardSigmoid": HardSigmoid,
    "Clip": Clip,
    "Flatten": Reshape,
    "Reshape": Reshape,
    "Squeeze": Reshape,
    "Unsqueeze": Reshape,
    "Transpose": Transpose,
    "Pad": Pad,
    "Slice": Slice,
    "Concat": Concat,
}
_ARITHMETIC = ("Add", "Sub", "Mul", "Div")


def make_op(node: gs.Node, is_data: IsData, path: str = "model") -> Op:
    """The adapter for a node on the data path, or a one-line error naming the node."""
    computed = [t for t in node.inputs if is_data(t)]
    if node.op in _ARITHMETIC:
        if len(computed) == 1 and node.inputs.count(computed[0]) == 1:
            return Affine(node, is_data, path)
        if node.op == "Add":
            return ResidualAdd(node, is_data, path)
        gate = _gate(computed) if node.op == "Mul" else None
        if gate is not None:
            return GateMul(node, is_data, path, gate)
        hint = " (a gate is a Sigmoid or HardSigmoid output)" if node.op == "Mul" else ""
        raise OnnxLrpError(
            f"{path}: node '{node.name}' ({node.op}): no LRP rule for {node.op} of two computed tensors{hint}"
        )
    cls = OPS.get(node.op)
    if cls is None:
        raise OnnxLrpError(f"{path}: node '{node.name}' ({node.op}): no LRP rule for op type {node.op}")
    return cls(node, is_data, path)
