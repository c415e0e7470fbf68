"""Concept Relevance Propagation in the relevance graph: conditional passes below a layer.

A concept is a channel of a layer (Achtibat et al., Nature Machine Intelligence 2023). Its
conditional relevance is the relevance pass with every other channel's relevance at that layer
set to zero, continued from the layer down to the input. Here K conditions run as a batch
axis after one forward pass and one pass from the logits down to the layer: the relevance at
the layer is repeated K times and masked, and the ops between the input and the layer run
their rules again on [K * N] rows, reading the forward pass's tensors repeated along the batch
axis (ByCondition, an Emitter rewriter), so that every preset and every op works unchanged.

Only the layer's ancestors are walked, from the masked relevance alone: relevance that enters
a skip connection bypassing the layer never reaches the conditional maps (zennit-crp's
exclude_parallel=True), so a concept's map shows that concept only, and the maps of all
channels add up to the pass from the layer itself. Including the parallel branches instead
would add the skip connections' relevance, the same for every concept, to each map.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import ModelError
from ..ir.graph import ModelGraph
from .emit import Emitter, Finish
from .rules import Rule, RuleContext

#: ops that act on each row of the batch alone, with an output of their inputs' rank
#: (elementwise ops, convolutions, pools): where they read the forward pass only, run once
PER_ROW = frozenset({
    "Abs", "Add", "And", "AveragePool", "Cast", "CastLike", "Clip", "Conv", "Div", "Equal", "Erf", "Exp",
    "Greater", "GreaterOrEqual", "HardSigmoid", "Identity", "IsInf", "IsNaN", "LeakyRelu", "Less", "LessOrEqual",
    "Log", "Max", "MaxPool", "Min", "Mod", "Mul", "Neg", "Not", "Or", "Pow", "Reciprocal", "Relu", "Sigmoid", "Sign",
    "Softplus", "Sqrt", "Sub", "Tanh", "Where",
})
#: elementwise ops with numpy broadcasting: a condition's rows [K, N, ...] meet the forward
#: tensor [N, ...] without copying it
BROADCASTING = frozenset({"Add", "And", "Div", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Max",
                          "Min", "Mul", "Or", "Pow", "Sub", "Where"})
_END = 2 ** 62  # a Slice's "to the end"


@dataclass
class ByCondition:
    """The rewriter (Emitter.rewriting) under which the rules run K conditions: the forward
    pass's tensors have N rows, the same for every condition; the relevance has K * N (condition
    k's N after condition k - 1's). A node that reads forward tensors only and acts on each row
    alone (PER_ROW: a rule's modified forward pass, z+ = W+ x) runs once on N rows, and its
    output counts as a forward tensor. An elementwise node that meets relevance and forward
    tensors (BROADCASTING) sees the relevance as [K, N, ...], a view: the forward rows broadcast
    over the conditions. Any other node that reads a forward tensor reads it repeated K times
    (Tile, once per tensor). Tensors made of constants only (the box bounds' forward pass) are
    the same for every row, as constants are."""

    tensors: dict[str, int]  # the forward tensors: name -> rank
    repeats: gs.Tensor  # int64 [1]: K
    done: dict[str, gs.Variable] = field(default_factory=dict)  # forward tensor -> its rows repeated K times
    fixed: set[str] = field(default_factory=set)  # tensors made of constants only

    def kind(self, tensor: gs.Tensor) -> str:
        if isinstance(tensor, gs.Constant) or tensor.name in self.fixed:
            return "fixed"
        return "forward" if tensor.name in self.tensors else "conditional"

    def inputs(self, e: Emitter, op_type: str, inputs: list[gs.Tensor]) -> tuple[list[gs.Tensor], Finish]:
        kinds = [self.kind(t) for t in inputs]
        if op_type == "CastLike":  # its second input gives the type only
            kinds = kinds[:1]
        forward = [self.tensors[t.name] for t, kind in zip(inputs, kinds) if kind == "forward"]
        if "conditional" not in kinds:
            if not forward:
                return inputs, self._mark_fixed
            if op_type in PER_ROW:
                rank = max(forward + [np.ndim(t.values) for t in inputs if isinstance(t, gs.Constant)])
                return inputs, lambda e, outs: self._mark_forward(outs, rank)
        elif not forward or op_type == "CastLike":
            return inputs, _as_they_are
        elif op_type in BROADCASTING:
            return [self._by_condition(e, t) if k == "conditional" else t for t, k in zip(inputs, kinds)], _merged
        return [self._repeated(e, t) if k == "forward" else t for t, k in zip(inputs, kinds)], _as_they_are

    def _mark_fixed(self, e: Emitter, outs: list[gs.Variable]) -> list[gs.Variable]:
        self.fixed.update(out.name for out in outs)
        return outs

    def _mark_forward(self, outs: list[gs.Variable], rank: int) -> list[gs.Variable]:
        self.tensors.update((out.name, rank) for out in outs)
        return outs

    def _repeated(self, e: Emitter, tensor: gs.Tensor) -> gs.Tensor:
        """A forward tensor's rows repeated for every condition: [K * N, ...]."""
        if tensor.name not in self.done:
            rank = self.tensors[tensor.name]
            times = e.op("Concat", self.repeats, e.ints([1] * (rank - 1)), axis=0) if rank > 1 else self.repeats
            self.done[tensor.name] = e.op("Tile", tensor, times)
        return self.done[tensor.name]

    def _by_condition(self, e: Emitter, tensor: gs.Tensor) -> gs.Tensor:
        """[K * N, ...] -> [K, N, ...] (a Reshape: no copy)."""
        rest = e.op("Slice", e.op("Shape", tensor), e.ints([1]), e.ints([_END]))
        return e.op("Reshape", tensor, e.op("Concat", self.repeats, e.ints([-1]), rest, axis=0))


def _as_they_are(e: Emitter, outs: list[gs.Variable]) -> list[gs.Variable]:
    return outs


def _merged(e: Emitter, outs: list[gs.Variable]) -> list[gs.Variable]:
    """[K, N, ...] -> [K * N, ...]."""
    rest = e.op("Slice", e.op("Shape", outs[0]), e.ints([2]), e.ints([_END]))
    return [e.op("Reshape", outs[0], e.op("Concat", e.ints([-1]), rest, axis=0))]


@dataclass
class Conditional:
    relevance: gs.Tensor  # [N, K, ...] the input relevance of each condition
    channels: gs.Tensor  # [N, K, S] int64: the channels of each condition
    channel_sums: gs.Tensor  # [N, C]: the relevance total of each channel at the layer
    activation: gs.Tensor  # [N, C]: each channel's largest activation (relevance maximisation's "activation")
    count: int  # C


def emit(e: Emitter, graph: ModelGraph, rules: dict[str, Rule], concept: gs.Tensor, R: gs.Tensor, layer: str,
         axis: int, images: gs.Tensor, context: Callable[[str, object], RuleContext]) -> Conditional:
    """The conditional passes from tensor `layer` (its relevance R, channel axis `axis`) for the
    conditions `concept` [N, K, S]: each a set of S channels (a channel, or -r: the image's r-th
    most relevant channel; one named twice counts once)."""
    producer = next(name for name, op in graph.ops.items() if op.output.name == layer)
    forward_shape = graph.ops[producer].output.shape
    shape = list(forward_shape) if forward_shape is not None else None
    with e.scope("concepts"):
        if shape is None or not all(isinstance(d, int) for d in shape[1:]):
            raise ModelError(f"concept layer '{layer}' has shape {shape}; concepts need static shapes past the batch")
        rank, count = len(shape), shape[axis]
        spatial = [a for a in range(1, rank) if a != axis]
        sums = e.reduce_sum(R, spatial) if spatial else R  # [N, C]
        # [K, N, S]: condition k's rows come together; S channels per condition (its set)
        conditions = e.op("Transpose", concept, perm=[1, 0, 2])
        _, order = e.op("TopK", sums, e.ints([count]), axis=1, outputs=2)  # [N, C], most relevant first
        place = e.op("Clip", e.op("Sub", e.op("Neg", conditions), np.int64(1)), np.int64(0), np.int64(count - 1))
        # order[n, place[k, n, s]], as GatherElements over order's transpose [C, N] takes it: [K * S, N]
        k, n, sets = (e.op("Gather", e.op("Shape", conditions), e.ints([a])) for a in range(3))
        across = e.op("Transpose", place, perm=[0, 2, 1])  # [K, S, N]
        flat = e.op("Reshape", across, e.op("Concat", e.ints([-1]), n, axis=0))
        gathered = e.op("GatherElements", e.op("Transpose", order, perm=[1, 0]), flat, axis=0)
        ranked = e.op("Transpose", e.op("Reshape", gathered, e.op("Concat", k, sets, n, axis=0)),
                      perm=[0, 2, 1])  # [K, N, S]
        chosen = e.op("Where", e.op("Less", conditions, np.int64(0)), ranked, conditions)  # [K, N, S]
        channels = np.arange(count, dtype=np.int64).reshape(1, 1, 1, -1)
        hits = e.op("Cast", e.op("Equal", e.op("Unsqueeze", chosen, e.ints([3])), e.const(channels)),
                    to=onnx.TensorProto.INT64)
        # [K, N, C]: 1 on the set's channels (one named twice once); counted in int64, whatever
        # the graph's precision
        mask = e.op("CastLike", e.op("Min", e.reduce_sum(hits, [2]), np.int64(1)), R)
        others = [a + 1 for a in spatial]  # the mask's axes of length 1 in [K, N, ...]
        if others:
            mask = e.op("Unsqueeze", mask, e.ints(others))
        masked = e.mul(e.op("Unsqueeze", R, e.ints([0])), mask)  # [K, N, ...]
        start = e.op("Reshape", masked, e.ints([-1] + shape[1:]))  # [K * N, ...]
        repeats = e.op("Slice", e.op("Shape", concept), e.ints([1]), e.ints([2]))  # [K]

    cone = nx.ancestors(graph.dag, producer) | {producer}
    # The forward pass's tensors, all with a batch axis: the data path, and what rules asked the
    # model's nodes for besides (MaxPool's argmax indices).
    forward = {images.name: len(images.shape)}
    for op in graph.ops.values():
        for t in op.node.outputs:
            if t.shape is not None and len(t.shape) >= 1:
                forward[t.name] = len(t.shape)
    contributions: dict[str, list[gs.Tensor]] = defaultdict(list)
    contributions[layer].append(start)
    with e.rewriting(ByCondition(forward, repeats)):
        for name in reversed(list(graph.ops)):
            if name not in cone:
                continue
            op = graph.ops[name]
            parts = contributions.pop(op.output.name, None)
            if not parts:
                continue
            with e.scope(f"concepts/{name}"):
                inputs = rules[name].relevance(e, op, e.sum(parts), context(name, op))
            for tensor, r in inputs.items():
                contributions[tensor].append(r)
    parts = contributions.pop(images.name, None)
    if not parts:
        raise ModelError(f"no relevance reaches the image input from the concept layer '{layer}'")
    with e.scope("concepts"):
        relevance = e.sum(parts)  # [K * N, ...]
        kn = e.op("Slice", e.op("Shape", conditions), e.ints([0]), e.ints([2]))  # [K, N]
        split = e.op("Concat", kn, e.ints(list(images.shape[1:])), axis=0)
        perm = [1, 0] + list(range(2, len(images.shape) + 1))
        relevance = e.op("Transpose", e.op("Reshape", relevance, split), perm=perm)  # [N, K, ...]
        return Conditional(relevance, e.op("Transpose", chosen, perm=[1, 0, 2]), sums,
                           channel_maxima(e, graph.ops[producer].output, axis), count)


def channel_maxima(e: Emitter, x: gs.Tensor, axis: int) -> gs.Tensor:
    """[N, C]: the largest value of each channel of x (channel axis `axis`) over its positions.
    GlobalMaxPool, after moving the channels to axis 1: ReduceMax's axes changed form at opset 18."""
    rank = len(x.shape)
    if rank == 2:
        return x
    if axis != 1:
        x = e.op("Transpose", x, perm=[0, axis] + [a for a in range(1, rank) if a != axis])
    return e.op("Flatten", e.op("GlobalMaxPool", x), axis=1)
