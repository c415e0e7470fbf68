"""Ops linear in their data input given constant parameters: Conv, Gemm, MatMul, and
BatchNormalization or constant arithmetic as an elementwise affine map."""
from __future__ import annotations

import numpy as np

from .base import Family, LinearOp, const_value, finite_values, given, is_one, static_shape, window_transpose


class Conv(LinearOp):
    op_types = ("Conv",)
    family = Family.CONVOLUTION
    weight_input = 1
    channel_axis = 1  # ONNX convolutions are channels-first

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        if node.inputs[0] is not self.x or len(self.data_inputs) != 1:
            raise self.error("its weights are computed at run time; onnxlrp needs constant weights")
        self.weight = const_value(node.inputs[1])
        if self.weight is None:
            raise self.error("its weights are computed at run time; onnxlrp needs constant weights")
        bias = given(node, 2)
        self.bias = const_value(bias) if bias is not None else None
        if bias is not None and self.bias is None:
            raise self.error("its bias is computed at run time; onnxlrp needs a constant bias")
        rank = self.weight.ndim - 2
        self.in_shape = static_shape(self.x, node, path)
        self.out_shape = static_shape(self.output, node, path)
        self.kernel = list(self.weight.shape[2:])
        self.strides = list(node.attrs.get("strides", [1] * rank))
        self.dilations = list(node.attrs.get("dilations", [1] * rank))
        self.pads = list(node.attrs.get("pads", [0] * (2 * rank)))
        self.group = int(node.attrs.get("group", 1))
        if self.group > 1:  # depthwise (one input channel per group) and grouped convolutions
            self.variant = "grouped convolution"

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


class Gemm(LinearOp):
    op_types = ("Gemm",)
    family = Family.DENSE
    weight_input = 1

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        if node.inputs[0] is not self.x or len(self.data_inputs) != 1 or node.attrs.get("transA", 0):
            raise self.error("only x @ W + b with constant W and b is supported")
        self.weight = const_value(node.inputs[1])
        if self.weight is None:
            raise self.error("its weights are computed at run time; onnxlrp needs constant weights")
        self.trans_b = int(node.attrs.get("transB", 0))
        bias = given(node, 2)
        self.bias = const_value(bias) if bias is not None else None
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
    op_types = ("MatMul",)
    family = Family.DENSE
    weight_input = 1

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        self.weight = const_value(node.inputs[1])
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
    """y = x * scale + shift, elementwise with constants: constant arithmetic (and, as the
    subclass BatchNorm, BatchNormalization). make_op gives it an Add, Sub, Mul or Div of one
    computed tensor; of two, the op is a merge, a difference or a gate."""

    op_types = ("Add", "Sub", "Mul", "Div")
    family = Family.AFFINE
    kind = "affine"
    shape_preserving = True
    carries_bounds = True  # elementwise y = a x + b: monotone in each element
    carries_factor = True  # a gate's factor shifted or scaled by constants is still a factor
    default_rule = "pass"

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        self.weight, self.bias = self._coefficients(node)
        shape = static_shape(self.x, node, path)
        if static_shape(self.output, node, path)[1:] != shape[1:]:
            raise self.error(f"its constant broadcasts the input {shape} to {self.output.shape}")

    def _coefficients(self, node) -> tuple[np.ndarray, np.ndarray | None]:
        one = np.array(1.0, dtype=np.float32)
        other = next(t for t in node.inputs if t is not self.x)
        c = const_value(other)
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

    @staticmethod
    def interval(node, x, inner: tuple[float, float]) -> tuple[float, float] | None:
        """The interval holding y where x lies in `inner` (lrp.ops.gates.factor_range), or None."""
        other = next(t for t in node.inputs if t is not x)
        c = finite_values(const_value(other))
        if c is None:
            return None
        lo, hi = inner
        first = node.inputs[0] is x
        if node.op == "Add":
            return (lo + c.min(), hi + c.max())
        if node.op == "Sub":
            return (lo - c.max(), hi - c.min()) if first else (c.min() - hi, c.max() - lo)
        if node.op == "Div":
            if not first or (c == 0).any():
                return None  # c / g is unbounded where g nears zero
            c = 1.0 / c
        ends = [a * b for a in (lo, hi) for b in (c.min(), c.max())]
        return (float(min(ends)), float(max(ends)))

    def forward(self, e, x, weight, bias):
        y = x if is_one(weight) else e.mul(x, e.const(weight))
        return y if bias is None else e.add(y, e.const(bias))

    def transpose(self, e, g, weight=None):
        weight = self.weight if weight is None else weight
        return g if is_one(weight) else e.mul(g, e.const(weight))

    def describe(self) -> str:
        return "affine"


class BatchNorm(Affine):
    """Inference-mode BatchNormalization: a per-channel affine map (Affine._coefficients)."""

    op_types = ("BatchNormalization",)
    family = Family.BATCH_NORM
    channel_axis = 1
    carries_factor = False  # a factor is not normalised on its way to the Mul

    def _coefficients(self, node) -> tuple[np.ndarray, np.ndarray | None]:
        params = [const_value(t) for t in node.inputs[1:5]]
        if any(p is None for p in params) or len(node.outputs) != 1:
            raise self.error("only inference-mode BatchNormalization with constant statistics is supported")
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + node.attrs.get("epsilon", 1e-5))
        rank = len(self.x.shape)
        shape = (-1,) + (1,) * (rank - 2)
        return (scale.reshape(shape).astype(np.float32),
                (beta - mean * scale).reshape(shape).astype(np.float32))
