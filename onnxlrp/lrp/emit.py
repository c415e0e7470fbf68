"""A small helper that appends ONNX nodes to an onnx-graphsurgeon graph.

Every emitted node and tensor gets a readable unique name ``lrp/<forward node>/<op>_<k>``,
so the relevance graph can be read next to the model in Netron.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Protocol

import numpy as np
import onnx_graphsurgeon as gs

TensorLike = gs.Tensor | np.ndarray | float | int


class Rewriter(Protocol):
    """Changes every node emitted within Emitter.rewriting (lrp.conditional.ByCondition)."""

    def inputs(self, e: Emitter, op_type: str, inputs: list[gs.Tensor]) -> tuple[list[gs.Tensor], Finish]: ...


Finish = Callable[["Emitter", list[gs.Variable]], list[gs.Variable]]


class Emitter:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self._count = 0
        self._scope = "lrp"
        self._consts: dict[int, tuple[np.ndarray, gs.Constant]] = {}
        self._scalars: dict[tuple, gs.Constant] = {}
        self._waits: dict[tuple, gs.Variable] = {}  # after()'s nodes, shared per dependency
        self._rewriter: Rewriter | None = None

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        outer, self._scope = self._scope, f"lrp/{name}"
        try:
            yield
        finally:
            self._scope = outer

    def _name(self, kind: str) -> str:
        self._count += 1
        return f"{self._scope}/{kind}_{self._count}"

    def const(self, value: np.ndarray | float | int, dtype=np.float32) -> gs.Constant:
        """A constant; the same array object (or scalar value) maps to one initializer."""
        if isinstance(value, np.ndarray):
            cached = self._consts.get(id(value))
            if cached is not None and cached[0] is value:
                return cached[1]
            tensor = gs.Constant(self._name("const"), np.ascontiguousarray(value))
            self._consts[id(value)] = (value, tensor)  # holding the array keeps its id unique
            return tensor
        if isinstance(value, np.generic):  # numpy scalars keep their own type
            dtype = value.dtype
        key = (float(value), np.dtype(dtype).str)
        if key not in self._scalars:
            self._scalars[key] = gs.Constant(self._name("scalar"), np.array(value, dtype=dtype))
        return self._scalars[key]

    def ints(self, values) -> gs.Constant:
        """An int64 constant (axes, shapes, indices); equal values share one initializer."""
        array = np.asarray(values, dtype=np.int64)
        key = ("ints", array.shape, tuple(array.reshape(-1).tolist()))
        if key not in self._scalars:
            self._scalars[key] = gs.Constant(self._name("ints"), array)
        return self._scalars[key]

    @contextmanager
    def rewriting(self, rewriter: Rewriter) -> Iterator[None]:
        """Within the block, every node's inputs pass through rewriter.inputs, which may emit
        nodes of its own (emitted as they are) and says what becomes of the node's outputs."""
        outer, self._rewriter = self._rewriter, rewriter
        try:
            yield
        finally:
            self._rewriter = outer

    def _tensor(self, value: TensorLike) -> gs.Tensor:
        return value if isinstance(value, gs.Tensor) else self.const(value)

    def op(self, op_type: str, *inputs: TensorLike, outputs: int = 1, **attrs):
        name = self._name(op_type)
        tensors, rewriter, finish = [self._tensor(i) for i in inputs], self._rewriter, None
        if rewriter is not None:
            self._rewriter = None  # the rewriter's own nodes are emitted as they are
            tensors, finish = rewriter.inputs(self, op_type, tensors)
        outs = [gs.Variable(f"{name}:{i}") for i in range(outputs)]
        self.graph.nodes.append(gs.Node(op_type, name, attrs=attrs, inputs=tensors, outputs=outs))
        if rewriter is not None:
            outs = finish(self, outs)
            self._rewriter = rewriter
        return outs[0] if outputs == 1 else outs

    # Shorthands for the arithmetic the rules are made of.
    def add(self, a: TensorLike, b: TensorLike) -> gs.Variable:
        return self.op("Add", a, b)

    def sub(self, a: TensorLike, b: TensorLike) -> gs.Variable:
        return self.op("Sub", a, b)

    def mul(self, a: TensorLike, b: TensorLike) -> gs.Variable:
        return self.op("Mul", a, b)

    def div(self, a: TensorLike, b: TensorLike) -> gs.Variable:
        return self.op("Div", a, b)

    def sum(self, terms: list[gs.Tensor]) -> gs.Tensor:
        return terms[0] if len(terms) == 1 else self.op("Sum", *terms)

    def reduce_sum(self, x: gs.Tensor, axes, keepdims: int = 0) -> gs.Variable:
        return self.op("ReduceSum", x, self.ints(axes), keepdims=keepdims)

    def after(self, x: gs.Tensor, x_rank: int, dependency: gs.Tensor) -> gs.Variable:
        """`x` itself, but not available before `dependency` is computed.

        onnxruntime runs a node as soon as its inputs exist. A rule's modified forward pass
        (z+ = W+ x, ...) needs only forward tensors, so it would run during the forward pass and
        its output would stay in memory until the backward pass divides by it; on ResNet50 that
        is a third of the working memory. Reshaping x to its own shape, with the shape computed
        as zeros from one element of `dependency`, delays it at no cost (Reshape aliases x).
        The few nodes this takes are shared between tensors waiting for the same dependency."""
        key = (dependency.name, x_rank)
        if key not in self._waits:
            flag = self._waits.get((dependency.name, "flag"))
            if flag is None:
                first = self.op("Slice", self.op("Reshape", dependency, self.ints([-1])), self.ints([0]), self.ints([1]))
                flag = self._waits[dependency.name, "flag"] = self.op("IsNaN", first)
            zeros = self.ints([0] * x_rank)  # as a Reshape shape, 0 keeps the input's size on that axis
            self._waits[key] = self.op("Where", flag, zeros, zeros)  # zeros whatever the value, even NaN
        return self.op("Reshape", x, self._waits[key])

    def sum_per_sample(self, x: gs.Tensor, rank: int) -> gs.Variable:
        """Sum over every axis but the batch axis: shape [N]."""
        return self.reduce_sum(x, list(range(1, rank)))
