"""Op adapters by family, in one table: ONNX op type -> adapter class.

Adding an op type is one adapter class in its family's module and one entry in that
module's ``OPS``; the relevance walk and the rules need no change.

Add, Sub, Mul and Div are dispatched by their inputs: with one computed input they are
affine (constant arithmetic), an Add of two computed tensors is a residual merge, a Sub of
two is a difference (a normalisation's centring), a Mul of a signal and a gate's output or
a Div by a computed tensor is a gate.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ...errors import NoRuleError
from . import activations, gates, linear, norms, pooling, quantization, shapes
from .base import IsData, LinearOp, Op
from .gates import GateMul, find_gate
from .linear import Affine
from .merge import Difference, ResidualAdd
from .pooling import MaxPool
from .quantization import QOPERATOR

__all__ = ["OPS", "OP_TYPES", "LinearOp", "MaxPool", "Op", "make_op"]

OPS: dict[str, type[Op]] = {**linear.OPS, **pooling.OPS, **activations.OPS, **gates.OPS, **shapes.OPS, **norms.OPS,
                            **quantization.OPS}
_ARITHMETIC = ("Add", "Sub", "Mul", "Div")
#: every op type an adapter handles: what a rule override may name besides a node
OP_TYPES = frozenset(OPS) | frozenset(_ARITHMETIC)


def make_op(node: gs.Node, is_data: IsData, path: str = "model") -> Op:
    """The adapter for a node on the data path, or a one-line error naming the node."""
    computed = [t for t in node.inputs if is_data(t)]
    if node.op in _ARITHMETIC:
        if len(computed) == 1 and node.inputs.count(computed[0]) == 1:
            return Affine(node, is_data, path)
        if node.op == "Add":
            return ResidualAdd(node, is_data, path)
        if node.op == "Sub" and len(computed) == 2 and computed[0] is not computed[1]:
            return Difference(node, is_data, path)
        gate = find_gate(node, computed, is_data) if node.op in ("Mul", "Div") else None
        if gate is not None:
            return GateMul(node, is_data, path, gate)
        hint = (f" (a gate is the output of {', '.join(sorted(gates.GATES))}, or a factor bounded by one of them or "
                "by a Clip with both bounds, computed from the other input)" if node.op == "Mul" else "")
        raise NoRuleError(
            f"{path}: node '{node.name}' ({node.op}): no LRP rule for {node.op} of two computed tensors{hint}"
        )
    cls = OPS.get(node.op)
    if node.op in QOPERATOR:
        raise NoRuleError(f"{path}: node '{node.name}' ({node.op}): no LRP rule for op type {node.op} (a QOperator "
                           "model; quantize in QDQ format, QuantFormat.QDQ, to explain it as deployed)")
    if cls is None:
        raise NoRuleError(f"{path}: node '{node.name}' ({node.op}): no LRP rule for op type {node.op}")
    return cls(node, is_data, path)
