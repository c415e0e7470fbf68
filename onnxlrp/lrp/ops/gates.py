"""Gates: a signal multiplied (or divided) by a factor computed from the data.

``x * g`` where g comes out of a squashing op (squeeze-excitation's Sigmoid, ECA, MobileNetV3's
HardSigmoid, ResNeSt's radix Softmax, SiLU's x * sigmoid(x), GELU's x * Phi(x) written with
Erf) and ``x / s`` where s is a statistic of the data (a normalisation's standard deviation,
written out as ReduceMean / Pow / Sqrt). HardSwish and Gelu are the same as single ops.

LRP holds the factor constant by default (rule ``gate``): all relevance goes to the signal,
none into the factor's branch. That conserves, and LRP-0 then equals gradient x input of the
model with the factor detached, the standard treatment of multiplicative gates. The ops that
compute a factor (Sigmoid, Softmax, Erf, Sqrt, ...) supply their gradient, for the gradient
baselines and for the rules that send a share into the gate's branch.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from .base import ADAPTERS, Family, Op, adapter_class, const_value, static_shape


class Squash(Op):
    """An op that computes a factor from the data. Relevance reaches it only where a gate's
    branch is explained (gradients, or a rule that gives the gate a share); LRP passes it on
    as through an activation."""

    kind = "squash"
    family = Family.ELEMENTWISE
    shape_preserving = True
    makes_factor = True  # x * g (or x / s) with g its output is a gate


class Sigmoid(Squash):
    """s = 1 / (1 + exp(-x)), in (0, 1); its VJP is g s (1 - s)."""

    op_types = ("Sigmoid",)
    family = Family.BOUNDED_ACTIVATION
    makes_nonneg = True

    @classmethod
    def output_range(cls, node):
        return (0.0, 1.0)

    def transpose(self, e, g, weight=None):
        s = self.output
        return e.mul(g, e.mul(s, e.sub(np.float32(1), s)))


class HardSigmoid(Sigmoid):
    """max(0, min(1, alpha x + beta)); its VJP is alpha g where the ramp is not clipped."""

    op_types = ("HardSigmoid",)

    def transpose(self, e, g, weight=None):
        alpha, beta = np.float32(self.node.attrs.get("alpha", 0.2)), np.float32(self.node.attrs.get("beta", 0.5))
        z = e.add(e.mul(self.x, alpha), beta)
        inside = e.op("And", e.op("Greater", z, np.float32(0)), e.op("Less", z, np.float32(1)))
        return e.op("Where", inside, e.mul(g, alpha), np.float32(0))


class Softmax(Squash):
    """Attention weights over an axis (ResNeSt's radix groups); VJP s (g - sum(g s))."""

    op_types = ("Softmax",)
    family = Family.BOUNDED_ACTIVATION
    makes_nonneg = True

    @classmethod
    def output_range(cls, node):
        return (0.0, 1.0)

    def transpose(self, e, g, weight=None):
        s = self.output
        axis = int(self.node.attrs.get("axis", -1))
        inner = e.op("ReduceSum", e.mul(g, s), e.ints([axis]), keepdims=1)
        return e.mul(s, e.sub(g, inner))


class Erf(Squash):
    """The error function of GELU's Phi(x) = (1 + erf(x / sqrt 2)) / 2; VJP g 2/sqrt(pi) exp(-x^2)."""

    op_types = ("Erf",)
    family = Family.BOUNDED_ACTIVATION

    @classmethod
    def output_range(cls, node):
        return (-1.0, 1.0)

    def transpose(self, e, g, weight=None):
        bump = e.op("Exp", e.op("Neg", e.mul(self.x, self.x)))
        return e.mul(g, e.mul(bump, np.float32(2 / math.sqrt(math.pi))))


class Sqrt(Squash):
    """A standard deviation's square root; VJP g / (2 sqrt x)."""

    op_types = ("Sqrt",)

    makes_nonneg = True

    def transpose(self, e, g, weight=None):
        return e.div(e.mul(g, np.float32(0.5)), self.output)


class Reciprocal(Squash):
    """1 / s, as some exporters divide by a standard deviation; VJP -g / x^2."""

    op_types = ("Reciprocal",)

    def transpose(self, e, g, weight=None):
        return e.op("Neg", e.mul(g, e.mul(self.output, self.output)))


class Pow(Squash):
    """x^p with a constant p (a variance's square); VJP g p x^(p-1)."""

    op_types = ("Pow",)
    makes_factor = False  # a variance's square, not a factor

    def __init__(self, node, is_data, path="model"):
        super().__init__(node, is_data, path)
        p = const_value(node.inputs[1])
        if node.inputs[0] is not self.x or p is None or p.size != 1:
            raise self.error("only a computed tensor to a constant power is supported")
        self.power = float(p.reshape(-1)[0])
        self.makes_nonneg = self.power == 2.0

    def transpose(self, e, g, weight=None):
        p = self.power
        slope = self.x if p == 2.0 else e.op("Pow", self.x, np.float32(p - 1))
        return e.mul(g, e.mul(slope, np.float32(p)))


class SelfGated(Op):
    """x * gate(x) as one op: HardSwish (gate relu6(x + 3) / 6) and Gelu (gate Phi(x)).
    LRP holds the gate constant, so relevance passes unchanged; the VJP differentiates both."""

    op_types = ("HardSwish", "Gelu")
    family = Family.GATE
    kind = "gate"
    shape_preserving = True
    default_rule = "gate"

    def transpose(self, e, g, weight=None):
        x = self.x
        if self.node.op == "HardSwish":  # gate + x gate' = min(1, max(0, x/6 + 1/2)) + x/6 on (-3, 3)
            gate = e.op("HardSigmoid", x, alpha=1 / 6, beta=0.5)
            inside = e.op("And", e.op("Greater", x, np.float32(-3)), e.op("Less", x, np.float32(3)))
            slope = e.op("Where", inside, e.mul(x, np.float32(1 / 6)), np.float32(0))
            return e.mul(g, e.add(gate, slope))
        if self.node.attrs.get("approximate", "none") != "none":
            raise self.error("the gradient of the tanh approximation of Gelu is not supported")
        phi = e.mul(e.add(e.op("Erf", e.mul(x, np.float32(1 / math.sqrt(2)))), np.float32(1)), np.float32(0.5))
        density = e.mul(e.op("Exp", e.mul(e.mul(x, x), np.float32(-0.5))), np.float32(1 / math.sqrt(2 * math.pi)))
        return e.mul(g, e.add(phi, e.mul(x, density)))



class GateMul(Op):
    """x * g or x / g, with g computed from the data by a gate (see the module docstring).

    LRP holds the gate constant by default: all relevance goes to the signal x, none into the
    gate's branch; that conserves, and LRP-0 then equals gradient x input of the model with
    the gate detached. The gradient (vjp) reaches both inputs."""

    family = Family.GATE  # made by make_op for a Mul or Div of two computed tensors (no op_types)
    kind = "gate"
    shape_preserving = True  # the output has the signal's shape; the gate broadcasts
    keeps_sign = True  # a gate >= 0 times a signal >= 0
    default_rule = "gate"

    def __init__(self, node, is_data, path, gate: gs.Tensor):
        super().__init__(node, is_data, path)
        self.gate = gate
        self.divides = node.op == "Div"
        self.x = next(t for t in self.data_inputs if t is not gate)  # the signal
        signal, out, gate_shape = static_shape(self.x, node, path), static_shape(self.output, node, path), static_shape(gate, node, path)
        if signal[1:] != out[1:] or len(gate_shape) != len(out):
            raise self.error(f"the gate {gate_shape} must broadcast over the signal {signal}, not widen it")
        self.gate_axes = [axis for axis in range(1, len(out)) if gate_shape[axis] == 1 and out[axis] != 1]

    def factor(self, e):
        return e.div(np.float32(1), self.gate) if self.divides else self.gate

    def transpose(self, e, g, weight=None):
        return e.div(g, self.gate) if self.divides else e.mul(g, self.gate)

    def vjp(self, e, g):
        # d(x g)/dg = x; d(x / s)/ds = -x / s^2 = -y / s
        to_gate = e.op("Neg", e.div(e.mul(g, self.output), self.gate)) if self.divides else e.mul(g, self.x)
        if self.gate_axes:
            to_gate = e.reduce_sum(to_gate, self.gate_axes, keepdims=1)
        return {self.x.name: self.transpose(e, g), self.gate.name: to_gate}


def factor_makers() -> list[str]:
    """The op types whose output is a factor for a signal (Op.makes_factor), for messages."""
    return sorted(op for op, cls in ADAPTERS.items() if cls.makes_factor)


def _from_gate(tensor: gs.Tensor, is_data) -> bool:
    """Whether a computed tensor is a gate's factor: the output of an op that makes factors
    (Op.makes_factor), possibly carried through ops that carry them (Op.carries_factor:
    constant arithmetic and reshapes)."""
    for _ in range(16):  # factor chains are short; a bound keeps a malformed graph from looping
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is None:
            return False
        adapter = adapter_class(producer.op)
        if adapter is not None and adapter.makes_factor:
            return True
        computed = [t for t in producer.inputs if is_data(t)]
        if adapter is None or not adapter.carries_factor or len(computed) != 1:
            return False
        tensor = computed[0]
    return False


def factor_range(tensor: gs.Tensor, is_data, depth: int = 16) -> tuple[float, float] | None:
    """An interval holding every value of a computed tensor, found from its structure, or None
    where it is not bounded (or not provably so): a bounded element-wise op (Clip with both
    bounds, Sigmoid, HardSigmoid, Softmax, Erf), then constant arithmetic (+, -, * a constant,
    / a non-zero constant) and reshapes. ``Clip(x + 3, 0, 6) / 6`` (HardSwish's gate written
    out, as paddle2onnx does) lies in [0, 1]; ``x + 3`` and ``Relu(x)`` have no bound."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or depth == 0:
        return None
    adapter = adapter_class(producer.op)
    computed = [t for t in producer.inputs if is_data(t)]
    if adapter is None or len(computed) != 1 or producer.inputs.count(computed[0]) != 1:
        return None
    if adapter.family is Family.BOUNDED_ACTIVATION:  # the data must be what is bounded, not a bound
        return adapter.output_range(producer) if producer.inputs[0] is computed[0] else None
    inner = factor_range(computed[0], is_data, depth - 1)
    if inner is None:
        return None
    if adapter.passes_values:
        return inner
    if adapter.family is Family.AFFINE:  # constant arithmetic
        return adapter.interval(producer, computed[0], inner)
    return None


def _reaches(tensor: gs.Tensor, target: gs.Tensor, is_data, depth: int = 16) -> bool:
    """Whether `tensor` is computed from `target` through a chain of ops of one computed input."""
    for _ in range(depth):
        if tensor is target:
            return True
        producer = tensor.inputs[0] if tensor.inputs else None
        computed = [t for t in producer.inputs if is_data(t)] if producer is not None else []
        if len(computed) != 1:
            return False
        tensor = computed[0]
    return False


def find_gate(node: gs.Node, computed: list[gs.Tensor], is_data) -> gs.Tensor | None:
    """The factor of a Mul or Div of two computed tensors, or None where it is not a gate.
    A Div's divisor always is (x / s); a Mul's factor is the one input a gate computed (a GATES
    op, through constant arithmetic), or else the one input that is bounded by its structure
    (factor_range: HardSwish written out as x * Clip(x + 3, 0, 6) / 6, a squeeze-excitation's
    Clip(s + 3, 0, 6) / 6). Holding a bounded factor constant is the standard gate treatment.
    Where both inputs are bounded, the factor is the one computed from the other (x * g(x))."""
    if len(computed) != 2 or computed[0] is computed[1]:
        return None
    if node.op == "Div":
        return node.inputs[1] if node.inputs[0] is not node.inputs[1] else None
    gates = [t for t in computed if _from_gate(t, is_data)]
    if len(gates) == 1:
        return gates[0]
    bounded = [t for t in computed if factor_range(t, is_data) is not None]
    if len(bounded) == 2:
        a, b = bounded
        bounded = [t for t, other in ((a, b), (b, a)) if _reaches(t, other, is_data) and not _reaches(other, t, is_data)]
    return bounded[0] if len(bounded) == 1 else None
