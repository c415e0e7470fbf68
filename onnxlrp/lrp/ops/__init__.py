"""Op adapters by family, in one table: ONNX op type -> adapter class.

Adding an op type is one adapter class in its family's module and one entry in that
module's ``OPS``; the relevance walk and the rules need no change.

Add, Sub, Mul and Div are dispatched by their inputs: with one computed input they are
affine (constant arithmetic), an Add of two computed tensors is a residual merge, a Mul
of a signal and a gate is a gate.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ...errors import OnnxLrpError
from . import activations, gates, linear, pooling, shapes
from .base import IsData, LinearOp, Op
from .gates import GateMul, _gate
from .linear import Affine
from .merge import ResidualAdd
from .pooling import MaxPool

__all__ = ["OPS", "LinearOp", "MaxPool", "Op", "make_op"]

OPS: dict[str, type[Op]] = {**linear.OPS, **pooling.OPS, **activations.OPS, **gates.OPS, **shapes.OPS}
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
