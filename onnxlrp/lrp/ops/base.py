"""What every op adapter shares: the Op protocol, linear ops' parameters, shape helpers.

An adapter wraps one ONNX node on the data path. It says what the op *is* (its family,
its data inputs, whether it keeps inputs non-negative: the protocol onnxlrp.ir reads)
and emits what relevance needs as ONNX nodes: its *transpose* (vector-Jacobian
product) and, for linear ops, its *forward* with given, possibly modified, parameters.
The LRP rules (onnxlrp.lrp.rules) are recipes over these two emitters.

Everything known about an op lives on its adapter class, as class attributes: the op types
it handles (``op_types``: declaring them registers the class, see Op.__init_subclass__),
its family (onnxlrp.ir.opinfo.Family: what presets give rules to), and the facts other
code asks about (whether it carries box bounds or a gate's factor, its channel axis, its
weight input, its shape inputs, ...). Nothing outside this package reads op-type strings
for them, so adding an op is one adapter class in one module of this package.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import ModelError, NoRuleError
from ...ir import opinfo
from ...ir.opinfo import Family
from ..emit import Emitter

IsData = Callable[[gs.Tensor], bool]


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    return tensor.values if isinstance(tensor, gs.Constant) else None


def given(node: gs.Node, index: int) -> gs.Tensor | None:
    """The node's optional input `index`, or None when it is absent."""
    if index < len(node.inputs) and node.inputs[index].name:
        return node.inputs[index]
    return None


def constant_input(op: Op, index: int, what: str) -> np.ndarray | None:
    """The node's optional input `index` as a constant; None when absent, an error when computed."""
    tensor = given(op.node, index)
    if tensor is None:
        return None
    value = const_value(tensor)
    if value is None:
        raise op.error(f"its {what} is computed at run time; onnxlrp needs a constant")
    return value


def finite_values(values: np.ndarray | None) -> np.ndarray | None:
    """A constant as float64 where it is numeric, non-empty and finite, else None."""
    if values is None or values.size == 0 or not np.issubdtype(values.dtype, np.floating) and not np.issubdtype(
            values.dtype, np.integer):
        return None
    values = values.astype(np.float64)
    return values if np.isfinite(values).all() else None


def static_shape(tensor: gs.Tensor, node: gs.Node, path: str) -> list[int]:
    shape = tensor.shape
    if shape is None or not all(isinstance(d, int) for d in shape[1:]):
        raise ModelError(
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
        return e.op("Conv", g, e.const(flipped(weight, group)), pads=[r - p for p, r in zip(pads, reach)], **common)
    ends, output_padding, extra = zip(*(
        transpose_padding(in_shape[2 + i], out_shape[2 + i], kernel[i], strides[i], dilations[i], pads[i], pads[rank + i])
        for i in range(rank)
    ))
    result = e.op("ConvTranspose", g, e.const(weight), pads=list(pads[:rank]) + list(ends),
                  output_padding=list(output_padding), **common)
    if any(extra):
        result = e.op("Pad", result, e.ints([0, 0] + [0] * rank + [0, 0] + list(extra)))
    return result


def flipped(weight: np.ndarray, group: int) -> np.ndarray:
    """The weight of the convolution that is the transpose of a stride-1 convolution: per group,
    output and input channels swapped, every spatial axis reversed."""
    outputs, inputs = weight.shape[:2]
    kernel = weight.shape[2:]
    w = weight.reshape((group, outputs // group, inputs) + kernel).swapaxes(1, 2)
    w = w[(Ellipsis,) + (slice(None, None, -1),) * len(kernel)]
    return np.ascontiguousarray(w.reshape((group * inputs, outputs // group) + kernel))


#: op type -> adapter class, filled as the classes are defined (Op.__init_subclass__)
ADAPTERS: dict[str, type[Op]] = {}


def adapter_class(op_type: str) -> type[Op] | None:
    """The adapter class that handles `op_type` (for Add/Sub/Mul/Div: with one computed input,
    constant arithmetic), or None."""
    return ADAPTERS.get(op_type)


class Op:
    """An op on the data path. Subclasses say which rules apply and emit its transpose.

    A concrete adapter declares ``op_types`` and ``family``; tests/test_families.py walks the
    registry and fails on one that does not declare what its family needs."""

    op_types: tuple[str, ...] = ()  # the ONNX op types this class handles; declaring them registers it
    family: Family | None = None  # what presets give rules to (onnxlrp.ir.opinfo.Family)
    # a finer cut presets can give its own rule ("grouped convolution"), set per node
    variant: str | None = None
    kind = "op"
    linear = False  # forward/transpose take (modified) parameters: LRP rules apply
    shape_preserving = False  # output shape == input shape: the pass rule applies
    keeps_sign = False  # output >= 0 whenever every data input is >= 0
    makes_nonneg = False  # output >= 0 whatever the input (ReLU, ReLU6)
    # each output element is one input element (or a constant) through a monotone map: z^B box
    # bounds given at the image can be replayed through the op (relevance_graph._Box)
    carries_bounds = False
    # what relevance the op's rule may not hand on is reported as (lrp.reach.FAMILIES); None:
    # the op moves relevance without losing any (reshapes), so its totals need not be taken
    loss_family: str | None = "other"
    default_rule = "pass"  # rule used where a preset names none
    shape_inputs: tuple[int, ...] = ()  # inputs that are shapes, sizes, pads or axes (ir/model folds them)
    weight_input: int | None = None  # the input holding the learned kernel (Conv, Gemm, MatMul)
    channel_axis: int | None = None  # the channel axis the op reads (1 by ONNX's convention); None: none
    pools_globally = False  # a mean over all spatial axes: its input is the last conv block (Grad-CAM's layer)
    # the output is a factor for a signal (x * g, x / s): a Mul by it is a gate (gates.find_gate)
    makes_factor = False
    carries_factor = False  # a factor passed through it (one computed input) is still a factor
    passes_values = False  # each output value is an input value: a bounded factor keeps its interval

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for op_type in cls.__dict__.get("op_types", ()):  # its own, not a parent's
            opinfo.register(op_type, cls)  # refuses a second adapter for one op type
            ADAPTERS[op_type] = cls

    @classmethod
    def output_range(cls, node: gs.Node) -> tuple[float, float] | None:
        """An interval holding every output value whatever the input (a bounded activation), or None."""
        return None

    def __init__(self, node: gs.Node, is_data: IsData, path: str = "model"):
        self.node = node
        self.path = path
        self.data_inputs = [t for t in node.inputs if is_data(t)]
        self.x = self.data_inputs[0]
        self.output = node.outputs[0]

    def error(self, message: str) -> NoRuleError:
        """The node as it is has no rule: a one-line error naming it."""
        return NoRuleError(f"{self.path}: node '{self.node.name}' ({self.node.op}): {message}")

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
    loss_family = "layer"  # biases and stabilisers in the rules' denominators
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


def is_one(weight: np.ndarray) -> bool:
    return weight.ndim == 0 and float(weight) == 1.0


def scaled(e: Emitter, y: gs.Tensor, weight: np.ndarray) -> gs.Tensor:
    return y if is_one(weight) else e.mul(y, e.const(weight))
