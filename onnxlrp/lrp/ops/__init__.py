"""Op adapters by family, in one table: ONNX op type -> adapter class.

Adding an op type is one adapter class in a module of this package: the class declares the
op types it handles (``op_types``), its family (onnxlrp.ir.opinfo.Family) and its facts,
and defining it registers it (base.Op.__init_subclass__). Every module here is imported
below, so a new module needs no entry anywhere else; the presets give the op its family's
rule, and the relevance walk, the IR and the rules need no change.

Add, Sub, Mul and Div are dispatched by their inputs: with one computed input they are
affine (constant arithmetic), an Add of two computed tensors is a residual merge, a Sub of
two is a difference (a normalisation's centring), a Mul of a signal and a gate's output or
a Div by a computed tensor is a gate.
"""
from __future__ import annotations

import importlib
import pkgutil

import onnx_graphsurgeon as gs

from ...errors import NoRuleError
from .base import ADAPTERS, Family, IsData, LinearOp, Op, adapter_class
from .gates import GateMul, factor_makers, find_gate
from .linear import Affine
from .merge import Difference, ResidualAdd
from .pooling import MaxPool
from .quantization import QOPERATOR

# Every module of the package, so that each adapter class is defined and so registered.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
del _module

__all__ = ["OPS", "OP_TYPES", "Family", "LinearOp", "MaxPool", "Op", "adapter_class", "facts", "make_op"]

#: ONNX op type -> adapter class (the registry itself: complete once the modules above are imported)
OPS: dict[str, type[Op]] = ADAPTERS
_ARITHMETIC = Affine.op_types  # dispatched by their inputs, see the module docstring
#: every op type an adapter handles: what a rule override may name besides a node
OP_TYPES = frozenset(OPS)


def facts(op_type: str) -> type[Op] | None:
    """What the adapter of `op_type` declares (its class: family, weight_input, shape_inputs,
    channel_axis, ...), for code that sees only an onnx NodeProto; None where no adapter handles it."""
    return adapter_class(op_type)


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
        hint = (f" (a gate is the output of {', '.join(factor_makers())}, or a factor bounded by one of them or "
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
