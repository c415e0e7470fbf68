"""Gates: a signal multiplied by a factor computed from the data (x * g)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Op, static_shape

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
        signal, out, gate_shape = static_shape(self.x, node, path), static_shape(self.output, node, path), static_shape(gate, node, path)
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


OPS = {"Sigmoid": Sigmoid, "HardSigmoid": HardSigmoid}
